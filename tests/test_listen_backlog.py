"""`LISTEN_BACKLOG` reaches the listening socket of `python -m app`: the kernel reports a
listener's backlog as its Send-Q (`ss -ltn`), capped at `net.core.somaxconn`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import GatewayProcessFactory


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on `port` (Send-Q of `ss -ltn` for a listener)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert len(rows) == 1, out
    state, _recv_q, send_q = rows[0][:3]
    assert state == "LISTEN", out
    return int(send_q)


@pytest.mark.parametrize(("env", "expected"), [({}, 1024), ({"LISTEN_BACKLOG": "700"}, 700)])
def test_the_listen_backlog_setting_reaches_the_socket(
    gateway_process: GatewayProcessFactory, env: dict[str, str], expected: int
) -> None:
    proc = gateway_process(env)
    assert listen_backlog(proc.port) == min(expected, somaxconn())

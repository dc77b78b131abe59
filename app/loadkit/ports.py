"""A free TCP port for a process about to be started: the one helper the kit, scripts/ and the
tests share (they start gateways, stubs, Redis and nginx on loopback, never on fixed ports)."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


_HANDED_OUT: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago on `host` (bind to port 0, read it, close), and
    that this process has not handed out before.

    The kernel may give the same port to two binds in a row once the first socket is closed
    (seen: `scripts/cluster` gave Redis and nginx one port); so a caller choosing several ports
    before starting their servers gets distinct ones. Another process may still take a port
    before the caller binds it; the callers start their server at once and treat a failed
    start as a failure, not a retry."""
    if len(_HANDED_OUT) > 10_000:  # of the ~28,000 ephemeral ports: the old ones are long used
        _HANDED_OUT.clear()
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port

"""A free TCP port for a process about to be started: the one helper the kit, scripts/ and the
tests share (they start gateways, stubs, Redis and nginx on loopback, never on fixed ports)."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago on `host` (bind to port 0, read it, close).

    Another process may take it before the caller binds it; the callers start their server at
    once and treat a failed start as a failure, not a retry."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port

"""The shipped deploy/nginx.conf in front of a gateway the test runs itself.

`nginx_in_front(directory, gateway_port)` renders the file for loopback exactly as
`scripts/cluster` does (`cluster.render_nginx`: only its `# cluster:` blocks change: listen
address, the one upstream server, pid, log and temp paths), starts nginx as a child (`nginx -t`
first), waits until `/healthz` answers through it, and stops it (by its PID) on exit. It yields
nginx's port. The gateway may run in the test's own event loop (nothing here blocks it).

`connect_from(...)`: a raw connection from another loopback address (127.0.0.2 by default), so
nginx and the browser differ in address and `TRUSTED_PROXIES=127.0.0.1/32` trusts only nginx.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from app.loadkit.ports import free_port
from scripts import cluster

REPO_ROOT = Path(__file__).resolve().parent.parent

BROWSER_ADDRESS = "127.0.0.2"


@contextlib.asynccontextmanager
async def nginx_in_front(directory: Path, gateway_port: int) -> AsyncIterator[int]:
    directory.mkdir(parents=True, exist_ok=True)
    state = cluster.State(
        dir=str(directory),
        lb_port=free_port(),
        redis_port=None,
        redis_url="",
        store="memory",
        python=sys.executable,
        workdir=str(directory),
    )
    temp = directory / "nginx-temp"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (temp / kind).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # workers run as nobody (as in scripts/cluster)
        for path in (temp, *temp.iterdir()):
            path.chmod(0o777)
        directory.chmod(0o711)
    conf = directory / "nginx.conf"
    conf.write_text(
        cluster.render_nginx(cluster.NGINX_TEMPLATE.read_text(), state=state, ports=[gateway_port])
    )
    nginx = cluster.nginx_binary()
    log = directory / "nginx.log"
    check = subprocess.run(
        [nginx, "-t", "-q", "-e", str(log), "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, f"nginx -t: {check.stderr}"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [nginx, "-e", str(log), "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                assert proc.poll() is None, f"nginx exited: {log.read_text()[-2000:]}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{state.lb_port}/healthz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"nginx not ready; {log.read_text()[-2000:]}")
        yield int(state.lb_port)
    finally:
        proc.terminate()  # our child, by its PID
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 5)


async def connect_from(
    port: int, address: str = BROWSER_ADDRESS
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to `127.0.0.1:port` whose source address is `address`."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a `Content-Length` or chunked body: (head, body)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lower = head.lower()
        if b"\r\ntransfer-encoding: chunked" in lower:
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
            return head, body
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return head, await reader.readexactly(int(line.split(b":", 1)[1]))
        return head, b""

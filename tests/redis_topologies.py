"""Real multi-process Redis topologies for tests, all on 127.0.0.1 free ports, in temp dirs.

- `RedisClusterTopology`: N primaries (`--cluster-enabled yes`, no replicas), joined with
  `redis-cli --cluster create`, with `cluster-require-full-coverage no` so a dead primary only
  takes its own slots down. `url` is the gateway's `redis+cluster://` REDIS_URL.
- `SentinelTopology`: 1 primary, 1 replica, 3 Sentinels (`redis-server <conf> --sentinel`) with
  a small `down-after-milliseconds` so a failover takes seconds. `url` is `redis+sentinel://`.
- `GatewayHttp`: a tiny async HTTP client for a gateway process that handles the session
  cookie by hand, so one client can drive many independent sessions.
- `TlsFiles` / `make_tls_files`: a throwaway CA (plus a second, unrelated CA), a server
  certificate for 127.0.0.1/localhost and a client certificate, made with the `openssl` CLI.
  `tls_redis_server()` starts a `RedisServer` that also listens with TLS on `tls_port`.

Every process is started and stopped by its own PID (through `RedisServer` or `SentinelProcess`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.loadkit.ports import free_port
from tests.processes import Leftovers, kill_process
from tests.redis_server import RedisServer, redis_server_binary

_LIVE_SENTINELS: Leftovers[SentinelProcess] = Leftovers(lambda proc: proc.close())


def command(client: redis.Redis, *args: str | int) -> Any:
    """`client.execute_command(*args)` (unannotated in redis-py, hence the ignore)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    """Poll `check` until it is true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


# -- Redis Cluster --------------------------------------------------------------------------


class RedisClusterTopology:
    """`primaries` cluster nodes forming one cluster over all 16384 slots, each with
    `replicas` replicas (which Redis promotes when their primary fails)."""

    def __init__(
        self,
        primaries: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
    ) -> None:
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        for _ in range(primaries * (1 + replicas)):
            args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # The bus port defaults to port+10000, which may be taken or > 65535.
                "--cluster-port",
                str(free_port()),
                # Keep serving the slots that are still covered when a primary dies.
                "--cluster-require-full-coverage",
                "no",
            ]
            if appendonly:
                args += ["--appendfsync", "always"]
            self.nodes.append(RedisServer(port=free_port(), appendonly=appendonly, extra_args=args))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterTopology:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed: run scripts/system-deps")
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout!r}")
        wait_until(self._converged, 30, "every cluster node to report cluster_state:ok")
        return self

    def _converged(self) -> bool:
        for node in self.nodes:
            with contextlib.closing(node.client(socket_timeout=0.5)) as client:
                info: dict[str, Any] = client.cluster("INFO")
                if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) != len(
                    self.nodes
                ):
                    return False
                replication: dict[str, Any] = client.info("replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    return False
        return True

    def replicas_caught_up(self) -> bool:
        """True when every replica has acknowledged its primary's whole replication stream."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.closing(node.client(socket_timeout=0.5)) as client:
                info: dict[str, Any] = client.info("replication")
            if info.get("role") != "master":
                continue
            offset = int(info["master_repl_offset"])
            for name, value in info.items():
                if (
                    name.startswith("slave")
                    and isinstance(value, dict)
                    and int(value["offset"]) < offset
                ):
                    return False
        return True

    def node_for_slot(self, slot: int) -> RedisServer:
        """The node that serves `slot` according to the (live) cluster's CLUSTER SLOTS."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.closing(node.client(socket_timeout=1.0)) as client:
                ranges: Any = command(client, "CLUSTER", "SLOTS")
            for start, end, primary, *_ in ranges:
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no live node knows slot {slot}")

    def node_for_key(self, key: str) -> RedisServer:
        return self.node_for_slot(key_slot(key.encode()))

    def node_id(self, node: RedisServer) -> str:
        with contextlib.closing(node.client()) as client:
            return str(command(client, "CLUSTER", "MYID").decode())

    def keys_per_node(self) -> dict[int, set[str]]:
        """{port: keys stored on that node} for every running node."""
        result: dict[int, set[str]] = {}
        for node in self.nodes:
            if node.running:
                with contextlib.closing(node.client()) as client:
                    result[node.port] = {k.decode() for k in client.scan_iter(count=1000)}
        return result

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisClusterTopology:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Sentinel -------------------------------------------------------------------------------


class SentinelProcess:
    """One `redis-server <dir>/sentinel.conf --sentinel` on a free port (config in its dir)."""

    def __init__(self, config: str, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        if password:
            config += f"requirepass {password}\n"
        self.dir = Path(tempfile.mkdtemp(prefix="sentinel-test-"))
        self.config_path = self.dir / "sentinel.conf"
        self.config_path.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n{config}"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, *, socket_timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            protocol=2,
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.dir / "sentinel.log").read_text(errors="replace")
        except OSError:
            return "<no sentinel log>"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> SentinelProcess:
        self._proc = subprocess.Popen(
            [redis_server_binary(), str(self.config_path), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
            start_new_session=True,
        )
        _LIVE_SENTINELS.add(self)

        def answers() -> bool:
            if not self.running:
                raise RuntimeError(f"sentinel exited at start:\n{self.log_tail()}")
            with contextlib.closing(self.client(socket_timeout=0.5)) as client:
                return bool(client.ping())

        wait_until(answers, 10, f"sentinel on port {self.port}")
        return self

    def close(self) -> None:
        kill_process(self._proc)
        self._proc = None
        _LIVE_SENTINELS.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelTopology:
    """A primary, one replica, and `sentinels` Sentinels watching them as `master_name`.

    `down_after_ms` and `failover_timeout_ms` are small so a failover takes seconds.
    `password` protects the data nodes (and is in `url`); `sentinel_password` the Sentinels.
    """

    def __init__(
        self,
        *,
        master_name: str = "sessions",
        sentinels: int = 3,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.master_name = master_name
        self.sentinel_password = sentinel_password
        self.password = password
        auth = ["--masterauth", password] if password else []
        self.primary = RedisServer(password=password, extra_args=auth)
        self.replica_port = free_port()
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelProcess] = []
        self._sentinel_count = sentinels

    @property
    def servers(self) -> list[RedisServer]:
        return [s for s in (self.primary, self.replica) if s is not None]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{self.master_name}/0"

    def start(self) -> SentinelTopology:
        self.primary.start()
        auth = ["--masterauth", self.password] if self.password else []
        self.replica = RedisServer(
            password=self.password,
            port=self.replica_port,
            extra_args=[*auth, "--replicaof", "127.0.0.1", str(self.primary.port)],
        ).start()
        wait_until(
            lambda: (
                self._info(self.replica_or_fail(), "replication").get("master_link_status") == "up"
            ),
            20,
            "the replica to sync with the primary",
        )
        name = self.master_name
        config = (
            f"sentinel monitor {name} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        if self.password:
            config += f"sentinel auth-pass {name} {self.password}\n"
        if self.sentinel_password:  # Sentinels authenticate to each other too
            config += f"sentinel sentinel-pass {self.sentinel_password}\n"
        self.sentinels = [
            SentinelProcess(config, password=self.sentinel_password)
            for _ in range(self._sentinel_count)
        ]
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._sentinels_ready, 30, "the Sentinels to find each other and the replica")
        return self

    def replica_or_fail(self) -> RedisServer:
        if self.replica is None:
            raise RuntimeError("the topology is not started")
        return self.replica

    @staticmethod
    def _info(server: RedisServer, section: str) -> dict[str, Any]:
        with contextlib.closing(server.client(socket_timeout=0.5)) as client:
            info: dict[str, Any] = client.info(section)
            return info

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            with contextlib.closing(sentinel.client(socket_timeout=0.5)) as client:
                state: Any = command(client, "SENTINEL", "MASTER", self.master_name)
                fields = dict(zip(state[::2], state[1::2], strict=True))
                if int(fields[b"num-other-sentinels"]) != len(self.sentinels) - 1:
                    return False
                if int(fields[b"num-slaves"]) < 1:
                    return False
        return True

    def primary_port(self) -> int:
        """The primary's port according to the first Sentinel that answers."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with (
                contextlib.closing(sentinel.client(socket_timeout=1.0)) as client,
                contextlib.suppress(RedisConnectionError, RedisTimeoutError),
            ):
                addr = command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                return int(addr[1])
        raise RuntimeError("no Sentinel answered")

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def current_primary(self) -> RedisServer:
        return self.server_on(self.primary_port())

    def wait_replica_caught_up(self, timeout: float = 10.0) -> None:
        """Until every replica has acknowledged the primary's whole replication stream."""
        primary = self.current_primary()

        def caught_up() -> bool:
            info = self._info(primary, "replication")
            offset = int(info["master_repl_offset"])
            replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            return bool(replicas) and all(int(r["offset"]) >= offset for r in replicas)

        wait_until(caught_up, timeout, "the replica to catch up")

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.servers:
            server.close()

    def __enter__(self) -> SentinelTopology:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: `ca` signed `server_*` (for 127.0.0.1 and localhost), `client_*` and
    `misnamed_*` (a server certificate for another name); `other_ca` signed nothing we use."""

    dir: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    misnamed_cert: Path
    misnamed_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("openssl is not installed (apt-get install openssl)")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr.decode()}")


def _make_ca(cwd: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN=agent-bff test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip
    return cwd / f"{name}.crt", cwd / f"{name}.key"


def _make_leaf(cwd: Path, name: str, ca: str, extensions: str) -> tuple[Path, Path]:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip
    return cwd / f"{name}.crt", cwd / f"{name}.key"


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA, a server cert for 127.0.0.1 and localhost, a client cert, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca(directory, "ca")
    other_ca, _ = _make_ca(directory, "other-ca")
    server_cert, server_key = _make_leaf(
        directory,
        "server",
        "ca",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    client_cert, client_key = _make_leaf(
        directory, "client", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    )
    misnamed_cert, misnamed_key = _make_leaf(
        directory,
        "misnamed",
        "ca",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:redis.elsewhere.invalid\n",
    )
    return TlsFiles(
        dir=directory,
        ca=ca,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        misnamed_cert=misnamed_cert,
        misnamed_key=misnamed_key,
        other_ca=other_ca,
    )


@contextlib.contextmanager
def tls_redis_server(
    files: TlsFiles,
    *,
    require_client_cert: bool = False,
    password: str | None = None,
    misnamed: bool = False,
) -> Iterator[tuple[RedisServer, int]]:
    """A `RedisServer` that also listens with TLS: yields (server, tls_port). The plain port
    stays open for the test's own assertions (`server.client()`). `misnamed` serves the
    certificate made out to another host name."""
    tls_port = free_port()
    cert, key = (
        (files.misnamed_cert, files.misnamed_key)
        if misnamed
        else (files.server_cert, files.server_key)
    )
    server = RedisServer(
        port=free_port(),
        password=password,
        extra_args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(files.ca),
            "--tls-auth-clients", "yes" if require_client_cert else "no",
        ],
    )  # fmt: skip
    with server:
        yield server, tls_port


# -- HTTP to a gateway ----------------------------------------------------------------------


@dataclass
class Reply:
    """One gateway answer: status, JSON body (or {}), headers, wall time, session cookie."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    seconds: float
    sid: str | None
    started: float

    @property
    def error_code(self) -> str | None:
        error = self.body.get("error")
        return str(error.get("code")) if isinstance(error, dict) else None


class GatewayHttp:
    """`async with GatewayHttp(url) as http: reply = await http.patch({"a": 1})`.

    No cookie jar: pass `sid` explicitly, so many sessions can be driven from one client;
    `Reply.sid` is the session cookie the gateway set (if any).
    """

    def __init__(self, base_url: str, *, app: str = "demo", cookie_name: str = "agent_sid") -> None:
        self.base_url = base_url.rstrip("/")
        self.app = app
        self.cookie_name = cookie_name
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayHttp:
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=15)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, path: str, *, sid: str | None = None, payload: Any = None
    ) -> Reply:
        assert self._session is not None, "use `async with GatewayHttp(...)`"
        headers = {"X-CSRF": "1"}
        if sid is not None:
            headers["Cookie"] = f"{self.cookie_name}={sid}"
        started = time.monotonic()
        async with self._session.request(
            method, self.base_url + path, json=payload, headers=headers
        ) as resp:
            raw = await resp.read()
            seconds = time.monotonic() - started
            try:
                body = _json_object(raw)
            except ValueError:
                body = {}
            morsel = resp.cookies.get(self.cookie_name)
            return Reply(
                status=resp.status,
                body=body,
                headers=dict(resp.headers),
                seconds=seconds,
                sid=morsel.value if morsel is not None and morsel.value else None,
                started=started,
            )

    async def patch(self, data: dict[str, Any], sid: str | None = None) -> Reply:
        return await self.request("PATCH", f"/apps/{self.app}/session", sid=sid, payload=data)

    async def get(self, sid: str | None) -> Reply:
        return await self.request("GET", f"/apps/{self.app}/session", sid=sid)

    async def ready(self) -> int:
        return (await self.request("GET", "/readyz")).status


def _json_object(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw) if raw else {}
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value

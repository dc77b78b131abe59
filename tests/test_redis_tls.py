"""Sessions over TLS (`rediss://`) to a real `redis-server --tls-port`, with a CA made here.

- Round trip through `python -m app` with `REDIS_TLS_CA_FILE` naming the test CA.
- Verification is on by default: an unrelated CA, no CA (system store) or a certificate for
  another host name stop the start (exit 1 / `StoreStartupError`) with a message naming
  `REDIS_URL` (password redacted) and the TLS hint.
- A server that requires client certificates: refused without, served with
  `REDIS_TLS_CERT_FILE` / `REDIS_TLS_KEY_FILE`.
- `REDIS_TLS_VERIFY=false` connects anyway, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.main import StoreStartupError, open_store
from app.sessions.ids import session_key
from tests.conftest import CSRF, GatewayFactory, GatewayProcessFactory, make_settings
from tests.gateway_process import run_gateway_to_exit
from tests.redis_server import RedisServer
from tests.redis_topologies import GatewayHttp, TlsFiles, make_tls_files, tls_redis_server

pytestmark = pytest.mark.redis_server

PASSWORD = "tls-secret"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(Path(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def tls_server(tls_files: TlsFiles) -> Iterator[tuple[RedisServer, str]]:
    """(server, rediss:// URL of its TLS port, with the password)."""
    with tls_redis_server(tls_files, password=PASSWORD) as (server, tls_port):
        yield server, f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}/0"


def env_for(url: str, **more: str) -> dict[str, str]:
    return {"SESSION_STORE": "redis", "REDIS_URL": url, **more}


async def test_session_round_trip_over_tls_with_the_test_ca(
    tls_files: TlsFiles,
    tls_server: tuple[RedisServer, str],
    gateway_process: GatewayProcessFactory,
) -> None:
    server, url = tls_server
    gateway = gateway_process(env_for(url, REDIS_TLS_CA_FILE=str(tls_files.ca)))
    async with GatewayHttp(gateway.url) as http:
        assert await http.ready() == 200
        created = await http.patch({"over": "tls"})
        assert created.status == 200 and created.sid is not None
        reply = await http.get(created.sid)
        assert reply.status == 200 and reply.body == {"data": {"over": "tls"}}
    with contextlib.closing(server.client()) as plain:  # the test's own, non-TLS port
        assert plain.exists(session_key("agent:sess:", "demo", created.sid)) == 1
    assert PASSWORD not in gateway.stderr


@pytest.mark.system
def test_an_unrelated_ca_stops_the_start_with_a_clear_message(
    tls_files: TlsFiles, tls_server: tuple[RedisServer, str]
) -> None:
    _, url = tls_server
    code, stderr, seconds = run_gateway_to_exit(
        env_for(url, REDIS_TLS_CA_FILE=str(tls_files.other_ca))
    )
    assert code == 1, stderr
    assert "REDIS_URL=rediss://:***@127.0.0.1:" in stderr
    assert "certificate verify failed" in stderr.lower(), stderr
    assert "REDIS_TLS_CA_FILE" in stderr
    assert PASSWORD not in stderr
    assert seconds < 10


async def test_verification_is_on_by_default_without_a_ca_file(
    tls_server: tuple[RedisServer, str],
) -> None:
    """No REDIS_TLS_CA_FILE: the system CA store, which does not trust the test CA."""
    _, url = tls_server
    with pytest.raises(StoreStartupError) as info:
        await open_store(make_settings(env_for(url)))
    message = str(info.value)
    assert "certificate verify failed" in message.lower()
    assert PASSWORD not in message


async def test_a_certificate_for_another_host_name_is_refused(tls_files: TlsFiles) -> None:
    with tls_redis_server(tls_files, misnamed=True) as (_, tls_port):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        with pytest.raises(StoreStartupError) as info:
            await open_store(make_settings(env_for(url, REDIS_TLS_CA_FILE=str(tls_files.ca))))
    assert "mismatch" in str(info.value).lower(), info.value


async def test_client_certificate_when_the_server_requires_one(
    tls_files: TlsFiles, gateway_factory: GatewayFactory
) -> None:
    with tls_redis_server(tls_files, require_client_cert=True) as (server, tls_port):
        url = f"rediss://localhost:{tls_port}/0"  # the certificate names localhost too
        ca = str(tls_files.ca)
        with pytest.raises(StoreStartupError):
            await open_store(make_settings(env_for(url, REDIS_TLS_CA_FILE=ca)))

        gateway = await gateway_factory(
            "redis",
            env_for(
                url,
                REDIS_TLS_CA_FILE=ca,
                REDIS_TLS_CERT_FILE=str(tls_files.client_cert),
                REDIS_TLS_KEY_FILE=str(tls_files.client_key),
            ),
        )
        resp = await gateway.client.patch("/apps/demo/session", json={"mtls": 1}, headers=CSRF)
        assert resp.status == 200
        sid = gateway.session_id()
        assert sid is not None
        with contextlib.closing(server.client()) as plain:
            assert plain.exists(gateway.key(sid)) == 1


async def test_verification_can_be_switched_off_with_a_warning(
    tls_files: TlsFiles,
    tls_server: tuple[RedisServer, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, url = tls_server
    settings = make_settings(
        env_for(url, REDIS_TLS_CA_FILE=str(tls_files.other_ca), REDIS_TLS_VERIFY="false")
    )
    with caplog.at_level(logging.WARNING):
        backend = await open_store(settings)
    try:
        await backend.ping()
    finally:
        await backend.close()
    assert any("REDIS_TLS_VERIFY=false" in r.getMessage() for r in caplog.records)

"""Start-up errors against Redis name the likely cause, not always "running? firewall?".

Real `python -m app` processes against real redis-servers (a password set or not, a plain
server behind a Sentinel or Cluster URL); each exits 1 at start with one line whose advice fits.
Before, every one of these ended with "verify Redis is running and reachable, ... firewall".
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.loadkit.ports import free_port
from app.store_hints import GENERIC_HINT, startup_hint
from tests.gateway_process import run_gateway_to_exit
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis_server

PASSWORD = "right-horse-battery"


@pytest.fixture(scope="module")
def locked_redis(tier_integration: None) -> Iterator[RedisServer]:
    """A redis-server with `requirepass`."""
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def open_redis(tier_integration: None) -> Iterator[RedisServer]:
    """A redis-server without a password."""
    with RedisServer() as server:
        yield server


def start_error(url: str) -> str:
    """The one stderr line of a gateway that could not use `url` at start (exit 1)."""
    code, stderr, _ = run_gateway_to_exit({"SESSION_STORE": "redis", "REDIS_URL": url})
    assert code == 1, stderr
    [line] = [x for x in stderr.splitlines() if x.startswith("agent-bff: startup error")]
    assert "firewall" not in line, line  # the generic advice is for the unexplained only
    assert line.endswith("(README: Troubleshooting)"), line
    return line


@pytest.mark.system
def test_a_wrong_password(locked_redis: RedisServer) -> None:
    line = start_error(f"redis://:wrong-password@127.0.0.1:{locked_redis.port}/0")
    assert "AuthenticationError" in line
    assert "the password (or user name) in REDIS_URL is wrong" in line
    assert "wrong-password" not in line


@pytest.mark.system
def test_no_password_where_one_is_required(locked_redis: RedisServer) -> None:
    line = start_error(f"redis://127.0.0.1:{locked_redis.port}/0")
    assert "the server requires a password and REDIS_URL has none" in line


@pytest.mark.system
def test_a_password_the_server_does_not_have(open_redis: RedisServer) -> None:
    line = start_error(f"redis://:{PASSWORD}@127.0.0.1:{open_redis.port}/0")
    assert "REDIS_URL carries a password but the server has none" in line
    assert PASSWORD not in line


@pytest.mark.system
def test_a_database_index_out_of_range(locked_redis: RedisServer) -> None:
    line = start_error(f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/99")
    assert "DB index is out of range" in line
    assert "the database number in REDIS_URL (/99)" in line and "0-15" in line


@pytest.mark.system
def test_a_sentinel_url_aimed_at_a_plain_redis(open_redis: RedisServer) -> None:
    line = start_error(f"redis+sentinel://127.0.0.1:{open_redis.port}/mymaster")
    assert "unknown command 'SENTINEL'" in line
    assert "answer as a plain Redis server, not a Sentinel" in line


@pytest.mark.system
def test_a_cluster_url_aimed_at_a_plain_redis(open_redis: RedisServer) -> None:
    line = start_error(f"redis+cluster://127.0.0.1:{open_redis.port}")
    assert "the server is not a cluster node" in line


@pytest.mark.system
def test_nothing_listening() -> None:
    port = free_port()
    line = start_error(f"redis://127.0.0.1:{port}/0")
    assert f"nothing listens at 127.0.0.1:{port}" in line


def test_the_hint_table_for_errors_hard_to_provoke_here() -> None:
    url = "rediss://:pw@redis.internal:6380/0"
    assert "does not resolve" in startup_hint(
        "ConnectionError: Error -2 connecting to redis.internal:6380. Name or service not known.",
        url,
    )
    deadline = "TimeoutError: no answer within the 2 s deadline (3 attempts; ...)"
    assert "no TLS answer: is that port plain-text Redis?" in startup_hint(deadline, url)
    assert "TLS" not in startup_hint(deadline, "redis://h:6379/0")
    assert "REDIS_TLS_CA_FILE" in startup_hint("SSLError: CERTIFICATE_VERIFY_FAILED", url)
    assert "6.2 or newer" in startup_hint("Redis 5.0.7 is too old: 6.2 or newer is needed", url)
    assert "REDIS_SENTINEL_PASSWORD" in startup_hint("MasterNotFoundError: No master found", url)
    assert startup_hint("ReadOnlyError: something new", url) == GENERIC_HINT
    # Advice never repeats the password.
    for text in ("WRONGPASS", "NOAUTH", "DB index is out of range", "Connection refused"):
        assert "pw" not in startup_hint(text, url).replace("password", "")


def test_a_cluster_url_with_several_hosts_never_breaks_the_hint() -> None:
    """`redis+cluster://a:1,b:2` has no single port: the hint names the hosts as written (the
    start-up message once died here with a ValueError and lost the REDIS_URL line)."""
    url = "redis+cluster://127.0.0.1:7001,127.0.0.1:7002"
    hint = startup_hint("Error 111 connecting to 127.0.0.1:7001. Connection refused.", url)
    assert "127.0.0.1:7001,127.0.0.1:7002" in hint
    assert "port could not be cast" not in hint.lower()

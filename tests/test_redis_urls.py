"""`REDIS_URL` for every topology: parsing, configuration errors, redaction, the new settings,
and the client each scheme builds (with the explicit retry/timeout budget, never defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection

from app.config import ConfigError, Settings
from app.redis_env import redact_url
from app.sessions.redis import RedisBackend
from app.sessions.redis_client import RedisOptions, make_client
from app.sessions.redis_url import RedisTarget, RedisUrlError, parse_redis_url
from tests.gateway_process import run_gateway_to_exit


def problems_of(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env, dotenv_path=None)
    return info.value.problems


def redis_env(url: str, **more: str) -> dict[str, str]:
    return {"SESSION_STORE": "redis", "REDIS_URL": url, **more}


# -- parsing --------------------------------------------------------------------------------


VALID: list[tuple[str, RedisTarget]] = [
    ("redis://localhost:6379/0", RedisTarget("single", False, (("localhost", 6379),))),
    ("redis://h", RedisTarget("single", False, (("h", 6379),))),
    (
        "rediss://user:p%40ss@redis.example:6380/2",
        RedisTarget("single", True, (("redis.example", 6380),), "user", "p@ss", 2),
    ),
    ("redis://:pa/ss@h:1/3", RedisTarget("single", False, (("h", 1),), None, "pa/ss", 3)),
    ("redis://[::1]:6380", RedisTarget("single", False, (("::1", 6380),))),
    (
        "redis+sentinel://:pw@s1:26379,s2:26380,s3/mymaster/1",
        RedisTarget(
            "sentinel",
            False,
            (("s1", 26379), ("s2", 26380), ("s3", 26379)),
            None,
            "pw",
            1,
            "mymaster",
        ),
    ),
    (
        "redis+sentinel://s1/mymaster/",
        RedisTarget("sentinel", False, (("s1", 26379),), service_name="mymaster"),
    ),
    (
        "redis+cluster://:pw@n1:7000,n2:7001",
        RedisTarget("cluster", False, (("n1", 7000), ("n2", 7001)), None, "pw"),
    ),
    ("REDIS+CLUSTER://n1/0", RedisTarget("cluster", False, (("n1", 6379),))),
]


@pytest.mark.parametrize(("url", "expected"), VALID, ids=[u for u, _ in VALID])
def test_valid_urls_parse(url: str, expected: RedisTarget) -> None:
    assert parse_redis_url(url) == expected
    # ... and are accepted by the settings.
    assert Settings.from_env(redis_env(url), dotenv_path=None).redis_url == url


MALFORMED: list[tuple[str, str]] = [
    # (url, the example the message must point to)
    ("redis://:hunter2@h1:1,h2:2/0", "redis://host:6379/0"),
    ("redis://:hunter2@h:1/0?socket_timeout=9", "redis://host:6379/0"),
    ("rediss://:hunter2@h:0/0", "redis://host:6379/0"),
    ("redis://:hunter2@h:1/0/1", "redis://host:6379/0"),
    ("redis://:hunter2@bad host:1", "redis://host:6379/0"),
    ("redis://:hunter2@[::1/0", "redis://host:6379/0"),
    ("redis://:hunter2@h:/0", "redis://host:6379/0"),
    ("redis+sentinel://:hunter2@s1:26379", "redis+sentinel://host1:26379"),
    ("redis+sentinel://:hunter2@s1:26379/", "redis+sentinel://host1:26379"),
    ("redis+sentinel://:hunter2@s1:26379,/mymaster", "redis+sentinel://host1:26379"),
    ("redis+sentinel://:hunter2@s1:26379/mymaster/x", "redis+sentinel://host1:26379"),
    ("redis+sentinel://:hunter2@s1:abc/mymaster", "redis+sentinel://host1:26379"),
    ("redis+sentinel://:hunter2@s1/mymaster/0/extra", "redis+sentinel://host1:26379"),
    ("redis+sentinel://:hunter2@s1/mymaster#frag", "redis+sentinel://host1:26379"),
    ("rediss+sentinel://:hunter2@s1/mymaster", "redis+sentinel://host1:26379"),
    ("redis+cluster://:hunter2@", "redis+cluster://host1:7000"),
    ("redis+cluster://:hunter2@n1:7000/3", "redis+cluster://host1:7000"),
    ("redis+cluster://:hunter2@n1:7000?x=1", "redis+cluster://host1:7000"),
    ("redis+cluster://:hunter2@n1:99999,n2:7001", "redis+cluster://host1:7000"),
    ("rediss+cluster://:hunter2@n1:7000", "redis+cluster://host1:7000"),
    ("sentinel://:hunter2@s1:26379/mymaster", "redis+sentinel://host1:26379"),
    ("http://:hunter2@localhost:6379", "redis://host:6379/0"),
]


@pytest.mark.parametrize(("url", "example"), MALFORMED, ids=[u for u, _ in MALFORMED])
def test_a_malformed_url_is_one_problem_naming_redis_url_without_the_password(
    url: str, example: str
) -> None:
    with pytest.raises(RedisUrlError):
        parse_redis_url(url)
    problems = problems_of(redis_env(url))
    assert len(problems) == 1, problems
    assert problems[0].startswith("REDIS_URL=")
    assert "hunter2" not in problems[0]
    assert example in problems[0], problems[0]


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://:hunter2@s1:26379,s2:26379", "redis+cluster://:hunter2@n1:7000/1"],
)
@pytest.mark.system
def test_python_m_app_exits_2_on_a_malformed_url(url: str) -> None:
    code, stderr, _ = run_gateway_to_exit(redis_env(url))
    assert code == 2, stderr
    assert "configuration error: REDIS_URL=" in stderr
    assert "hunter2" not in stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://:hunter2@s1:26379,s2:26379/mymaster/0",
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster/0",
        ),
        ("redis+cluster://u:hunter2@n1:7000,n2:7001", "redis+cluster://u:***@n1:7000,n2:7001"),
        ("redis://:hun/ter2@h:1/0", "redis://:***@h:1/0"),
        ("redis://:hun#ter?2@h:1/0", "redis://:***@h:1/0"),
        ("redis://:hun@ter2@h:1/0", "redis://:***@h:1/0"),
        ("redis+sentinel://s1:26379/mymaster/0", "redis+sentinel://s1:26379/mymaster/0"),
    ],
)
def test_redact_url_for_every_scheme(url: str, expected: str) -> None:
    assert redact_url(url) == expected


# -- the new settings -----------------------------------------------------------------------


@pytest.fixture
def pem(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


def test_tls_settings_are_read_with_rediss(pem: str) -> None:
    settings = Settings.from_env(
        redis_env(
            "rediss://h:6380/0",
            REDIS_TLS_CA_FILE=pem,
            REDIS_TLS_CERT_FILE=pem,
            REDIS_TLS_KEY_FILE=pem,
            REDIS_TLS_VERIFY="false",
        ),
        dotenv_path=None,
    )
    assert settings.redis_tls_ca_file == pem
    assert settings.redis_tls_cert_file == pem
    assert settings.redis_tls_key_file == pem
    assert settings.redis_tls_verify is False
    assert Settings.from_env(redis_env("rediss://h/0"), dotenv_path=None).redis_tls_verify


def test_sentinel_password_is_read_and_kept_out_of_repr() -> None:
    settings = Settings.from_env(
        redis_env("redis+sentinel://s1/m", REDIS_SENTINEL_PASSWORD="hunter2"), dotenv_path=None
    )
    assert settings.redis_sentinel_password == "hunter2"
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("REDIS_TLS_CA_FILE", redis_env("redis://h/0", REDIS_TLS_CA_FILE="{pem}")),
        ("REDIS_TLS_CA_FILE", redis_env("rediss://h/0", REDIS_TLS_CA_FILE="/nonexistent.pem")),
        ("REDIS_TLS_CERT_FILE", redis_env("redis+cluster://n1", REDIS_TLS_CERT_FILE="{pem}")),
        ("REDIS_TLS_KEY_FILE", redis_env("rediss://h/0", REDIS_TLS_KEY_FILE="{pem}")),
        ("REDIS_TLS_VERIFY", redis_env("rediss://h/0", REDIS_TLS_VERIFY="maybe")),
        ("REDIS_TLS_VERIFY", redis_env("redis://h/0", REDIS_TLS_VERIFY="false")),
        ("REDIS_SENTINEL_PASSWORD", redis_env("redis+cluster://n1", REDIS_SENTINEL_PASSWORD="x")),
    ],
)
def test_a_bad_or_misplaced_redis_setting_is_one_problem(
    name: str, env: dict[str, str], pem: str
) -> None:
    env = {k: v.replace("{pem}", pem) for k, v in env.items()}
    problems = problems_of(env)
    assert len(problems) == 1, problems
    assert problems[0].startswith(name), problems


def test_redis_settings_are_ignored_for_the_memory_store(pem: str) -> None:
    Settings.from_env(
        {"SESSION_STORE": "memory", "REDIS_TLS_CA_FILE": pem, "REDIS_SENTINEL_PASSWORD": "x"},
        dotenv_path=None,
    )


# -- the client each scheme builds ----------------------------------------------------------


OPTIONS: dict[str, Any] = {
    "op_timeout": 1.5,
    "socket_timeout": 0.3,
    "connect_timeout": 0.4,
    "max_connections": 7,
    "pool_timeout": 0.6,
    "health_check_interval": 9,
}


def assert_budget(kwargs: dict[str, Any]) -> None:
    assert kwargs["socket_timeout"] == 0.3
    assert kwargs["socket_connect_timeout"] == 0.4
    assert kwargs["health_check_interval"] == 9
    assert kwargs["socket_keepalive"] is True
    assert kwargs["client_name"] == "agent-bff"
    assert kwargs["protocol"] == 2
    assert kwargs["decode_responses"] is False


async def test_redis_url_builds_a_bounded_blocking_pool() -> None:
    client = make_client(RedisOptions(url="redis://:pw@127.0.0.1:6390/4", **OPTIONS))
    try:
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.max_connections == 7
        assert pool.timeout == 0.6
        assert pool.connection_class is Connection
        kwargs = pool.connection_kwargs
        assert_budget(kwargs)
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6390, 4)
        assert kwargs["password"] == "pw"
        # redis-py retries nothing (its loops nest); RedisBackend does: test_redis_retries.py
        assert kwargs["retry"].get_retries() == 0
    finally:
        await client.aclose()


async def test_rediss_url_verifies_the_certificate(tmp_path: Path) -> None:
    ca = str(tmp_path / "ca.pem")
    client = make_client(RedisOptions(url="rediss://h:6380/0", tls_ca_file=ca, **OPTIONS))
    try:
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        assert pool.connection_class is SSLConnection
        kwargs = pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == ca
        assert kwargs["ssl_cert_reqs"] == "required"
        assert kwargs["ssl_check_hostname"] is True
        assert_budget(kwargs)
    finally:
        await client.aclose()


async def test_sentinel_url_builds_a_sentinel_managed_blocking_pool() -> None:
    url = "redis+sentinel://:pw@127.0.0.1:26001,127.0.0.1:26002/sessions/3"
    backend = RedisBackend(
        make_client(RedisOptions(url=url, sentinel_password="spw", **OPTIONS)), op_timeout=1.5
    )
    try:
        pool = backend.client.connection_pool  # type: ignore[union-attr]
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.service_name == "sessions"  # type: ignore[attr-defined]
        assert pool.max_connections == 7 and pool.timeout == 0.6
        kwargs = pool.connection_kwargs
        assert_budget(kwargs)
        assert kwargs["db"] == 3 and kwargs["password"] == "pw"
        assert kwargs["retry"].get_retries() == 0
        sentinels = pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26001, 26002]
        for sentinel in sentinels:
            skw = sentinel.connection_pool.connection_kwargs
            assert skw["password"] == "spw"
            assert skw["socket_timeout"] == 0.3 and skw["socket_connect_timeout"] == 0.4
    finally:
        await backend.close()


async def test_cluster_url_builds_a_cluster_client_with_the_budget() -> None:
    url = "redis+cluster://:pw@127.0.0.1:7001,127.0.0.1:7002"
    client = make_client(RedisOptions(url=url, **OPTIONS))
    try:
        assert isinstance(client, RedisCluster)
        assert client.retry.get_retries() == 0
        assert sorted(client.nodes_manager.startup_nodes) == ["127.0.0.1:7001", "127.0.0.1:7002"]
        kwargs = client.connection_kwargs
        assert_budget(kwargs)
        assert kwargs["max_connections"] == 7
        assert kwargs["password"] == "pw"
    finally:
        await client.aclose()

"""Configuration: every variable, its default, `.env` under the environment, and every bad value
reported as one problem naming the variable (all problems at once). A Redis password is never
echoed back."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from app.applications import BUILTIN_DEMO_UPSTREAM
from app.config import ConfigError, Settings
from app.redis_env import redact_url


def parse(env: dict[str, str]) -> Settings:
    return Settings.from_env(env, dotenv_path=None)


def problems_of(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(env)
    assert info.value.problems, "a ConfigError must carry its problems"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_defaults_without_any_variable() -> None:
    s = parse({})
    assert s.session_store == "memory"
    assert s.session_ttl_seconds == 3600
    # Off: the spec keeps active sessions valid as long as they are used.
    assert s.session_absolute_seconds == 0
    assert s.redis_url is None
    assert s.redis_prefix == "agent:sess:"
    assert s.apps_file is None
    assert list(s.apps) == ["demo"]
    assert s.apps["demo"].upstream == BUILTIN_DEMO_UPSTREAM
    assert s.cookie_name == "agent_sid"
    assert s.cookie_secure == "auto"
    assert s.cookie_samesite == "Lax"
    assert s.session_max_bytes == 65536
    assert s.trusted_proxies == ()
    assert s.shutdown_timeout_seconds == 30.0
    assert s.body_timeout_seconds == 30.0
    assert s.log_level == "info"
    assert s.host == "0.0.0.0"
    assert s.port == 8080
    # The Redis budget defaults: a dead Redis answers within about two seconds.
    assert s.redis_op_timeout_seconds <= 2.5
    assert s.redis_socket_timeout_seconds < s.redis_op_timeout_seconds
    assert s.redis_connect_timeout_seconds < s.redis_op_timeout_seconds
    assert s.redis_startup_timeout_seconds < 10


def test_every_variable_is_read() -> None:
    s = parse(
        {
            "HOST": "127.0.0.1",
            "PORT": "9000",
            "LISTEN_BACKLOG": "2048",
            "SESSION_STORE": "redis",
            "SESSION_TTL_SECONDS": "120",
            "REDIS_URL": "rediss://user:pw@redis.example:6380/2",
            "REDIS_PREFIX": "myapp:sess:",
            "SESSION_COOKIE_NAME": "my_sid",
            "SESSION_COOKIE_SECURE": "true",
            "SESSION_COOKIE_SAMESITE": "None",
            "SESSION_MAX_BYTES": "1024",
            "TRUSTED_PROXIES": "10.0.0.0/8, ::1",
            "SHUTDOWN_TIMEOUT_SECONDS": "2.5",
            "BODY_TIMEOUT_SECONDS": "7.5",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "json",
            "REDIS_OP_TIMEOUT_SECONDS": "1.5",
            "REDIS_SOCKET_TIMEOUT_SECONDS": "0.3",
            "REDIS_CONNECT_TIMEOUT_SECONDS": "0.4",
            "REDIS_MAX_CONNECTIONS": "7",
            "REDIS_POOL_TIMEOUT_SECONDS": "0.6",
            "REDIS_STARTUP_TIMEOUT_SECONDS": "3",
            "REDIS_HEALTH_CHECK_SECONDS": "4",
            "MEMORY_MAX_SESSIONS": "50",
            "MEMORY_SWEEP_INTERVAL_SECONDS": "9",
        }
    )
    assert (s.host, s.port) == ("127.0.0.1", 9000)
    assert s.listen_backlog == 2048
    assert s.session_store == "redis"
    assert s.session_ttl_seconds == 120
    assert s.redis_url == "rediss://user:pw@redis.example:6380/2"
    assert s.redis_prefix == "myapp:sess:"
    assert s.cookie_name == "my_sid"
    assert s.cookie_secure == "true"
    assert s.cookie_samesite == "None"
    assert s.session_max_bytes == 1024
    assert s.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1"),
    )
    assert s.shutdown_timeout_seconds == 2.5
    assert s.body_timeout_seconds == 7.5
    assert s.log_level == "debug"
    assert s.log_format == "json"
    assert s.redis_op_timeout_seconds == 1.5
    assert s.redis_socket_timeout_seconds == 0.3
    assert s.redis_connect_timeout_seconds == 0.4
    assert s.redis_max_connections == 7
    assert s.redis_pool_timeout_seconds == 0.6
    assert s.redis_startup_timeout_seconds == 3
    assert s.redis_health_check_seconds == 4
    assert s.memory_max_sessions == 50
    assert s.memory_sweep_interval_seconds == 9


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("SESSION_STORE", "REDIS", "redis"),
        ("SESSION_COOKIE_SAMESITE", "strict", "Strict"),
        ("SESSION_COOKIE_SECURE", "FALSE", "false"),
        ("LOG_LEVEL", "WARNING", "warning"),
    ],
)
def test_choices_are_case_insensitive(name: str, raw: str, expected: str) -> None:
    env = {name: raw}
    if expected == "redis":
        env["REDIS_URL"] = "redis://localhost:6379"
    s = parse(env)
    value = {
        "SESSION_STORE": s.session_store,
        "SESSION_COOKIE_SAMESITE": s.cookie_samesite,
        "SESSION_COOKIE_SECURE": s.cookie_secure,
        "LOG_LEVEL": s.log_level,
    }[name]
    assert value == expected


def test_empty_values_mean_default() -> None:
    s = parse({"SESSION_TTL_SECONDS": "", "SESSION_STORE": " ", "PORT": ""})
    assert (s.session_ttl_seconds, s.session_store, s.port) == (3600, "memory", 8080)


@pytest.mark.parametrize(("raw", "expected"), [("", 0), (" ", 0), ("0", 0), ("43200", 43200)])
def test_absolute_lifetime_is_off_unless_set(raw: str, expected: int) -> None:
    assert parse({"SESSION_ABSOLUTE_SECONDS": raw}).session_absolute_seconds == expected


def test_rotation_tombstone_lifetime_defaults_to_a_minute() -> None:
    assert parse({}).session_rotation_tombstone_seconds == 60
    s = parse({"SESSION_ROTATION_TOMBSTONE_SECONDS": "5"})
    assert s.session_rotation_tombstone_seconds == 5


def test_dotenv_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment\n"
        "SESSION_STORE=redis\n"
        "REDIS_URL=redis://from-dotenv:6379\n"
        "SESSION_TTL_SECONDS=60\n"
        "REDIS_PREFIX=dot:sess:\n"
    )
    s = Settings.from_env(
        {"SESSION_TTL_SECONDS": "120", "REDIS_PREFIX": "env:sess:"}, dotenv_path=str(dotenv)
    )
    assert s.session_store == "redis"
    assert s.redis_url == "redis://from-dotenv:6379"
    assert s.session_ttl_seconds == 120
    assert s.redis_prefix == "env:sess:"


def test_dotenv_in_the_working_directory_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("SESSION_TTL_SECONDS=77\n")
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({}).session_ttl_seconds == 77


def test_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    s = Settings.from_env({}, dotenv_path=str(tmp_path / "absent.env"))
    assert s.session_store == "memory"


def test_bad_value_in_dotenv_is_reported(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("SESSION_TTL_SECONDS=soon\n")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({}, dotenv_path=str(dotenv))
    assert any("SESSION_TTL_SECONDS" in p for p in info.value.problems)


BAD_VALUES: list[tuple[str, dict[str, str]]] = [
    ("SESSION_STORE", {"SESSION_STORE": "disk"}),
    ("SESSION_TTL_SECONDS", {"SESSION_TTL_SECONDS": "0"}),
    ("SESSION_TTL_SECONDS", {"SESSION_TTL_SECONDS": "-5"}),
    ("SESSION_TTL_SECONDS", {"SESSION_TTL_SECONDS": "1.5"}),
    ("SESSION_TTL_SECONDS", {"SESSION_TTL_SECONDS": "an hour"}),
    ("SESSION_ABSOLUTE_SECONDS", {"SESSION_ABSOLUTE_SECONDS": "-1"}),
    ("BODY_TIMEOUT_SECONDS", {"BODY_TIMEOUT_SECONDS": "0"}),
    ("SESSION_ABSOLUTE_SECONDS", {"SESSION_ABSOLUTE_SECONDS": "12h"}),
    ("REDIS_URL", {"SESSION_STORE": "redis"}),
    ("REDIS_URL", {"SESSION_STORE": "redis", "REDIS_URL": "http://localhost:6379"}),
    ("REDIS_URL", {"SESSION_STORE": "redis", "REDIS_URL": "redis://"}),
    ("REDIS_URL", {"SESSION_STORE": "redis", "REDIS_URL": "redis://localhost:99999"}),
    ("REDIS_URL", {"SESSION_STORE": "redis", "REDIS_URL": "redis://localhost:6379/abc"}),
    ("REDIS_URL", {"SESSION_STORE": "redis", "REDIS_URL": "localhost:6379"}),
    ("REDIS_PREFIX", {"REDIS_PREFIX": ""}),
    ("REDIS_PREFIX", {"REDIS_PREFIX": "my prefix:"}),
    ("REDIS_PREFIX", {"REDIS_PREFIX": "sess:*"}),
    ("SESSION_COOKIE_NAME", {"SESSION_COOKIE_NAME": "a;b"}),
    ("SESSION_COOKIE_NAME", {"SESSION_COOKIE_NAME": "a b"}),
    ("SESSION_COOKIE_SECURE", {"SESSION_COOKIE_SECURE": "sometimes"}),
    ("SESSION_COOKIE_SAMESITE", {"SESSION_COOKIE_SAMESITE": "Loose"}),
    (
        "SESSION_COOKIE_SAMESITE",
        {"SESSION_COOKIE_SAMESITE": "None", "SESSION_COOKIE_SECURE": "false"},
    ),
    ("SESSION_MAX_BYTES", {"SESSION_MAX_BYTES": "0"}),
    ("SESSION_MAX_BYTES", {"SESSION_MAX_BYTES": "64k"}),
    ("SESSION_ROTATION_TOMBSTONE_SECONDS", {"SESSION_ROTATION_TOMBSTONE_SECONDS": "0"}),
    ("SESSION_ROTATION_TOMBSTONE_SECONDS", {"SESSION_ROTATION_TOMBSTONE_SECONDS": "86401"}),
    ("TRUSTED_PROXIES", {"TRUSTED_PROXIES": "10.0.0.0/8,not-a-network"}),
    ("SHUTDOWN_TIMEOUT_SECONDS", {"SHUTDOWN_TIMEOUT_SECONDS": "-1"}),
    ("SHUTDOWN_TIMEOUT_SECONDS", {"SHUTDOWN_TIMEOUT_SECONDS": "nan"}),
    ("SHUTDOWN_TIMEOUT_SECONDS", {"SHUTDOWN_TIMEOUT_SECONDS": "inf"}),
    ("LOG_LEVEL", {"LOG_LEVEL": "verbose"}),
    ("LOG_FORMAT", {"LOG_FORMAT": "xml"}),
    ("PORT", {"PORT": "70000"}),
    ("PORT", {"PORT": "http"}),
    ("LISTEN_BACKLOG", {"LISTEN_BACKLOG": "0"}),
    ("LISTEN_BACKLOG", {"LISTEN_BACKLOG": "70000"}),
    ("LISTEN_BACKLOG", {"LISTEN_BACKLOG": "many"}),
    ("REDIS_OP_TIMEOUT_SECONDS", {"REDIS_OP_TIMEOUT_SECONDS": "0"}),
    ("REDIS_SOCKET_TIMEOUT_SECONDS", {"REDIS_SOCKET_TIMEOUT_SECONDS": "x"}),
    ("REDIS_CONNECT_TIMEOUT_SECONDS", {"REDIS_CONNECT_TIMEOUT_SECONDS": "-0.5"}),
    ("REDIS_MAX_CONNECTIONS", {"REDIS_MAX_CONNECTIONS": "0"}),
    ("REDIS_STARTUP_TIMEOUT_SECONDS", {"REDIS_STARTUP_TIMEOUT_SECONDS": "0"}),
    ("MEMORY_MAX_SESSIONS", {"MEMORY_MAX_SESSIONS": "-1"}),
    ("APPS_FILE", {"APPS_FILE": "/nonexistent/apps.toml"}),
]


@pytest.mark.parametrize(("name", "env"), BAD_VALUES, ids=[f"{n}-{e}" for n, e in BAD_VALUES])
def test_each_bad_value_is_one_problem_naming_the_variable(name: str, env: dict[str, str]) -> None:
    problems = problems_of(env)
    assert len(problems) == 1, problems
    assert name in problems[0]
    # Each problem says how to fix it, after the diagnosis.
    assert ":" in problems[0]


def test_all_problems_are_reported_at_once() -> None:
    problems = problems_of(
        {
            "SESSION_STORE": "redis",
            "SESSION_TTL_SECONDS": "0",
            "SESSION_COOKIE_SAMESITE": "Loose",
            "LOG_LEVEL": "loud",
        }
    )
    assert len(problems) == 4
    for name in ("REDIS_URL", "SESSION_TTL_SECONDS", "SESSION_COOKIE_SAMESITE", "LOG_LEVEL"):
        assert sum(name in p for p in problems) == 1, (name, problems)


def test_redis_url_is_only_required_for_the_redis_store() -> None:
    assert parse({"SESSION_STORE": "memory"}).redis_url is None
    assert parse({"SESSION_STORE": "redis", "REDIS_URL": "redis://h:1/0"}).redis_url


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@localhost:99999/0",
        "redis://user:hunter2@localhost:6379/abc",
        "http://user:hunter2@localhost:6379",
        "rediss://:hunter2@:6379",
    ],
)
def test_password_is_never_in_a_problem(url: str) -> None:
    problems = problems_of({"SESSION_STORE": "redis", "REDIS_URL": url})
    assert all("REDIS_URL" in p for p in problems)
    assert not any("hunter2" in p for p in problems), problems


def test_password_is_not_in_the_settings_repr() -> None:
    s = parse({"SESSION_STORE": "redis", "REDIS_URL": "redis://:hunter2@localhost:6379/0"})
    assert "hunter2" not in repr(s)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:hunter2@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("rediss://user:hunter2@redis.example/1", "rediss://user:***@redis.example/1"),
        ("redis://:hunter2@[::1]:6379", "redis://:***@[::1]:6379"),
        ("redis://:p%40ss@localhost", "redis://:***@localhost"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_hides_a_password_in_the_query_string() -> None:
    # redis-py reads `?password=` too, so it is just as secret.
    redacted = redact_url("redis://localhost:6379/0?password=hunter2&db=1")
    assert "hunter2" not in redacted
    assert "db=1" in redacted


# -- APPS_FILE ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "apps.toml"
    path.write_text(text)
    return str(path)


def test_apps_file_defines_the_applications(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[apps.demo]\nupstream = "builtin:demo"\n\n'
        '[apps.shop]\nupstream = "http://127.0.0.1:9/agent"\n',
    )
    s = parse({"APPS_FILE": path})
    assert s.apps_file == path
    assert sorted(s.apps) == ["demo", "shop"]
    assert s.apps["shop"].upstream == "http://127.0.0.1:9/agent"


def test_apps_file_replaces_the_default_demo(tmp_path: Path) -> None:
    path = write(tmp_path, '[apps.shop]\nupstream = "http://127.0.0.1:9"\n')
    assert list(parse({"APPS_FILE": path}).apps) == ["shop"]


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("[apps.demo\nupstream = 1", "TOML"),
        ('[other]\nx = "y"\n', "[apps."),
        ("", "[apps."),
        ('[apps."Not Valid"]\nupstream = "builtin:demo"\n', "application id"),
        ('[apps."-dash"]\nupstream = "builtin:demo"\n', "application id"),
        ('[apps."demo\\n"]\nupstream = "builtin:demo"\n', "application id"),
        ("[apps]\ndemo = 1\n", "table"),
        ("[apps.demo]\nheaders = {}\n", "upstream"),
        ('[apps.demo]\nupstream = "builtin:demo"\nfrobnicate = true\n', "frobnicate"),
        ('[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = "X-A"\n', "a list"),
        ('[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = [1]\n', "entry 1"),
        ('[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = ["X_A"]\n', "X_A"),
        ('[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = ["*X"]\n', "*X"),
        ('[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = ["Cookie"]\n', "Cookie"),
        ('[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = ["Via"]\n', "Via"),
        (
            '[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = ["X-Real-IP"]\n',
            "never forwarded",
        ),
        (
            '[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = ["X-Forwarded-*"]\n',
            "X-Forwarded-*",
        ),
        (
            '[apps.a]\nupstream = "builtin:demo"\nforward_request_headers = ["Authorization"]\n',
            "forward_authorization",
        ),
        (
            '[apps.a]\nupstream = "builtin:demo"\nresume_max_events = 0\n',
            "field 'resume_max_events' must be a positive integer",
        ),
        (
            '[apps.a]\nupstream = "builtin:demo"\nresume_max_bytes = true\n',
            "field 'resume_max_bytes' must be a positive integer",
        ),
        (
            '[apps.a]\nupstream = "builtin:demo"\nresume_runs_per_client = 10\n',
            "field 'resume_runs_per_client' must be a string",
        ),
        (
            '[apps.a]\nupstream = "builtin:demo"\nresume_runs_per_client = "10/fortnight"\n',
            "field 'resume_runs_per_client' = '10/fortnight' is not valid",
        ),
        (
            '[apps.a]\nupstream = "builtin:demo"\nresume_redis_budget_bytes = 0\n',
            "field 'resume_redis_budget_bytes' must be a positive integer",
        ),
        (
            '[apps.a]\nupstream = "builtin:demo"\nresume_redis_budget_bytes = "64MiB"\n',
            "field 'resume_redis_budget_bytes' must be a positive integer",
        ),
        ('[apps.a]\nupstream = "builtin:demo"\nresumable = 1\n', "'resumable' must be true"),
    ],
)
def test_invalid_apps_file_is_a_problem_naming_apps_file(
    tmp_path: Path, text: str, hint: str
) -> None:
    problems = problems_of({"APPS_FILE": write(tmp_path, text)})
    assert all("APPS_FILE" in p for p in problems), problems
    assert any(hint in p for p in problems), problems


def test_unreadable_apps_file(tmp_path: Path) -> None:
    problems = problems_of({"APPS_FILE": str(tmp_path)})  # a directory cannot be read
    assert len(problems) == 1
    assert "APPS_FILE" in problems[0]


@pytest.mark.parametrize(
    "url",
    [
        "redis:/:s3cret@localhost:6379",
        "redis:s3cret@localhost:6379",
        "s3cret@localhost",
    ],
)
def test_a_malformed_redis_url_never_shows_its_password(url: str) -> None:
    assert "s3cret" not in redact_url(url)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SESSION_STORE": "redis", "REDIS_URL": url}, dotenv_path=None)
    assert "s3cret" not in str(info.value)
    assert any("REDIS_URL" in problem for problem in info.value.problems)


def test_a_userinfo_without_colon_is_hidden_too() -> None:
    assert redact_url("redis://s3cret@localhost:6379/0") == "redis://***@localhost:6379/0"


def test_relay_response_headers_in_apps_file(tmp_path: Path) -> None:
    """Issue 12 row 2: an application lists the upstream headers it relays beyond the default
    allowlist; a header of the floor (origin-wide, proxy, hop-by-hop) is a start-up problem."""
    good = write(
        tmp_path,
        '[apps.shop]\nupstream = "http://agent:9000"\n'
        'relay_response_headers = ["OpenAI-*", "X-Trace"]\n',
    )
    settings = Settings.from_env({"APPS_FILE": good}, dotenv_path=None)
    relay = settings.apps["shop"].relay
    assert relay.allows("openai-version") and relay.allows("x-trace")
    assert not relay.allows("x-other") and not relay.allows("set-cookie")
    for bad, hint in (
        ('["Clear-Site-Data"]', "never relayed"),
        ('["Access-Control-*"]', "never relayed"),
        ('["X_Trace"]', "must be a header name"),
        ('"OpenAI-*"', "must be a list"),
    ):
        text = f'[apps.shop]\nupstream = "http://agent:9000"\nrelay_response_headers = {bad}\n'
        problems = problems_of({"APPS_FILE": write(tmp_path, text)})
        assert any("relay_response_headers" in p and hint in p for p in problems), (bad, problems)

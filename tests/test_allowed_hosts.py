"""Issue 12 row 7: `ALLOWED_HOSTS`, the DNS-rebinding defence.

A page on `http://attacker.example` re-resolved to the gateway's address makes the browser send
`Host: attacker.example`. With `ALLOWED_HOSTS` set, any Host not listed is answered 421
`host_not_allowed` (the JSON envelope) before a session is read or created and before the
upstream is contacted; `/healthz`, `/readyz` and `/metrics` answer whatever the Host (kubelet
and Prometheus address pods by IP). Behind `TRUSTED_PROXIES` the proxy's `X-Forwarded-Host` is
checked too (both must be listed). Bad entries stop a real process with exit 2; an empty
setting on a non-loopback address is a start-up warning.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.config import ConfigError, Settings
from app.hosts import HostAllowlist, parse_allowed_hosts, split_host
from app.keys import BACKEND_KEY
from app.sessions.memory import MemoryBackend
from tests.conftest import CSRF
from tests.fake_upstream import RunningGateway, ServedUpstream, app_settings, run_gateway
from tests.gateway_process import GatewayProcess, run_gateway_to_exit
from tests.test_http_parsers import Gateway as ParserGateway
from tests.test_http_parsers import (
    exchange,
    recorder,  # noqa: F401 (module fixture, used by it)
    statuses,
)
from tests.test_http_parsers import gateway as parser_gateway  # noqa: F401 (module fixture)

ALLOWED = "Shop.Example.com,*.apps.example.net,localhost:8080,[::1]:8443,127.0.0.1"
FOREIGN = "attacker.example"


# -- the setting ------------------------------------------------------------------------------


def test_entries_are_normalized() -> None:
    problems: list[str] = []
    assert parse_allowed_hosts(f"{ALLOWED}, shop.example.com. ,LOCALHOST:08080", problems) == (
        "shop.example.com",
        "*.apps.example.net",
        "localhost:8080",
        "[::1]:8443",
        "127.0.0.1",
    )
    assert problems == []


@pytest.mark.parametrize(
    "entry",
    [
        "https://example.com",
        "example.com/path",
        "*",
        "*example.com",
        "ex*ample.com",
        "example.com:0",
        "example.com:65536",
        "example.com:",
        "exa mple.com",
        "::1",
        "[::1",
        "*.[::1]",
        "user@example.com",
    ],
)
def test_bad_entries_are_configuration_errors(entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ALLOWED_HOSTS": f"ok.example, {entry}"}, dotenv_path=None)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"ALLOWED_HOSTS entry {entry!r} is not valid")


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("shop.example.com", True),
        ("SHOP.EXAMPLE.COM", True),
        ("shop.example.com.", True),
        ("shop.example.com:8443", True),  # a port-less entry: any port
        ("a.apps.example.net", True),
        ("a.b.apps.example.net:9", True),
        ("apps.example.net", False),  # the wildcard is for names under it only
        ("evilapps.example.net", False),
        ("localhost:8080", True),
        ("localhost", False),  # the entry pins the port
        ("localhost:80", False),
        ("localhost:08080", True),
        ("[::1]:8443", True),
        ("[::1]", False),
        ("127.0.0.1", True),
        ("127.0.0.1:1234", True),
        ("", False),
        (FOREIGN, False),
        ("shop.example.com.attacker.example", False),
        ("shop.example.com@attacker.example", False),
        ("shop.example.com:80:80", False),
        ("x/.apps.example.net", False),
        ("[::1]:8443x", False),
    ],
)
def test_the_allowlist(host: str, allowed: bool) -> None:
    allowlist = HostAllowlist(parse_allowed_hosts(ALLOWED, []))
    assert allowlist.allows(host) is allowed
    assert allowlist.allows(host) is allowed  # the cache of allowed hosts agrees


def test_split_host() -> None:
    assert split_host("Example.COM.:0443") == ("example.com", "443")
    assert split_host("[::1]:80") == ("[::1]", "80")
    assert split_host("[nope]") is None


# -- through HTTP -----------------------------------------------------------------------------


@pytest.fixture
async def gw(upstream: ServedUpstream) -> AsyncIterator[RunningGateway]:
    settings = app_settings(upstream.base, {"ALLOWED_HOSTS": ALLOWED, "HOST": "127.0.0.1"})
    async with run_gateway(settings) as running:
        yield running


def stored_sessions(gw: RunningGateway) -> int:
    backend = gw.app[BACKEND_KEY]
    assert isinstance(backend, MemoryBackend)
    return len(backend)


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/apps/shop/session", {}),
        ("PATCH", "/apps/shop/session", CSRF),
        ("POST", "/apps/shop/session/rotate", CSRF),
        ("DELETE", "/apps/shop/session", CSRF),
        ("GET", "/apps/shop/agent/chat", {}),
        ("POST", "/apps/shop/agent/chat", CSRF),
        ("OPTIONS", "/apps/shop/agent/chat", {}),
        ("GET", "/", {}),
        ("GET", "/static/app.js", {}),
        ("GET", "/nope", {}),
    ],
)
async def test_a_foreign_host_is_421_before_any_session_or_upstream_work(
    upstream: ServedUpstream, gw: RunningGateway, method: str, path: str, headers: dict[str, str]
) -> None:
    async with gw.client.request(
        method, path, json={"a": 1}, headers={**headers, "Host": FOREIGN}
    ) as resp:
        assert resp.status == 421, (method, path)
        body = await resp.json()
        assert body["error"]["code"] == "host_not_allowed"
        assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
        assert "Set-Cookie" not in resp.headers
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert upstream.fake.seen == []
    assert stored_sessions(gw) == 0


async def test_listed_hosts_are_served(upstream: ServedUpstream, gw: RunningGateway) -> None:
    for host in ("shop.example.com", "a.apps.example.net:8080", "localhost:8080", "127.0.0.1"):
        async with gw.client.patch(
            "/apps/shop/session", json={"a": 1}, headers={**CSRF, "Host": host}
        ) as resp:
            assert resp.status == 200, host
        async with gw.client.post(
            "/apps/shop/agent/chat", json={}, headers={**CSRF, "Host": host}
        ) as resp:
            assert resp.status == 200, host
    assert len(upstream.fake.seen) == 4


async def test_probes_and_metrics_answer_whatever_the_host(gw: RunningGateway) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        for host in ("10.1.2.3:8080", FOREIGN):
            async with gw.client.get(path, headers={"Host": host}) as resp:
                assert resp.status == 200, (path, host)
    # Only those exact paths: what the router would match differently is checked.
    async with gw.client.get("/healthz/", headers={"Host": FOREIGN}) as resp:
        assert resp.status == 421


async def test_behind_a_trusted_proxy_host_and_forwarded_host_must_both_be_listed(
    upstream: ServedUpstream,
) -> None:
    env = {"ALLOWED_HOSTS": ALLOWED, "TRUSTED_PROXIES": "127.0.0.1/32"}
    async with run_gateway(app_settings(upstream.base, env)) as gw:
        # The shipped nginx: Host and X-Forwarded-Host are both the browser's Host.
        ok = {"Host": "shop.example.com", "X-Forwarded-Host": "shop.example.com"}
        async with gw.client.get("/apps/shop/session", headers=ok) as resp:
            assert resp.status == 200
        # A proxy passing a rebinding page's own X-Forwarded-Host through (fetch may set it):
        # neither name vouches for the other.
        for host, forwarded in [
            ("shop.example.com", FOREIGN),
            (FOREIGN, "shop.example.com"),
            ("gateway.internal:8080", "shop.example.com"),  # a rewritten Host: list it too
        ]:
            headers = {"Host": host, "X-Forwarded-Host": forwarded}
            async with gw.client.get("/apps/shop/session", headers=headers) as resp:
                assert resp.status == 421, (host, forwarded)
        # Without X-Forwarded-Host the proxy's Host is what the browser asked for.
        async with gw.client.get("/apps/shop/session", headers={"Host": FOREIGN}) as resp:
            assert resp.status == 421
        async with gw.client.get("/apps/shop/session", headers={"Host": "127.0.0.1"}) as resp:
            assert resp.status == 200


async def test_an_untrusted_peer_cannot_vouch_for_itself_with_x_forwarded_host(
    gw: RunningGateway,
) -> None:
    headers = {"Host": FOREIGN, "X-Forwarded-Host": "shop.example.com"}
    async with gw.client.get("/apps/shop/session", headers=headers) as resp:
        assert resp.status == 421


async def test_without_the_setting_every_host_is_served(upstream: ServedUpstream) -> None:
    async with run_gateway(app_settings(upstream.base)) as gw:
        resp = await gw.client.get("/apps/shop/session", headers={"Host": FOREIGN})
        assert resp.status == 200


# -- a real process ---------------------------------------------------------------------------


@pytest.mark.system
def test_a_bad_entry_stops_a_real_process_with_exit_2() -> None:
    code, stderr, _ = run_gateway_to_exit({"ALLOWED_HOSTS": "example.com,https://example.com/"})
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(
        "agent-bff: configuration error: ALLOWED_HOSTS entry 'https://example.com/' is not valid"
    )


@pytest.mark.system
def test_an_open_gateway_beyond_loopback_warns_at_start_and_a_listed_one_does_not() -> None:
    warning = "ALLOWED_HOSTS is empty"
    with GatewayProcess({"HOST": "0.0.0.0"}) as proc:
        assert warning in proc.stderr + proc.stdout
    with GatewayProcess({"HOST": "127.0.0.1"}) as proc:
        assert warning not in proc.stderr + proc.stdout
    with GatewayProcess({"HOST": "0.0.0.0", "ALLOWED_HOSTS": "127.0.0.1"}) as proc:
        assert warning not in proc.stderr + proc.stdout
        assert proc.get_status("/healthz") == 200


@pytest.mark.usefixtures("parser_gateway")
def test_two_host_headers_are_refused_by_both_parsers_before_any_check(
    request: pytest.FixtureRequest,
) -> None:
    """The allowlist reads one `Host`; a request with two (one listed, one foreign) must never
    reach it: aiohttp's C and pure-Python parsers both answer 400 and no handler runs."""
    gateway: ParserGateway = request.getfixturevalue("parser_gateway")
    gateway.recorder.clear()
    for hosts in (("127.0.0.1", FOREIGN), (FOREIGN, "127.0.0.1")):
        head = "".join(f"Host: {host}\r\n" for host in hosts)
        raw = f"GET /apps/shop/agent/x HTTP/1.1\r\n{head}Connection: close\r\n\r\n"
        answer = asyncio.run(exchange(gateway.proc.port, raw.encode()))
        assert statuses(answer) == [400], (gateway.parser, hosts, answer[:200])
    assert gateway.recorder.paths() == []

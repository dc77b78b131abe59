"""The session cookie is read without aiohttp's full cookie parser, with the same result.

`SessionStorage.load_cookie` reads plain `Cookie` headers itself; for every header it must give
what aiohttp's parser or a browser's framing (split at every ";") finds, with the
cookie-tossing rule of `app.sessions.cookies` applied: of the values under our name that are
well-formed session ids, the one distinct value, or none when there are several.
"""

from __future__ import annotations

import random
from typing import cast

import pytest
from aiohttp import web
from aiohttp._cookie_helpers import parse_cookie_header
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from app.sessions.memory import MemoryBackend
from app.sessions.storage import SESSION_ID_RE, SessionStorage, new_session_id
from tests.conftest import CSRF, GatewayFactory

SID = "A" * 20 + "b-_" + "9" * 20
OTHER = new_session_id()


def _storage(cookie_name: str = "agent_sid") -> SessionStorage:
    return SessionStorage(MemoryBackend(), cookie_name=cookie_name)


class _Request(dict[object, object]):
    """What `load_cookie` uses of a request (`make_mocked_request` is too slow for thousands);
    `cookies` is aiohttp's own property, so its parser."""

    def __init__(self, header: str | None) -> None:
        super().__init__()
        self.headers = CIMultiDict[str]() if header is None else CIMultiDict(Cookie=header)
        self._cache: dict[str, object] = {}  # where aiohttp's `reify` keeps `cookies`

    cookies = web.BaseRequest.cookies


def _request(header: str | None) -> web.Request:
    return cast(web.Request, _Request(header))


def _browser_split(header: str, name: str) -> list[str]:
    """The values under `name` as a browser frames them: pairs split at every ";", blanks
    around, surrounding double quotes removed."""
    values = []
    for pair in header.split(";"):
        key, equals, value = pair.partition("=")
        if equals and key.strip(" \t") == name:
            value = value.strip(" \t")
            values.append(value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value)
    return values


def _expected(header: str, name: str) -> str | None:
    """What aiohttp's parser or a browser's framing finds under `name`, keeping well-formed
    ids only: the one distinct value, else None (absent, or ambiguous)."""
    candidates = [morsel.value for key, morsel in parse_cookie_header(header) if key == name]
    found = {v for v in [*candidates, *_browser_split(header, name)] if SESSION_ID_RE.fullmatch(v)}
    return found.pop() if len(found) == 1 else None


CRAFTED = [
    "",
    f"agent_sid={SID}",
    f"agent_sid={SID}x",
    f"agent_sid={SID[:-1]}",
    f"agent_sid={SID}; other=1",
    f"other=1; agent_sid={SID}",
    f"other=1;agent_sid={SID}",
    f"agent_sid={SID}; agent_sid={OTHER}",
    f"agent_sid={OTHER}; agent_sid={SID}",
    f"agent_sid={SID}; agent_sid={SID}",
    f"agent_sid={SID};agent_sid={OTHER}",
    f'agent_sid="{SID}"; agent_sid={SID}',
    f'agent_sid="{OTHER}"; agent_sid={SID}',
    f"agent_sid={OTHER}; agent_sid=junk",
    f"agent_sid=junk; agent_sid={OTHER}",
    f"agent_sid=; agent_sid={OTHER}",
    f'agent_sid="{SID}"',
    f'other="a;b"; agent_sid={SID}',
    f'other="a; agent_sid={OTHER}"; agent_sid={SID}',
    f'other="a; agent_sid={OTHER}"',
    f"agent_sid = {SID}",
    f" agent_sid={SID}",
    f"agent_sid={SID} ",
    f"agent_sid={SID};",
    f"agent_sid={SID};  other=2",
    f"agent_sid={SID}\tother=2",
    f"agent_sid={SID} other=2",
    f"xagent_sid={SID}",
    f"agent_sidx={SID}",
    f"Agent_sid={SID}",
    f"agent_sid={SID}=",
    f"agent_sid={SID},other=1",
    f"flag; agent_sid={SID}",
    f"agent_sid; agent_sid={SID}",
    f"agent_sid={SID}; flag",
    f"expires=Wed, 09 Jun 2021 10:18:14 GMT; agent_sid={SID}",
    f"a=Wed Jun  9 10:18:14 2021; agent_sid={SID}",
    f"a=b=c; agent_sid={SID}",
    f"a\\b=1; agent_sid={SID}",
    f"_ga=GA1.1.1234.5678; agent_sid={SID}; theme=dark",
]


@pytest.mark.parametrize("header", CRAFTED)
def test_crafted_headers_read_as_aiohttp_reads_them(header: str) -> None:
    request = make_mocked_request("GET", "/", headers={"Cookie": header})
    assert request.cookies == _Request(header).cookies  # the stand-in parses as a request does
    assert _storage().load_cookie(request) == _expected(header, "agent_sid")


def test_random_headers_read_as_aiohttp_reads_them() -> None:
    pieces = [
        "agent_sid",
        "agent_sid=",
        SID,
        OTHER,
        "=",
        ";",
        "; ",
        " ",
        '"',
        "\\",
        ",",
        "a",
        "x=1",
        "Wed, ",
        "\t",
        "%2F",
        ".",
        "é",
    ]
    rng = random.Random(4711)
    storage = _storage()
    for _ in range(20_000):
        header = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        assert storage.load_cookie(_request(header)) == _expected(header, "agent_sid"), header


def test_other_cookie_names() -> None:
    for name in ("sid", "my.sid", "my-sid"):
        storage = _storage(name)
        for header in (f"{name}={SID}", f"a=1; {name}={SID}", f"agent_sid={SID}"):
            assert storage.load_cookie(_request(header)) == _expected(header, name)


def test_no_cookie_header() -> None:
    assert _storage().load_cookie(_request(None)) is None


async def test_session_found_with_and_without_other_cookies(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory("memory")
    created = await gw.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)
    sid = created.cookies["agent_sid"].value
    gw.client.session.cookie_jar.clear()
    for header in (
        f"agent_sid={sid}",
        f"theme=dark; agent_sid={sid}",
        f'note="x;y"; agent_sid={sid}',
        f'agent_sid="{sid}"',
    ):
        response = await gw.client.get("/apps/demo/session", headers={"Cookie": header})
        assert (await response.json()) == {"data": {"a": 1}}, header
    for header in (f"agent_sid={sid}x", f"agent_sid={sid[:-1]}", f"xagent_sid={sid}"):
        response = await gw.client.get("/apps/demo/session", headers={"Cookie": header})
        assert (await response.json()) == {"data": {}}, header

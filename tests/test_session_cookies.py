"""The session cookie is read as a browser frames the `Cookie` header, without aiohttp's parser.

`SessionStorage.load_cookie` (via `app.sessions.cookies`) splits the header itself. For every
header it must give what a browser's framing (split at every ";") names, with the
cookie-tossing rule applied: of the values under our name that are well-formed session ids,
the one distinct value, or none when there are several. On the headers browsers write it must
read exactly what aiohttp's own (public) `request.cookies` reads; on hostile headers where
aiohttp's parser reads cookies no browser set, it must not follow it.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from app.sessions import cookies as cookies_module
from app.sessions.cookies import SESSION_ID_RE, cookie_values
from app.sessions.ids import new_session_id
from app.sessions.memory import MemoryBackend
from app.sessions.storage import SessionStorage
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
    """What a browser's framing finds under `name`, keeping well-formed ids only: the one
    distinct value, else None (absent, or ambiguous)."""
    found = {v for v in _browser_split(header, name) if SESSION_ID_RE.fullmatch(v)}
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


# Ids without the random id, so that every collection (and every xdist worker) names them alike.
@pytest.mark.parametrize("header", CRAFTED, ids=lambda header: header.replace(OTHER, "<other>"))
def test_crafted_headers_read_as_a_browser_frames_them(header: str) -> None:
    request = make_mocked_request("GET", "/", headers={"Cookie": header})
    assert request.cookies == _Request(header).cookies  # the stand-in parses as a request does
    assert _storage().load_cookie(request) == _expected(header, "agent_sid")


# RFC 6265 cookie-octets (what browsers write in values), and token characters for names.
_VALUE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\')
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.~!#$&'*+^`|"


def test_browser_written_headers_read_as_aiohttps_request_cookies() -> None:
    """On the headers browsers write (`name=value` pairs of cookie characters, values
    optionally in double quotes, joined by "; "), the module reads exactly what aiohttp's
    public `request.cookies` reads: for every name, its value (aiohttp keeps the last of a
    repeated name; `cookie_values` keeps them all, in order)."""
    rng = random.Random(2026)
    compared = 0
    for _ in range(5_000):
        pairs = []
        for _ in range(rng.randint(1, 6)):
            name = rng.choice(["agent_sid", "theme", "_ga", "a"]) if rng.random() < 0.5 else ""
            name = name or "".join(rng.choice(_NAME_CHARS) for _ in range(rng.randint(1, 8)))
            if name.startswith("$"):
                continue  # RFC 2109 attributes ($Version, $Path) are not cookies to aiohttp
            value = rng.choice([SID, OTHER, ""]) if rng.random() < 0.3 else ""
            value = value or "".join(rng.choice(_VALUE_CHARS) for _ in range(rng.randint(0, 12)))
            pairs.append((name, f'"{value}"' if rng.random() < 0.2 else value))
        header = "; ".join(f"{name}={value}" for name, value in pairs)
        cookies = _Request(header).cookies
        for name, _ in pairs:
            values = cookie_values(header, name)
            assert cookies[name] == values[-1], (header, name)
            compared += 1
        assert sorted(cookies) == sorted({name for name, _ in pairs}), header
        assert _storage().load_cookie(_request(header)) == _expected(header, "agent_sid")
    assert compared > 10_000


@pytest.mark.parametrize(
    ("header", "aiohttp_reads"),
    [
        # Resynchronises after blanks: a cookie no browser set (a value with a space in it).
        (f"x=1 agent_sid={SID}", SID),
        (f"Wed, agent_sid={SID}", SID),
        # Honours quotes across ";": ours hidden inside a planted quoted value (smuggling).
        (f'a="x; agent_sid={SID}; b=y"', None),
    ],
)
def test_hostile_headers_are_read_as_a_browser_frames_them_not_as_aiohttp_does(
    header: str, aiohttp_reads: str | None
) -> None:
    """Where aiohttp's parser and a browser's framing differ, the browser's framing decides:
    the first two name no `agent_sid` pair (nothing is read), the third one names ours."""
    assert _Request(header).cookies.get("agent_sid") == aiohttp_reads
    expected = SID if header.startswith('a="') else None
    assert _storage().load_cookie(_request(header)) == expected


def test_the_session_cookie_module_imports_no_cookie_parser() -> None:
    """House rule: no reliance on another library's private internals (it imported
    `aiohttp._cookie_helpers.parse_cookie_header`)."""
    tree = ast.parse(Path(cookies_module.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "re", "collections.abc", "typing"}, imported


def test_random_headers_read_as_a_browser_frames_them() -> None:
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

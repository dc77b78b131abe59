"""Which session id a request's `Cookie` header names: the cookie-tossing rule.

The gateway sets one cookie per application, `{SESSION_COOKIE_NAME}=<id>; Path=/apps/{appId}`,
host-only (no `Domain`). A browser also sends, under the same name, any cookie someone else
planted where it matches the request: a sibling subdomain's `Domain=example.com; Path=/`, or
script on another path of this origin with `document.cookie`. The `Cookie` header carries no
attributes, so nothing in it says which one is ours, and the order does not either: browsers send
longer paths first (a planted `Path=/apps/a/agent` comes before ours on that path), then older
cookies first. So:

- **One distinct well-formed value: that is the session id**, however often it is repeated.
- **Two or more distinct well-formed values: no session id at all** (`ambiguous`). The request
  is served as having no session (reads are empty; a write starts a fresh server-minted session,
  whose cookie replaces ours at our path). The victim of a planted cookie is logged out of that
  application, never logged into the attacker's session; the caller logs it, without values.
- A value that is not a well-formed session id (`SESSION_ID_RE`) can name no session, so it is
  ignored rather than counted (a planted `agent_sid=junk` cannot log anyone out).

Every `Cookie` header of the request is read (HTTP/2 may split the cookies over several).
A header is read both as a browser writes it (pairs split at every ";", a value's surrounding
double quotes removed) and as aiohttp's own parser reads it (which lets a quoted value span
";"), and every value either finds counts. Browsers do not treat quotes specially, so planted
cookies `a="x` and `b=y"` around ours would otherwise hide ours inside one quoted value from
aiohttp's parser while a planted `agent_sid` outside it stayed visible (cookie smuggling).
aiohttp keeps only the last value of a repeated name, so its list of pairs is walked instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from aiohttp._cookie_helpers import parse_cookie_header

SESSION_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{43}$")
# A `Cookie` header made only of `name=value` pairs of plain characters (no quotes, commas,
# backslashes or inner whitespace), separated by ";" and at most one space. aiohttp's parser
# reads such a header as exactly its pairs, split at ";" and at the first "=" of each: it is
# split here without building a `Morsel` per cookie. Any other header goes through aiohttp's
# parser.
_COOKIE_PAIR = r"[A-Za-z0-9_.~+/:%-]+=[A-Za-z0-9_.~+/:%=-]*"
_PLAIN_COOKIE_HEADER_RE: Final = re.compile(rf"{_COOKIE_PAIR}(?:; ?{_COOKIE_PAIR})*")


class Ambiguous:
    """The header names two or more distinct session ids (`AMBIGUOUS`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "AMBIGUOUS"


AMBIGUOUS: Final = Ambiguous()


def cookie_values(header: str, name: str) -> list[str]:
    """Every value of cookie `name` in `header`: as a browser splits it, then as aiohttp's
    parser reads it (see the module docstring; a header of plain pairs reads the same both
    ways, and is split once)."""
    values = []
    for pair in header.split(";"):
        found_name, equals, value = pair.partition("=")
        if equals and found_name.strip(" \t") == name:
            value = value.strip(" \t")
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            values.append(value)
    if not _PLAIN_COOKIE_HEADER_RE.fullmatch(header):
        values += (
            morsel.value for found_name, morsel in parse_cookie_header(header) if found_name == name
        )
    return values


def named_session_ids(headers: Iterable[str], name: str) -> set[str]:
    """Every distinct well-formed session id the `Cookie` headers name under `name` (a logout
    with ambiguous cookies ends them all: the user's own is among them)."""
    return {
        value
        for header in headers
        for value in cookie_values(header, name)
        if SESSION_ID_RE.fullmatch(value)
    }


def choose_session_id(headers: Iterable[str], name: str) -> str | Ambiguous | None:
    """The session id the `Cookie` headers `headers` name under `name` (see the module
    docstring): the one distinct well-formed value; `AMBIGUOUS` for two or more; None for none.
    """
    chosen: str | None = None
    for header in headers:
        for value in cookie_values(header, name):
            if not SESSION_ID_RE.fullmatch(value) or value == chosen:
                continue
            if chosen is not None:
                return AMBIGUOUS
            chosen = value
    return chosen

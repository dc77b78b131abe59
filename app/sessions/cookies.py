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
A header is read as a browser writes it, and only so: pairs split at every ";", blanks (space,
HTAB) around names and values removed, a value's surrounding double quotes removed (RFC 6265
allows them; browsers keep them as part of the value and never give them a meaning). The
gateway is the only reader of the header (it never goes upstream), so this framing decides.
Parsers that honour quotes or resynchronise after whitespace (aiohttp's `request.cookies`,
`http.cookies`) read other values out of hostile headers: a planted `a="x; agent_sid=<ours>;
b=y"` hides ours from them (cookie smuggling, issue 12 row 3), and `x=1 agent_sid=<id>` shows
them a cookie no browser set. Neither is used: on the headers browsers write (`name=value`
pairs of cookie characters joined by "; ") they read exactly what this module reads, which
tests/test_session_cookies.py checks against aiohttp's public `request.cookies`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

SESSION_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{43}$")


class Ambiguous:
    """The header names two or more distinct session ids (`AMBIGUOUS`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "AMBIGUOUS"


AMBIGUOUS: Final = Ambiguous()


def cookie_values(header: str, name: str) -> list[str]:
    """Every value of cookie `name` in `header`, in order, as a browser frames the header (see
    the module docstring): repeats are all kept (a planted cookie repeats our name)."""
    values = []
    for pair in header.split(";"):
        found_name, equals, value = pair.partition("=")
        if equals and found_name.strip(" \t") == name:
            value = value.strip(" \t")
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            values.append(value)
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

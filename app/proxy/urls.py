"""URL policy of the agent proxy, pure functions: the upstream URL built from the browser's
raw path (`build_upstream_url`, 400 `invalid_path` on anything that could leave the upstream
base) and whether an upstream's redirect would take the browser to another application of this
gateway (`redirect_leaves_application`, with `browser_host`: a host as a browser reads it).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import unquote

from aiohttp import web
from yarl import URL

from app.applications import AppConfig
from app.config import Settings
from app.forwarding import client_host
from app.proxy.errors import InvalidPath

# RFC 3986 pchar, minus `@` (userinfo tricks are refused outright).
_SEGMENT_RE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})+$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

# `Location` text a browser's URL parser and yarl may read differently: never followed to this
# host (see `redirect_leaves_application`).
_UNSAFE_LOCATION_RE = re.compile(r"[^\x21-\x5b\x5d-\x7e]|%(?:2[eEfF]|5[cC])")
_PLACEHOLDER_HOST = "gateway.invalid"
_HEX = frozenset("0123456789abcdef")
_PLACEHOLDER_ORIGIN = f"https://{_PLACEHOLDER_HOST}"


@functools.lru_cache(maxsize=1024)
def build_upstream_url(base: URL, raw_tail: str, raw_query: str) -> URL:
    """`{base}/{raw_tail}?{raw_query}`, refusing anything that could leave `base`.

    `raw_tail` is the still percent-encoded path after `/agent/`; it is forwarded as is (no
    re-encoding), after every segment was checked in its decoded forms. A pure function of
    its arguments, so its results are cached (agent paths repeat; a refusal is not cached).
    """
    segments = raw_tail.split("/")
    for index, segment in enumerate(segments):
        if segment == "":
            if index == len(segments) - 1:
                continue  # `agent/` (the base itself) or a trailing slash
            raise InvalidPath("empty path segment")
        if not _SEGMENT_RE.match(segment):
            raise InvalidPath("characters not allowed in a path segment")
        # Decode until stable (bounded): a double-encoded `%252e%252e` is still `..` to an
        # upstream that decodes twice. Invalid UTF-8 decodes to U+FFFD, which is harmless here.
        decoded = segment
        for _ in range(4):
            again = unquote(decoded, errors="replace")
            if again == decoded:
                break
            decoded = again
        else:
            raise InvalidPath("percent-encoded more than three times")
        # Servlet containers (Tomcat, Jetty) strip path parameters before resolving dot
        # segments: `..;x` is `..` to them. So the part before the first `;` is what counts.
        head = decoded.split(";", 1)[0]
        if head in (".", "..") or any(c in decoded for c in "/\\@"):
            raise InvalidPath("dot segment, slash, backslash or @ in a path segment")
        if _CONTROL_RE.search(decoded):
            raise InvalidPath("control character in a path segment")
    base_path = base.raw_path.rstrip("/")
    target = URL(
        f"{base.scheme}://{base.raw_authority}{base_path}/{raw_tail}"
        + (f"?{raw_query}" if raw_query else ""),
        encoded=True,
    )
    if (
        (target.scheme, target.raw_host, target.port) != (base.scheme, base.raw_host, base.port)
        or target.user is not None
        or not target.raw_path.startswith(base_path + "/")
    ):
        raise InvalidPath("the path leaves the upstream base")
    return target


def redirect_leaves_application(
    locations: list[str], request: web.Request, app: AppConfig, settings: Settings
) -> bool:
    """True when a redirect of the upstream's would take the browser to another path of the
    gateway's host than `/apps/{applicationId}/` (another application, with that
    application's cookies and, for a 307/308 of a `fetch`, the same method, body and
    `X-CSRF: 1`). Another host is not this gateway's business (an identity provider, say).

    `Location` is resolved as a browser would, against the URL the browser asked for. Text a
    browser reads differently from a URL library (anything but visible ASCII, backslashes,
    encoded `.`, `/` or `\\`) or that does not parse counts as leaving; so do several
    `Location`s. Hosts are compared as the browser canonicalizes them (`browser_host`: IPv4
    in any spelling, case, a trailing dot; a host it cannot vouch for counts as this one),
    against the one the browser used (`client_host`), any port or scheme (cookies ignore both).
    """
    if not locations:
        return False
    if len(locations) > 1 or _UNSAFE_LOCATION_RE.search(locations[0]):
        return True
    try:
        base = URL(_PLACEHOLDER_ORIGIN + request.rel_url.raw_path, encoded=True)
        target = base.join(URL(locations[0]))
    except ValueError:
        return True
    host = target.raw_host
    if host is not None and host != _PLACEHOLDER_HOST:
        canonical = browser_host(host)
        if canonical is None:
            return True  # a host the browser may read as ours: not worth the doubt
        if canonical != _own_host(client_host(request, settings.trusted_proxies)):
            return False
    return not target.raw_path.startswith(f"/apps/{app.app_id}/")


def browser_host(host: str) -> str | None:
    """`host` (ASCII, from a URL) as a browser's URL parser leaves it (WHATWG URL, host
    parsing): lower case; an IPv4 address in any of the forms browsers accept (`0x7f.1`,
    `2130706433`, `0177.0.0.1`, a trailing dot) as its dotted quad; IPv6 compressed. None when
    unsure: a percent sign or non-ASCII (browsers decode and map those), an IPv4-looking host
    that does not parse (the browser refuses the URL, or reads it as something else)."""
    host = host.lower()
    if not host.isascii() or "%" in host:
        return None
    if host.startswith("[") or ":" in host:
        try:
            return str(ipaddress.IPv6Address(host.strip("[]")))
        except ValueError:
            return None
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    last = parts[-1]
    if not (last.isdigit() or (last.startswith("0x") and all(c in _HEX for c in last[2:]))):
        return host.rstrip(".")  # a domain name, not an IPv4 address
    numbers: list[int] = []
    for part in parts:
        try:
            if part.startswith("0x"):
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part, 8))
            else:
                numbers.append(int(part, 10))
        except ValueError:
            return None
    if len(numbers) > 4 or any(n > 255 for n in numbers[:-1]):
        return None
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        return None
    value = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        value += number * 256 ** (3 - index)
    return str(ipaddress.IPv4Address(value))


def _own_host(authority: str) -> str | None:
    """The browser's host of `authority` (`gw.example:8443`, `[::1]:80`), see `browser_host`."""
    try:
        host = URL(f"//{authority}").raw_host
    except ValueError:
        return None
    return browser_host(host) if host else None

"""The agent proxy: every method on `/apps/{applicationId}/agent/{path}` streamed to the
application's upstream, byte for byte, with the session bound to the conversation.

Contract, in request order:
- WebSocket upgrades: 501 `websocket_not_supported` (never half-proxied). TRACE, TRACK and
  CONNECT: 405 `method_not_allowed` (an upstream's echo would reveal the configured headers).
  Once open streams were told to stop (shutdown timeout passed): 503 `shutting_down`.
- The upstream URL is `{upstream}/{path}?{query}` from the *raw* request path. A segment that is
  `.`/`..` (also with path parameters: `..;x`), contains `/`, `\\`, `@` or a control character
  (after percent-decoding, repeatedly), or is empty (`//`), is 400 `invalid_path`: nothing in
  the request can reach another host or a path outside the upstream base.
- A declared `Content-Length` over the application's `max_body_bytes` is 413 `body_too_large`
  before the upstream is contacted; a chunked body is cut off (and 413) once it exceeds the cap.
  Bodies of a declared length up to `SMALL_BODY_BYTES` (64 KiB) are read first and sent with
  that length; larger or chunked bodies stream upstream, they are never buffered whole.
- Upstream capacity (app/capacity.py): a slot of the application, of the client address and
  of the process is taken before the session is loaded, one of the session once its id is
  known; a full one is 503 `upstream_busy` (`Retry-After`) at once, nothing sent upstream.
  The slots are returned when the exchange ends, however it ends.
- The session is loaded (which slides its TTL), then the application's rate limits are checked
  (429 `rate_limited`, see `app.ratelimit`). The first agent request of a session mints the
  conversation id (`gw.conversation_id`, random, unrelated to the session id) and creates the
  session; the session is saved *before* the upstream is contacted and before the response
  starts, so a streaming response can never lose it or its cookie.
- An upstream response with `X-Session-Rotate: 1` rotates the session id (new id, same data and
  conversation, old id deleted) before the response starts; the header is not relayed.
- Upstream request headers: see `upstream_request_headers`. Response headers: see
  `browser_response_headers` (every relayed answer is inert in the browser: `PROXIED_CSP`).
  Redirects are not followed; every final status (200-599) passes through. Any other status
  (`101 Switching Protocols` in particular) is 502 `upstream_protocol_error`.
- Upstream refused/unreachable: 502 `upstream_unavailable`. No response headers within
  `connect_timeout_seconds`: 504 `upstream_timeout`. The timer counts from the start of the
  upstream request (a pooled connection included) but is paused while the gateway waits for
  the browser's body bytes: it restarts after each chunk was passed on, so after the whole
  body. A browser body that pauses longer than `BODY_TIMEOUT_SECONDS`, or is not complete
  `UPLOAD_TIMEOUT_SECONDS` (or the application's `upload_timeout_seconds`) after the request
  got here, before the upstream answered: 408 `body_timeout`. An answer
  that is not valid HTTP (status line, framing, header limits, a control character in a
  header): 502 `upstream_protocol_error`.
- Streaming: chunks are relayed as they arrive (bounded reads; `await write()` applies the
  browser's backpressure to the upstream read). Event streams get SSE comment keep-alives after
  `SSE_KEEPALIVE_SECONDS` of upstream silence, but only between events and only while the
  browser is reading (the transport is not above its high-water mark).
- Failure after the response started (upstream reset or truncated body, no bytes for
  `idle_timeout_seconds`, shutdown timeout): an event stream that stands between two events gets
  one `event: error` (`data: {"code": ..., "message": ..., "request_id": ...}`) and closes; any
  other response (or an event stream cut mid-event, where an injected event would be corrupt)
  is aborted, so the browser sees a truncated body, never a clean end.
- The browser disconnecting cancels the upstream request within `DISCONNECT_POLL_SECONDS`, also
  while the upstream is silent (`web.run_app` does not cancel handlers on disconnect, so the
  transport is watched here). A browser that accepts no byte of a waiting answer for
  `idle_timeout_seconds` counts as gone: its connection is aborted (see `_DisconnectWatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import itertools
import json
import logging
import math
import re
import secrets
import sys
import termios
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from app.applications import AppConfig
from app.capacity import AppSlots, UpstreamBusy, client_key, warn_if_clients_look_alike
from app.config import Settings
from app.errors import ApiError, error_response, store_full, store_unavailable
from app.forward_headers import never_forwarded
from app.forwarding import client_host, client_scheme, forwarded_chain
from app.keys import APP_CONFIG_KEY, LIFECYCLE_KEY, REQUEST_ID_KEY, SETTINGS_KEY, UPSTREAM_KEY
from app.lifecycle import Lifecycle
from app.metrics import record_upstream_error, record_upstream_first_byte
from app.ratelimit import enforce_rate_limits
from app.relay_headers import DEFAULT_RELAY_POLICY, RelayPolicy, never_relayed
from app.sessions.backend import StoreFull, StoreUnavailable
from app.sessions.middleware import get_session, rotate_session, update_session
from app.sessions.storage import StoredSession
from app.upstream import StreamStop, request_timeout

log = logging.getLogger(__name__)

CONVERSATION_FIELD = "conversation_id"
THREAD_HEADER = "X-Agent-Thread-Id"
# An upstream response carrying `X-Session-Rotate: 1` gets the session a new id (see `_proxy`).
ROTATE_HEADER = "X-Session-Rotate"
APPLICATION_HEADER = "X-Application-Id"
# How often an open exchange checks that the browser is still connected.
DISCONNECT_POLL_SECONDS = 0.25
# Largest single read from the upstream; bounds what one relay step holds in memory.
READ_CHUNK_BYTES = 64 * 1024
# Request bodies up to this declared length are read whole, then sent upstream as bytes.
SMALL_BODY_BYTES = 64 * 1024
KEEPALIVE_COMMENT = b": keep-alive\n\n"
# The ioctl that reads a TCP socket's unacknowledged send queue (Linux: SIOCOUTQ, the same
# number as TIOCOUTQ); None elsewhere.
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
# Methods never sent upstream (405): TRACE/TRACK make an upstream echo the request it received,
# the application's configured credential headers included; CONNECT asks for a tunnel.
NEVER_PROXIED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
PROXIED_METHODS_ALLOW = "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"
# The only statuses relayed: final ones. Anything else is 502 `upstream_protocol_error`.
RELAYED_STATUSES = (200, 599)
# On every relayed answer, replacing the upstream's: an upstream shares the gateway's origin
# with every other application, so what it sends must never run there (docs/security.md).
# `sandbox` (no `allow-*` token) gives a document an opaque origin without script, forms,
# popups or plugins; `default-src 'none'` loads nothing for it; it cannot be framed. Irrelevant
# to `fetch`/`EventSource` (a policy applies to documents): JSON and event streams still work.
PROXIED_CSP = (
    "sandbox; default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Answers of these types (and any `+xml`) are downloads, never pages of the gateway's origin
# (`Content-Disposition: attachment`): an upstream cannot show its own page there, not even an
# inert one (a fake "session expired, sign in here" notice). `fetch`, `EventSource` and `<img>`
# ignore the header.
PAGE_TYPES = frozenset(
    {
        "",
        "text/html",
        "application/xhtml+xml",
        "image/svg+xml",
        "text/xml",
        "application/xml",
        "text/xsl",
        "multipart/x-mixed-replace",
        "application/pdf",
        "unknown/unknown",
        "application/unknown",
        "*/*",
    }
)
# One plain `type/subtype` (RFC 9110 tokens), lower-cased.
_MIME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
PROXIED_RESPONSE_HEADERS = (
    ("Content-Security-Policy", PROXIED_CSP),
    ("X-Content-Type-Options", "nosniff"),  # no sniffing a `text/plain` or unknown type into HTML
)

# `Link` relations that only describe (pagination, documentation): nothing the browser fetches,
# preconnects to or applies because of them.
SAFE_LINK_RELATIONS = frozenset(
    {
        "next",
        "prev",
        "previous",
        "first",
        "last",
        "self",
        "up",
        "related",
        "alternate",
        "canonical",
        "describedby",
        "help",
        "license",
        "collection",
        "item",
        "edit",
        "type",
        "profile",
        "service-desc",
        "service-doc",
        "service-meta",
        "deprecation",
        "sunset",
        "successor-version",
        "predecessor-version",
        "latest-version",
        "version-history",
        "via",
        "author",
        "index",
    }
)
# `rel` and `rel*` (RFC 8187 form: `UTF-8''preload` is not a safe relation, so it is refused).
# The value is read as Chromium reads it (components/link_header_util): an unquoted value runs
# to the next `;` or `,` (`rel=next preload` is "next preload"), a quoted one to its closing
# quote; quoted and unquoted runs are taken together, quotes dropped, then split on whitespace.
_LINK_REL_RE = re.compile(r'(?i)\brel\*?\s*=((?:"[^"]*"|[^;,"])*)')
# Authentication schemes a browser answers with its own password dialog (on this origin).
_PROMPTING_AUTH_RE = re.compile(r"(?i)(?:^|[\s,])(?:basic|digest|ntlm|negotiate)(?:$|[\s,])")
# The forwarding headers the gateway sends, built from what it believes (app/forwarding.py).
FORWARDING_SENT = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP")

# RFC 3986 pchar, minus `@` (userinfo tricks are refused outright).
_SEGMENT_RE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})+$")
_CONVERSATION_RE = re.compile(r"^[A-Za-z0-9_-]{22,86}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Control characters a header field may not carry (HTAB is allowed, RFC 9110 §5.5).
_HEADER_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# What the gateway forwards in a request header value: HTAB and visible ASCII (and space).
_UNSENDABLE_RE = re.compile(r"[^\t\x20-\x7e]")


# `Location` text a browser's URL parser and yarl may read differently: never followed to this
# host (see `redirect_leaves_application`).
_UNSAFE_LOCATION_RE = re.compile(r"[^\x21-\x5b\x5d-\x7e]|%(?:2[eEfF]|5[cC])")
_PLACEHOLDER_HOST = "gateway.invalid"
_HEX = frozenset("0123456789abcdef")
_PLACEHOLDER_ORIGIN = f"https://{_PLACEHOLDER_HOST}"


class InvalidPath(ValueError):
    """The agent path could escape the upstream base; answered 400 `invalid_path`."""


# -- pure helpers ---------------------------------------------------------------------------


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


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Lower-cased names listed in `Connection` (each of them is hop-by-hop too)."""
    values = headers.getall("Connection", [])
    return {token.strip().lower() for value in values for token in value.split(",")} - {""}


def _accepts_event_stream(headers: CIMultiDictProxy[str]) -> bool:
    return any("text/event-stream" in v.lower() for v in headers.getall("Accept", []))


def upstream_request_headers(
    request: web.Request, app: AppConfig, settings: Settings, conversation_id: str
) -> CIMultiDict[str]:
    """The headers sent upstream for `request`.

    Forwarded from the browser: only the application's allowlist (`app.forward`,
    app/forward_headers.py: `DEFAULT_FORWARDED` plus the application's
    `forward_request_headers`), minus every header named in `Connection`; `Authorization` only
    with `forward_authorization`. Never, whoever sent them (`TRUSTED_PROXIES` included):
    `Cookie`, `Host`, hop-by-hop, forwarding and client-address headers of any kind, original
    URL, method override, proxy-asserted identity, names with a character other than a letter,
    a digit or `-` (the floor, `never_forwarded`).
    Set, from what the gateway believes (app/forwarding.py): `X-Forwarded-For` (the client
    address first, then the trusted proxies it came through, the TCP peer last), `-Proto`,
    `-Host`, `X-Real-IP` (the client address); and `X-Request-Id`, `X-Application-Id`,
    `X-Agent-Thread-Id`; `Accept-Encoding: identity` when the browser asks for an event stream
    (event streams are never compressed). Last, the application's configured `headers`, which
    win over anything else.
    """
    inbound = request.headers
    named = _connection_tokens(inbound) if "Connection" in inbound else None
    names, prefixes = app.forward.names, app.forward.prefixes
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in inbound.items():
        lower = name.lower()
        if not (
            lower in names
            or (prefixes and lower.startswith(prefixes) and not never_forwarded(lower))
            or (lower == "authorization" and app.forward_authorization)
        ) or (named is not None and lower in named):
            continue
        out.add(name, value)
    trusted = settings.trusted_proxies
    hops = forwarded_chain(request, trusted)
    if hops:
        out["X-Forwarded-For"] = ", ".join(hops)
        out["X-Real-IP"] = hops[0]
    out["X-Forwarded-Proto"] = client_scheme(request, trusted)
    host = client_host(request, trusted)
    if host:
        out["X-Forwarded-Host"] = host
    out["X-Request-Id"] = request[REQUEST_ID_KEY]
    out[APPLICATION_HEADER] = app.app_id
    out[THREAD_HEADER] = conversation_id
    if _accepts_event_stream(inbound):
        out["Accept-Encoding"] = "identity"
    for name, value in app.headers.items():
        out.popall(name, None)
        out[name] = value
    return out


def forwardable_headers(headers: CIMultiDictProxy[str]) -> bool:
    """False when a header value (other than `Cookie`, which is never forwarded) has a
    character outside HTAB and visible ASCII.

    aiohttp's two request parsers disagree on such values (obs-text): the C parser passes
    them on, the pure-Python one yields strings its client then refuses to send (a 500). The
    gateway refuses them the same way with either: 400 `invalid_header`, nothing sent.
    """
    # One search over every value (HTAB, the separator, is allowed); only a hit needs the
    # per-header look that leaves `Cookie` out.
    if not _UNSENDABLE_RE.search("\t".join(headers.values())):
        return True
    return not any(
        _UNSENDABLE_RE.search(value) for name, value in headers.items() if name.lower() != "cookie"
    )


def browser_response_headers(
    upstream: CIMultiDictProxy[str], policy: RelayPolicy = DEFAULT_RELAY_POLICY
) -> CIMultiDict[str]:
    """The headers the browser gets for an upstream answer: those of the upstream's the
    application's `policy` relays (app/relay_headers.py: an allowlist over a floor that nothing
    reopens), plus `PROXIED_RESPONSE_HEADERS`.

    Of the relayed names, also dropped: those named in `Connection`; `Link` unless every
    relation in it is navigational (`next`, `prev`, ... in `SAFE_LINK_RELATIONS`: never
    `preload`, `prefetch`, `stylesheet` ...); `WWW-Authenticate` naming a scheme that makes a
    browser prompt for a password (`Basic`, `Digest`, `NTLM`, `Negotiate`).
    `Content-Disposition` is `attachment` (with the upstream's parameters) for an answer a
    browser would show as a page (`PAGE_TYPES`). The floor (`NEVER_RELAYED`,
    `NEVER_RELAYED_PREFIXES`; docs/security.md has why, one by one): hop-by-hop headers,
    cookies, origin-wide controls, document policies the gateway sets itself, CORS,
    instructions to the proxy in front, `Server`, `X-Session-Rotate`.
    """
    named = _connection_tokens(upstream) if "Connection" in upstream else None
    names, prefixes = policy.names, policy.prefixes
    out: CIMultiDict[str] = CIMultiDict()
    page = False  # a `Content-Type` a browser would show as a page of its own
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in names and not (lower.startswith(prefixes) and not never_relayed(lower)):
            continue
        if (
            (named is not None and lower in named)
            or (lower == "link" and not _navigational_link(value))
            or (lower == "www-authenticate" and _PROMPTING_AUTH_RE.search(value) is not None)
        ):
            continue
        if lower == "content-type" and _renders_as_page(value):
            page = True
        out.add(name, value)
    out.extend(PROXIED_RESPONSE_HEADERS)
    if page:
        _force_attachment(out)
    return out


@functools.lru_cache(maxsize=256)
def _renders_as_page(content_type: str) -> bool:
    """A type a browser shows as a page of its own when navigated to (HTML, XML, SVG, PDF ...),
    or one it sniffs (empty, unknown), or a value it may read otherwise than as one plain
    `type/subtype` (Chromium splits `text/plain, text/html` on the comma and takes the last).
    Cached: an upstream's few types repeat."""
    if "," in content_type:
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime in PAGE_TYPES or mime.endswith("+xml") or _MIME_RE.fullmatch(mime) is None


def _force_attachment(headers: CIMultiDict[str]) -> None:
    """`Content-Disposition: attachment`, keeping the upstream's parameters (`filename`)."""
    current = headers.popall("Content-Disposition", [])
    params = current[0].partition(";")[2].strip() if current else ""
    headers["Content-Disposition"] = f"attachment; {params}" if params else "attachment"


def _navigational_link(value: str) -> bool:
    """True when every `rel` of a `Link` value is in `SAFE_LINK_RELATIONS` (anything the
    parse cannot vouch for, e.g. a `rel` inside a URL, only makes it refuse more)."""
    for raw in _LINK_REL_RE.findall(value):
        for relation in raw.replace('"', " ").lower().split():
            if relation not in SAFE_LINK_RELATIONS:
                return False
    return True


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


def has_invalid_header(upstream: aiohttp.ClientResponse) -> bool:
    """True when the upstream's reason phrase or a header carries a control character.

    aiohttp's client parser lets some through (e.g. `\\x01` in a value); its server refuses to
    send them (`ValueError` while the response is being prepared, too late for our error
    envelope), so such an answer is refused as a whole: 502 `upstream_protocol_error`.
    """
    # One search over the reason, every name and every value (HTAB, the separator, is allowed).
    fields = itertools.chain((upstream.reason or "",), *upstream.headers.items())
    return _HEADER_CONTROL_RE.search("\t".join(fields)) is not None


def is_event_stream(headers: CIMultiDictProxy[str]) -> bool:
    """An uncompressed SSE response: the only kind the gateway may add events to."""
    content_type = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    return content_type == "text/event-stream" and encoding in ("", "identity")


def is_websocket_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    return any(
        token.strip().lower() == "websocket"
        for value in headers.getall("Upgrade", [])
        for token in value.split(",")
    )


def ensure_conversation(session: StoredSession) -> str:
    """The session's conversation id (a metadata field, beside the browser's data), minted
    (and the session marked changed) if absent."""
    current = session.meta.get(CONVERSATION_FIELD)
    if isinstance(current, str) and _CONVERSATION_RE.match(current):
        return current
    conversation_id = secrets.token_urlsafe(24)
    session.set_meta(CONVERSATION_FIELD, conversation_id)
    return conversation_id


class _SseBoundary:
    """Tracks whether the bytes sent so far end between two SSE events.

    An event (`event: error` or a keep-alive comment) may only be added there: injected into a
    half-written event it would corrupt both.
    """

    __slots__ = ("tail",)
    _ENDS = (b"\n\n", b"\r\r", b"\n\r", b"\r\n\r\n", b"\r\r\n")

    def __init__(self) -> None:
        self.tail = b"\n\n"

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk[-4:])[-4:]

    @property
    def at_boundary(self) -> bool:
        return self.tail.endswith(self._ENDS)


class _RelayResponse(web.StreamResponse):
    """The relayed response. `prepare()` holds its head back until the first write (aiohttp
    sends it together with those bytes); `_relay` sends it on its own (`_send_head`) as soon as
    no body bytes are ready, so the head never waits for the upstream."""

    _send_headers_immediately = False


# The `StreamReader` internals `take_buffered` and `read_available` rely on (aiohttp 3.14). With
# another aiohttp whose reader lacks any of them, both use aiohttp's public path only.
_READER_FIELDS = frozenset(
    {"_buffer", "_buffer_offset", "_size", "_cursor", "_http_chunk_splits", "_low_water"}
    | {"_low_water_chunks", "_protocol", "_timer", "_exception", "_waiter", "_eof"}
)
FAST_READS = set(getattr(aiohttp.StreamReader, "__slots__", ())) >= _READER_FIELDS and all(
    callable(getattr(aiohttp.StreamReader, name, None)) for name in ("_wait", "_read_nowait")
)


def take_buffered(content: aiohttp.StreamReader, limit: int) -> bytes:
    """`content.read_nowait(limit)` in one step: the bytes `content` holds now (at most
    `limit`), `b""` when there are none; raises the stream's exception like `read_nowait`.

    aiohttp's `read_nowait` takes one buffered HTTP chunk at a time and asks the connection to
    resume reading after each (a parser call every time): about 1 µs per buffered event, most
    of a relay's read cost when an event stream arrives in bursts. Here the buffer is joined
    at once and the connection resumed once, after it; bytes that this feeds (a paused
    parser's backlog) are left for the next call instead of joining this one. Uses aiohttp's
    `StreamReader` internals (checked against `read_nowait` by tests/test_proxy_fast_relay.py);
    anything unusual (another reader class, an error, a pending waiter, more than `limit`
    bytes, a single chunk) takes aiohttp's own path.
    """
    if (
        not FAST_READS
        or type(content) is not aiohttp.StreamReader  # e.g. the empty body of a HEAD answer
        or content._exception is not None
        or content._waiter is not None
    ):
        return content.read_nowait(limit)
    return _join_buffered(content, limit)


def _join_buffered(content: aiohttp.StreamReader, limit: int) -> bytes:
    """aiohttp's `content._read_nowait(limit)` (no error check), one join for several chunks."""
    buffer = content._buffer
    if len(buffer) < 2 or content._size > limit:
        return content._read_nowait(limit)
    content._timer.assert_timeout()
    offset = content._buffer_offset
    if offset:
        buffer[0] = buffer[0][offset:]
        content._buffer_offset = 0
    data = b"".join(buffer)
    buffer.clear()
    content._size -= len(data)
    content._cursor += len(data)
    splits = content._http_chunk_splits
    if splits is not None:
        cursor = content._cursor
        while splits and splits[0] < cursor:
            splits.popleft()
    if content._size < content._low_water and (
        splits is None or len(splits) < content._low_water_chunks
    ):
        content._protocol.resume_reading()
    return data


async def read_available(content: aiohttp.StreamReader, limit: int) -> bytes:
    """`await content.read(limit)`: wait until `content` has bytes (or its end), then take them
    like `take_buffered` (one join, not one step per HTTP chunk that arrived meanwhile). Waits
    with aiohttp's own `_wait` and takes without an error check, exactly as `read` does;
    another reader class or a stored error takes `read` itself."""
    if (
        not FAST_READS
        or type(content) is not aiohttp.StreamReader
        or content._exception is not None
    ):
        return await content.read(limit)
    while not content._buffer and not content._eof:
        await content._wait("read")
    return _join_buffered(content, limit)


# -- the exchange ---------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


@dataclass(slots=True)
class _Exchange:
    """State shared by the handler, its relay task and the disconnect watcher."""

    request: web.Request
    app: AppConfig
    settings: Settings
    lifecycle: Lifecycle
    response: web.StreamResponse | None = None
    client_gone: bool = False
    body_too_large: bool = False
    body_stalled: bool = False
    # The timer of the upstream's response headers while it runs (see `body`).
    header_deadline: asyncio.Timeout | None = None
    # Upstream capacity (app/capacity.py): what this request holds, returned by
    # `_proxy_holding_slots`; the loop time by which a streamed upload must be complete.
    slots: AppSlots | None = None
    client_key: str | None = None
    session_key: str | None = None
    upload_deadline: float = math.inf

    @property
    def request_id(self) -> str:
        return self.request[REQUEST_ID_KEY]

    def error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        """Our JSON error, carrying any session cookie already set on the stream response."""
        response = error_response(self.request, status, code, message, headers=headers)
        if self.response is not None:
            for name, morsel in self.response.cookies.items():
                response.cookies[name] = morsel
        return response

    def arrived_body(self, cap: int) -> bytes | None:
        """The browser's whole body when all of it has already arrived (typical of a small
        one: it comes with the request head), else None (read it with `body`). Over `cap`
        bytes: `_BodyTooLarge`, as from `body`."""
        content = self.request.content
        if not content.is_eof():
            return None
        data = content.read_nowait(-1)
        if len(data) > cap:
            self.body_too_large = True
            raise _BodyTooLarge
        return data

    async def body(self, cap: int) -> AsyncGenerator[bytes, None]:
        """The browser's body, streamed upstream: cut at `cap` (413 `body_too_large`), at
        a pause over `BODY_TIMEOUT_SECONDS` and at `upload_deadline` (408 `body_timeout`).

        While it waits for the browser, the upstream's header timer (`connect_timeout`) is
        paused: a slow upload is the browser's doing, never a 504. Each chunk handed over (and
        the end of the body) restarts it in full, so it runs while the upstream reads (or
        does not) and after the whole body was sent.
        """
        loop = asyncio.get_running_loop()
        chunks = self.request.content.iter_any()
        received = 0
        pause = self.settings.body_timeout_seconds
        while True:
            self._set_header_deadline(None)
            try:
                async with asyncio.timeout_at(min(loop.time() + pause, self.upload_deadline)):
                    chunk = await anext(chunks, b"")
            except TimeoutError:
                self.body_stalled = True
                raise _BodyStalled from None
            finally:
                self._set_header_deadline(loop.time() + self.app.connect_timeout_seconds)
            if not chunk:
                return
            received += len(chunk)
            if received > cap:
                self.body_too_large = True
                raise _BodyTooLarge
            yield chunk

    def _set_header_deadline(self, when: float | None) -> None:
        deadline = self.header_deadline
        # Once the headers arrived (or the timer fired) the upload may go on: leave it be.
        if deadline is not None and not deadline.expired():
            deadline.reschedule(when)


async def agent_proxy(request: web.Request) -> web.StreamResponse:
    """Handler for every method on `/apps/{applicationId}/agent/{path:.*}`."""
    exchange = _Exchange(
        request=request,
        app=request[APP_CONFIG_KEY],
        settings=request.app[SETTINGS_KEY],
        lifecycle=request.app[LIFECYCLE_KEY],
    )
    inner = asyncio.create_task(_proxy_holding_slots(exchange))
    watcher = _DisconnectWatch(exchange, inner)
    try:
        return await inner
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not exchange.client_gone or (task is not None and task.cancelling()):
            raise
        # A resumable run (app/runs/) outlives its first request: its upstream goes on.
        run = exchange.response is not None and "X-Run-Id" in exchange.response.headers
        log.info(
            "browser disconnected; %s (app %s, request %s)",
            "its run goes on" if run else "upstream request cancelled",
            exchange.app.app_id,
            exchange.request_id,
        )
        if exchange.response is not None and exchange.response.prepared:
            return exchange.response
        return web.Response(status=499)  # nginx's "client closed request", for the access log
    finally:
        watcher.cancel()


def unacknowledged_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds for the peer that it has not acknowledged yet (Linux `SIOCOUTQ`);
    0 where that cannot be read. Called only for a connection whose writing is paused."""
    sock = transport.get_extra_info("socket")
    if sock is None or _SIOCOUTQ is None:
        return 0
    try:
        reply = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(reply, sys.byteorder, signed=True)


class _DisconnectWatch:
    """Every `DISCONNECT_POLL_SECONDS` until `inner` is done: when the browser's transport is
    gone or closing, mark the exchange `client_gone` and cancel `inner`. A timer callback that
    re-arms itself, not a task: nothing runs per request until the first poll is due.

    A browser that stops reading is gone too: when its connection's writing stays paused (the
    gateway's write buffer above its high-water mark) and the browser accepts not one byte of
    it for the application's `idle_timeout_seconds`, the connection is aborted. Otherwise a
    client that never reads would hold its upstream slot and connection for as long as the
    upstream has bytes for it (app/capacity.py). A slow reader that accepts anything is fine.
    """

    __slots__ = ("_buffered", "_exchange", "_handle", "_inner", "_loop", "_stalled_since")

    def __init__(self, exchange: _Exchange, inner: asyncio.Task[web.StreamResponse]) -> None:
        self._exchange = exchange
        self._inner = inner
        self._loop = asyncio.get_running_loop()
        self._stalled_since = 0.0  # while paused: since when the browser accepted nothing
        self._buffered = -1  # the write buffer's size at the last poll while paused, else -1
        self._handle = self._loop.call_later(DISCONNECT_POLL_SECONDS, self._poll)

    def _poll(self) -> None:
        if self._inner.done():
            return
        exchange = self._exchange
        transport = exchange.request.transport
        if transport is None or transport.is_closing():
            exchange.client_gone = True
            self._inner.cancel()
            return
        if exchange.request.protocol.writing_paused:
            # Paused, the relay adds (almost) nothing: what is still to be delivered (our
            # buffer plus the kernel's unacknowledged bytes) only shrinks as the browser
            # reads, so any shrinking is progress.
            buffered = transport.get_write_buffer_size() + unacknowledged_bytes(transport)
            if self._buffered < 0 or buffered < self._buffered:
                self._stalled_since = self._loop.time()
            self._buffered = buffered
            if self._loop.time() - self._stalled_since >= exchange.app.idle_timeout_seconds:
                log.info(
                    "browser read nothing for %ss; connection closed (app %s, request %s)",
                    exchange.app.idle_timeout_seconds,
                    exchange.app.app_id,
                    exchange.request_id,
                )
                exchange.client_gone = True
                transport.abort()
                self._inner.cancel()
                return
        else:
            self._buffered = -1
        self._handle = self._loop.call_later(DISCONNECT_POLL_SECONDS, self._poll)

    def cancel(self) -> None:
        self._handle.cancel()


async def _proxy_holding_slots(exchange: _Exchange) -> web.StreamResponse:
    """`_proxy`, then the upstream slots it took are returned, however it ended (its own
    `finally` has released or closed the upstream response by then)."""
    try:
        return await _proxy(exchange)
    finally:
        if exchange.slots is not None:
            exchange.request.app[UPSTREAM_KEY].capacity.leave(
                exchange.slots, exchange.client_key, exchange.session_key
            )


def _busy(exchange: _Exchange, busy: UpstreamBusy) -> web.Response:
    """503 `upstream_busy` (a body the browser may still be sending is not read: close)."""
    if busy.limit == "client":
        warn_if_clients_look_alike(exchange.request, exchange.settings.trusted_proxies)
    response = exchange.error(busy.status, busy.code, busy.message, headers=busy.headers)
    return _closing(response) if exchange.request.body_exists else response


def _closing(response: web.Response) -> web.Response:
    """`response`, with the connection closed after it: a refused request may leave an unread
    body (or an upgrade attempt) that must not be parsed as the next request."""
    response.force_close()
    return response


async def _proxy(exchange: _Exchange) -> web.StreamResponse:
    request, app, lifecycle = exchange.request, exchange.app, exchange.lifecycle
    if is_websocket_upgrade(request.headers):
        return _closing(
            exchange.error(
                501,
                "websocket_not_supported",
                "WebSocket upgrades are not proxied; use HTTP (SSE).",
            )
        )
    if request.method in NEVER_PROXIED_METHODS:
        return _closing(
            exchange.error(
                405,
                "method_not_allowed",
                "This method is not proxied.",
                headers={"Allow": PROXIED_METHODS_ALLOW},
            )
        )
    if lifecycle.stop_streams.is_set():
        # Past the shutdown timeout: a stream started now would be cut at once. (Before it, a
        # last request on a kept-alive connection is still served, with `Connection: close`.)
        return _closing(
            exchange.error(
                503,
                "shutting_down",
                "This instance is shutting down; retry.",
                headers={"Retry-After": "1"},
            )
        )

    prefix = f"/apps/{app.app_id}/agent/"
    raw_path = request.rel_url.raw_path
    upstream = request.app[UPSTREAM_KEY]
    try:
        if not raw_path.startswith(prefix):
            raise InvalidPath("the path is not under the agent prefix")
        url = build_upstream_url(
            upstream.base_url(app), raw_path[len(prefix) :], request.rel_url.raw_query_string
        )
    except InvalidPath:
        return exchange.error(400, "invalid_path", "The agent path is not allowed.")
    if request.content_length is not None and request.content_length > app.max_body_bytes:
        return _closing(exchange.error(413, "body_too_large", "The request body is too large."))
    if not forwardable_headers(request.headers):
        return exchange.error(
            400, "invalid_header", "A request header has characters that cannot be forwarded."
        )

    # Upstream capacity (app/capacity.py): a slot of the application (and of the client
    # address) before the session is touched: a full limit is 503 at once and creates nothing.
    capacity = upstream.capacity
    slots = capacity.apps[app.app_id]
    client = client_key(request, exchange.settings.trusted_proxies) if slots.per_client else None
    try:
        capacity.enter(slots, client)
    except UpstreamBusy as busy:
        return _busy(exchange, busy)
    exchange.slots, exchange.client_key = slots, client

    # Load (and slide) the session; check the rate limits (before anything is created); mint
    # the conversation on the first agent request and save the session now, before the
    # upstream sees the id and before the response starts. `update_session` re-reads and
    # re-applies on a concurrent write, so racing first requests agree on one conversation.
    session = await get_session(request)
    await enforce_rate_limits(request, session)
    response = _RelayResponse()
    exchange.response = response
    session = await update_session(request, response, ensure_conversation)
    conversation_id = ensure_conversation(session)  # already there: changes nothing
    session_id = session.identity
    if slots.per_session and isinstance(session_id, str):
        try:
            capacity.enter_session(slots, session_id)
        except UpstreamBusy as busy:
            return _busy(exchange, busy)
        exchange.session_key = session_id

    # A small body of declared length is read first and sent as bytes (its Content-Length is
    # forwarded): an async-generator upload costs a payload writer, a task step and a timer
    # per chunk. Reading it happens before the header timer starts, which is the same as that
    # timer being paused while the browser uploads; a stall is 408 as below.
    data: bytes | AsyncIterator[bytes] | None = None
    if request.body_exists:
        upload_timeout = app.upload_timeout_seconds or exchange.settings.upload_timeout_seconds
        exchange.upload_deadline = asyncio.get_running_loop().time() + upload_timeout
        length = request.content_length
        if length is not None and length <= SMALL_BODY_BYTES:
            try:
                data = exchange.arrived_body(app.max_body_bytes)
                if data is None:
                    async with contextlib.aclosing(exchange.body(app.max_body_bytes)) as chunks:
                        data = b"".join([chunk async for chunk in chunks])
            except _BodyTooLarge:
                return _closing(
                    exchange.error(413, "body_too_large", "The request body is too large.")
                )
            except _BodyStalled:
                return _body_stalled(exchange)
        else:
            data = exchange.body(app.max_body_bytes)

    timeout = app.connect_timeout_seconds
    sent = time.perf_counter()  # metrics: time to first byte
    try:
        async with asyncio.timeout(timeout) as deadline:
            exchange.header_deadline = deadline  # paused while the browser uploads
            try:
                upstream_response = await upstream.session.request(
                    request.method,
                    url,
                    headers=upstream_request_headers(
                        request, app, exchange.settings, conversation_id
                    ),
                    data=data,
                    allow_redirects=False,
                    timeout=request_timeout(timeout),
                )
            finally:
                exchange.header_deadline = None
    except (TimeoutError, aiohttp.ClientError, OSError) as err:
        if exchange.body_too_large:
            return _closing(exchange.error(413, "body_too_large", "The request body is too large."))
        if exchange.body_stalled:
            return _body_stalled(exchange)
        if isinstance(err, TimeoutError):
            log.warning(
                "upstream timeout: no response headers within %ss (app %s, request %s)",
                timeout,
                app.app_id,
                exchange.request_id,
            )
            record_upstream_error(request, "timeout")
            return exchange.error(
                504, "upstream_timeout", "The agent service did not answer in time."
            )
        if isinstance(err, aiohttp.ClientResponseError):
            # An answer that is not valid HTTP (status line, framing, header limits): the
            # upstream is broken, not unreachable.
            return _protocol_error(exchange, type(err).__name__)
        log.warning(
            "upstream unavailable: %s (app %s, request %s)",
            type(err).__name__,
            app.app_id,
            exchange.request_id,
        )
        record_upstream_error(request, "unavailable")
        return exchange.error(502, "upstream_unavailable", "The agent service is unavailable.")
    record_upstream_first_byte(request, sent)

    if has_invalid_header(upstream_response):
        upstream_response.close()
        return _protocol_error(exchange, "control character in a response header")
    if not RELAYED_STATUSES[0] <= upstream_response.status <= RELAYED_STATUSES[1]:
        # 101 would make the proxy in front a raw tunnel to this server (docs/security.md);
        # aiohttp's client consumes the other 1xx itself. Never relayed, nor above 599.
        upstream_response.close()
        return _protocol_error(exchange, f"status {upstream_response.status}")
    status = upstream_response.status
    if (
        300 <= status < 400
        and status != 304
        and redirect_leaves_application(
            upstream_response.headers.getall("Location", []), request, app, exchange.settings
        )
    ):
        upstream_response.close()
        log.warning(
            "upstream redirect outside its application refused (app %s, request %s)",
            app.app_id,
            exchange.request_id,
        )
        record_upstream_error(request, "protocol_error")
        return exchange.error(
            502,
            "upstream_redirect_not_allowed",
            "The agent service redirected to another part of this site.",
        )
    if upstream_response.headers.get(ROTATE_HEADER, "").strip() == "1":
        # The upstream asks for a new session id (e.g. after a login step behind the agent):
        # rotate before the browser sees any of the answer; the old id is dead before then.
        try:
            await rotate_session(request, response)
        except (StoreUnavailable, ApiError) as err:
            upstream_response.close()
            # Through `exchange.error`, which keeps the cookie already set on `response`: when
            # this request created the session, that session still exists (the rotated copy
            # was removed) and the browser must learn its id, or the key would be orphaned.
            if isinstance(err, StoreUnavailable):
                log.warning("session store unavailable during a rotation: %s", err)
                err = store_full() if isinstance(err, StoreFull) else store_unavailable()
            return exchange.error(err.status, err.code, err.message, headers=err.headers)
        except BaseException:
            upstream_response.close()
            raise
    if (
        app.resumable
        and upstream_response.status == 200
        and is_event_stream(upstream_response.headers)
    ):
        # Resumable applications (app/runs/): the event stream becomes a run that outlives
        # this request; None when the run store failed (then relayed as below, no resume).
        from app.runs.http import start_run  # app.runs imports this module

        started = await start_run(exchange, response, upstream_response, conversation_id)
        if started is not None:
            return started
    try:
        await _relay(exchange, response, upstream_response, upstream.stop)
    finally:
        # After a complete body this only returns the connection to the pool; otherwise it
        # closes it, which is how the upstream learns the request was abandoned.
        if upstream_response.content.at_eof() and not exchange.client_gone:
            upstream_response.release()
        else:
            upstream_response.close()
    return response


def _body_stalled(exchange: _Exchange) -> web.Response:
    log.info(
        "browser body paused for %ss or not complete by its upload deadline (app %s, request %s)",
        exchange.settings.body_timeout_seconds,
        exchange.app.app_id,
        exchange.request_id,
    )
    return _closing(exchange.error(408, "body_timeout", "The request body did not arrive in time."))


def _protocol_error(exchange: _Exchange, detail: str) -> web.Response:
    log.warning(
        "upstream protocol error: %s (app %s, request %s)",
        detail,
        exchange.app.app_id,
        exchange.request_id,
    )
    record_upstream_error(exchange.request, "protocol_error")
    return exchange.error(
        502, "upstream_protocol_error", "The agent service sent an invalid response."
    )


async def _relay(
    exchange: _Exchange,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
    stop: StreamStop,
) -> None:
    request = exchange.request
    response.set_status(upstream.status, upstream.reason)
    response.headers.extend(browser_response_headers(upstream.headers, exchange.app.relay))
    sse = is_event_stream(upstream.headers)
    if sse or "Content-Length" not in upstream.headers:
        # Streamed answers must not sit in an nginx buffer (X-Accel-Buffering is nginx's
        # per-response switch for proxy_buffering).
        response.headers["X-Accel-Buffering"] = "no"
    if sse:
        response.headers.setdefault("Cache-Control", "no-cache")
    try:
        # The head is held back (`_RelayResponse`): it goes out with the first bytes when they
        # are already here, and on its own (`_send_head`) before anything else happens.
        writer = await response.prepare(request)
    except ConnectionError:
        exchange.client_gone = True
        return
    assert writer is not None

    # One reader loop, no task or wait set per chunk: whatever the upstream already delivered
    # is taken without waiting (several buffered events go out in one write; the last bytes of
    # a complete body go out with its end); only an empty buffer waits, under one deadline
    # (idle timeout, or the next keep-alive of an event stream). The shutdown signal
    # (`stop_streams`, via `stop`) cuts that wait short.
    loop = asyncio.get_running_loop()
    content = upstream.content
    boundary = _SseBoundary()
    idle_timeout = exchange.app.idle_timeout_seconds
    keepalive = exchange.settings.sse_keepalive_seconds
    waiting: list[asyncio.Timeout] = []  # the wait in progress, for the stop callback

    def on_stop() -> None:
        for timeout in waiting:
            if not timeout.expired():
                timeout.reschedule(loop.time())

    stop.subscribe(on_stop)
    last_data = last_write = loop.time()
    try:
        while True:
            if stop.is_set:
                await _fail(
                    exchange, response, writer, sse, boundary, "shutting_down", "shutdown timeout"
                )
                return
            chunk: bytes | None
            try:
                chunk = take_buffered(content, READ_CHUNK_BYTES)
                if not chunk and not content.is_eof():
                    if not _send_head(exchange, writer):
                        return
                    deadline = last_data + idle_timeout
                    if sse:
                        deadline = min(deadline, last_write + keepalive)
                    chunk = None
                    if deadline > loop.time():
                        try:
                            async with asyncio.timeout_at(deadline) as timeout:
                                waiting.append(timeout)
                                try:
                                    chunk = await read_available(content, READ_CHUNK_BYTES)
                                finally:
                                    waiting.clear()
                        except TimeoutError:
                            chunk = None
            # RuntimeError: aiohttp's C response parser, on bad chunk framing mid-body,
            # drops the connection without failing the payload; the next read raises
            # RuntimeError("Connection closed.").
            except (aiohttp.ClientError, OSError, RuntimeError) as err:
                code = "body_too_large" if exchange.body_too_large else "upstream_stream_error"
                await _fail(exchange, response, writer, sse, boundary, code, type(err).__name__)
                return
            if chunk is not None:
                if not chunk:
                    break
                if content.at_eof():
                    # The body is complete: its last bytes and its end in one send.
                    try:
                        await response.write_eof(chunk)
                    except ConnectionError:
                        exchange.client_gone = True
                    return
                if not await _write(exchange, response, chunk):
                    return
                boundary.feed(chunk)
                last_data = last_write = loop.time()
                continue
            # The wait ended without data: shutdown, idle timeout or keep-alive time.
            if stop.is_set:
                continue
            now = loop.time()
            if now >= last_data + idle_timeout:
                await _fail(
                    exchange,
                    response,
                    writer,
                    sse,
                    boundary,
                    "upstream_idle_timeout",
                    "idle timeout",
                )
                return
            if sse and now >= last_write + keepalive:
                # Not while the browser is not reading: the comment would only pile up in
                # the write buffer (and a stalled reader needs no keep-alive).
                if boundary.at_boundary and not request.protocol.writing_paused:
                    if not await _write(exchange, response, KEEPALIVE_COMMENT):
                        return
                    boundary.feed(KEEPALIVE_COMMENT)
                last_write = now
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    finally:
        stop.unsubscribe(on_stop)


def _send_head(exchange: _Exchange, writer: AbstractStreamWriter) -> bool:
    """Send the response head now if it is still held back; False when the browser is gone."""
    try:
        writer.send_headers()
    except ConnectionError:
        exchange.client_gone = True
        return False
    return True


async def _write(exchange: _Exchange, response: web.StreamResponse, data: bytes) -> bool:
    """Write (awaiting drain: the browser's pace); False when the browser is gone."""
    try:
        await response.write(data)
    except ConnectionError:
        exchange.client_gone = True
        return False
    return True


_ERROR_MESSAGES = {
    "upstream_stream_error": "The agent service stream broke off.",
    "upstream_idle_timeout": "The agent service sent nothing for too long.",
    "shutting_down": "This instance is shutting down; retry.",
    "body_too_large": "The request body is too large.",
}


async def _fail(
    exchange: _Exchange,
    response: web.StreamResponse,
    writer: AbstractStreamWriter,
    sse: bool,
    boundary: _SseBoundary,
    code: str,
    detail: str,
) -> None:
    """End a started response so the browser can tell it from a normal end."""
    if code.startswith("upstream_"):
        record_upstream_error(exchange.request, code.removeprefix("upstream_"))
    log.warning(
        "agent stream ended early: %s (%s; app %s, request %s)",
        code,
        detail,
        exchange.app.app_id,
        exchange.request_id,
    )
    response.force_close()
    if sse and boundary.at_boundary:
        payload = {
            "code": code,
            "message": _ERROR_MESSAGES.get(code, code),
            "request_id": exchange.request_id,
        }
        event = f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
        if await _write(exchange, response, event):
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        return
    transport = exchange.request.transport
    if transport is not None:
        _send_head(exchange, writer)  # the browser sees the response start, then the cut
        transport.abort()

"""Header policy of the agent proxy, applied per message: which of the browser's headers go
upstream and what the gateway adds (`upstream_request_headers`), which of the upstream's reach
the browser and what every relayed answer carries (`browser_response_headers`), and the checks
that refuse a message whose headers cannot be passed on (`forwardable_headers`,
`has_invalid_header`). The per-application allowlists and their floors (both directions, one
`HeaderPolicy` type) are app/proxy/header_policy.py.
"""

from __future__ import annotations

import functools
import itertools
import re

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from app.applications import AppConfig
from app.config import Settings
from app.forwarding import client_host, client_scheme, forwarded_chain
from app.keys import REQUEST_ID_KEY
from app.proxy.header_policy import RESPONSES, HeaderPolicy

THREAD_HEADER = "X-Agent-Thread-Id"
# An upstream response carrying `X-Session-Rotate: 1` gets the session a new id (handler.py).
ROTATE_HEADER = "X-Session-Rotate"
APPLICATION_HEADER = "X-Application-Id"

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
# Control characters a header field may not carry (HTAB is allowed, RFC 9110 §5.5).
_HEADER_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# What the gateway forwards in a request header value: HTAB and visible ASCII (and space).
_UNSENDABLE_RE = re.compile(r"[^\t\x20-\x7e]")


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
    app/proxy/header_policy.py: `DEFAULT_FORWARDED` plus the application's
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
    names, prefixes, floor = app.forward.names, app.forward.prefixes, app.forward.floor
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in inbound.items():
        lower = name.lower()
        if not (
            lower in names
            or (prefixes and lower.startswith(prefixes) and not floor(lower))
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
    upstream: CIMultiDictProxy[str], policy: HeaderPolicy = RESPONSES.default
) -> CIMultiDict[str]:
    """The headers the browser gets for an upstream answer: those of the upstream's the
    application's `policy` relays (app/proxy/header_policy.py: an allowlist over a floor that
    nothing reopens), plus `PROXIED_RESPONSE_HEADERS`.

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
    names, prefixes, floor = policy.names, policy.prefixes, policy.floor
    out: CIMultiDict[str] = CIMultiDict()
    page = False  # a `Content-Type` a browser would show as a page of its own
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in names and not (lower.startswith(prefixes) and not floor(lower)):
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

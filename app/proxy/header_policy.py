"""Which headers cross the proxy, per direction: one `HeaderPolicy` type, an allowlist over
a floor that nothing reopens. The decisions and their reasons are in docs/security.md
("Forwarding headers", "Response headers an upstream may not set").

Requests (browser -> upstream, `REQUESTS`). The headers an upstream (its framework, a library,
its own proxy) takes as the word of "its proxy" are an open set (every CDN, PaaS and
authenticating proxy has its own client-address or identity header), so no deny list can be
complete; what a frontend needs to send an agent API is a short, known set:
- `DEFAULT_FORWARDED`: content and negotiation headers, conditionals, `User-Agent`,
  `Referer`, `Origin`, `Last-Event-ID`, `Idempotency-Key`, `Prefer`, trace context ...;
- `Authorization`, when the application sets `forward_authorization = true`;
- the application's own `forward_request_headers` from `APPS_FILE`: names, or prefixes ending
  in `*` (`"X-Stainless-*"`; `"*"` alone forwards every name the floor allows).
The floor (`never_forwarded`): hop-by-hop, `Cookie`, `Host`, the gateway's own headers,
forwarding, client-address, original URL, method-override and proxy-identity headers (by name,
prefix and word), and every name with a character other than a letter, a digit or `-`.

Responses (upstream -> browser, `RESPONSES`). An upstream shares the gateway's origin with every
other application, and browsers keep adding headers with an effect beyond one answer
(origin-wide state, fetches of other paths, instructions to the proxy in front); a cross-origin
frontend cannot even read more than the CORS-safelisted ones (the gateway exposes only
`X-Request-Id`). So only these reach the browser:
- `DEFAULT_RELAYED` (and `DEFAULT_RELAYED_PREFIXES`): representation, caching, redirects,
  `Retry-After`, rate-limit headers, `Link` and `WWW-Authenticate` (both filtered further in
  app/proxy/headers.py), `Server-Timing`, `Cross-Origin-Resource-Policy` ...;
- the application's own `relay_response_headers` from `APPS_FILE`: names, or prefixes ending
  in `*` (`"OpenAI-*"`; `"*"` alone relays every name the floor allows).
The floor (`never_relayed`: `NEVER_RELAYED`, `NEVER_RELAYED_PREFIXES`, and any name with a
character other than a letter, a digit or `-`).

`APPS_FILE` may not list a name or prefix its direction's floor refuses (exit 2,
`header_policy` returns the problems).

Hot path: one frozenset look-up per header for the allowlisted names; only names outside it
are matched against the application's prefixes, and the floor's verdict per name is cached.

Over 400 lines because of its data: the four name lists (defaults and floors, one name a line,
each with its reason) are most of it; the code is the last hundred lines.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

_ODD_NAME_RE = re.compile(r"[^a-z0-9-]")
_ENTRY_RE = re.compile(r"^[A-Za-z0-9-]*\*?$")

# RFC 9110 §7.6.1 (plus the legacy Proxy-Connection and Keep-Alive): never forwarded, in either
# direction, together with every header the Connection header names.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

# What a frontend sends an agent API and the API may need; forwarded as sent (lower case).
DEFAULT_FORWARDED = frozenset(
    {
        # Content and negotiation.
        "accept",
        "accept-charset",
        "accept-encoding",  # an event stream's is replaced by `identity` (app/proxy/headers.py)
        "accept-language",
        "content-type",
        "content-length",
        "content-encoding",
        "content-language",
        "content-range",
        "content-disposition",
        "content-digest",
        "repr-digest",
        # Caching and conditionals.
        "cache-control",
        "pragma",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "range",
        # Who asks, from which page.
        "user-agent",
        "referer",
        "origin",
        "x-requested-with",
        "x-csrf",
        # API semantics.
        "last-event-id",
        "idempotency-key",
        "prefer",
        # W3C trace context.
        "traceparent",
        "tracestate",
    }
)

# The floor: never forwarded, whatever the allowlist or `APPS_FILE` says. The gateway's own
# (`Host` comes from the upstream URL; `Expect` was already answered by this server; the
# gateway writes its own forwarding headers), and headers an upstream or its framework may
# take from "its proxy": client address, scheme, host, original URL, method override,
# identity of an authenticating proxy, client certificate.
NEVER_FORWARDED = HOP_BY_HOP | frozenset(
    {
        "host",
        "cookie",
        "authorization",  # only by `forward_authorization`, never by a list
        "expect",
        "x-agent-thread-id",
        "x-application-id",
        "x-request-id",
        "forwarded",
        "via",
        "true-client-ip",
        "client-ip",
        "x-originating-ip",
        "x-host",
        "x-rewrite-url",
        "x-url-scheme",
        "x-scheme",
        "front-end-https",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "remote-user",
        "x-user",
        "x-email",
        "x-authenticated-user",
        "x-authenticated-userid",
        "x-webauth-user",
        "x-client-cert",
        "x-client-verify",
        # httpoxy: CGI turns it into HTTP_PROXY, the outbound proxy of many HTTP clients.
        "proxy",
    }
)
NEVER_FORWARDED_PREFIXES = (
    "x-forwarded",  # -for/-proto/-host are the gateway's; bare, -port/-ssl/-prefix/-server...
    "x-original-",  # -url, -uri, -host, -method, -forwarded-for
    "cf-",  # cf-connecting-ip, cf-visitor (the scheme), cf-ipcountry ...
    "x-envoy-",
    "x-amzn-oidc-",
    "x-goog-authenticated-user-",
    "x-goog-iap-",
    "x-appengine-",
    "x-azure-",
    "x-ms-client-principal",
    "x-ms-token-",
    "x-auth-request-",
    "x-remote-",
    "x-ssl-",
    "ssl-client-",
    "x-arr-",
    "x-vercel-",
    "cloudfront-",
    "fastly-",
    "akamai-",
)
# Words that mark a forwarding or client-address header wherever they stand in the name
# (`Forwarded-For`, `X-Forward-For`, `Proxy-Client-IP`, `WL-Proxy-Client-IP`, `Fly-Client-IP`,
# `X-Cluster-Client-IP`, `Ali-CDN-Real-IP`, `X-ProxyUser-IP` ...).
NEVER_FORWARDED_WORDS = (
    "forward",
    "client-ip",
    "clientip",
    "real-ip",
    "realip",
    "user-ip",
    "userip",
    "remote-ip",
    "remote-addr",
    "proxy-client",
    "proxyuser",
    "socket-ip",
    "socketip",
    "connecting-ip",
    "original-",
)


@functools.lru_cache(maxsize=2048)
def never_forwarded(lower: str) -> bool:
    """True for a lower-cased request header name the floor refuses (module docstring).

    Cached per name: only names outside `DEFAULT_FORWARDED` reach it, and only for an
    application with `forward_request_headers` prefixes; a flood of distinct names only
    turns the bounded cache over."""
    return (
        lower in NEVER_FORWARDED
        or lower.startswith(NEVER_FORWARDED_PREFIXES)
        or any(word in lower for word in NEVER_FORWARDED_WORDS)
        or _ODD_NAME_RE.search(lower) is not None
    )


# Response headers an upstream may not set on the gateway's origin (docs/security.md has why,
# one by one). Compared lower-cased; with `NEVER_RELAYED_PREFIXES` checked by one `startswith`.
NEVER_RELAYED = HOP_BY_HOP | frozenset(
    {
        # State of the whole origin, or of the host and its subdomains.
        "set-cookie",
        "set-cookie2",
        "clear-site-data",
        "strict-transport-security",
        "alt-svc",
        "origin-agent-cluster",
        "service-worker-allowed",
        "service-worker",
        "accept-ch",
        "accept-ch-lifetime",
        "critical-ch",
        "nel",
        "report-to",
        "reporting-endpoints",
        "expect-ct",
        "public-key-pins",
        "public-key-pins-report-only",
        "set-login",
        "idp-signin-status",  # the older name of Set-Login (FedCM)
        "allow-csp-from",
        "use-as-dictionary",
        "observe-browsing-topics",
        "shared-storage-write",
        "activate-storage-access",
        "origin-trial",
        "speculation-rules",
        "supports-loading-mode",
        # Document policies: the gateway's own (`PROXIED_RESPONSE_HEADERS`) apply instead.
        "x-content-type-options",
        "x-frame-options",
        "x-xss-protection",
        "x-dns-prefetch-control",
        "x-permitted-cross-domain-policies",
        "x-download-options",
        "x-ua-compatible",
        "feature-policy",
        "document-policy",
        "require-document-policy",
        "document-isolation-policy",
        "large-allocation",
        "sourcemap",
        "x-sourcemap",
        # Navigation the browser would do by itself.
        "refresh",
        # CORS is the gateway's (its origin allowlist); so is who may read timings.
        "timing-allow-origin",
        # The gateway's own: who answers, and the rotation signal.
        "server",
        "x-session-rotate",
    }
)
NEVER_RELAYED_PREFIXES = (
    "access-control-",
    "content-security-policy",  # and -report-only
    "permissions-policy",  # and -report-only
    "cross-origin-opener-policy",  # and -report-only (Cross-Origin-Resource-Policy passes)
    "cross-origin-embedder-policy",
    "x-accel-",  # nginx acts on these (X-Accel-Redirect: an internal redirect of its choice)
    "x-sendfile",  # Apache mod_xsendfile, lighttpd: serve a file of the proxy's host
    "x-lighttpd-send-",  # lighttpd's -file and -tempfile
    "x-envoy-",  # Envoy acts on some (x-envoy-immediate-health-check-fail, -degraded)
    "sec-",
    "attribution-reporting-",
    "ad-auction-",
)
# What agent APIs answer with and their clients use; relayed as sent (lower case).
DEFAULT_RELAYED = frozenset(
    {
        # Representation.
        "content-type",
        "content-length",
        "content-encoding",
        "content-language",
        "content-disposition",
        "content-range",
        "content-location",
        "content-digest",
        "repr-digest",
        "accept-ranges",
        # Caching and conditionals.
        "cache-control",
        "expires",
        "pragma",
        "etag",
        "last-modified",
        "age",
        "vary",
        "date",
        # API semantics.
        "location",  # redirects checked in app/proxy/urls.py
        "retry-after",
        "allow",
        "www-authenticate",  # only non-prompting schemes (app/proxy/headers.py)
        "link",  # only navigational relations (app/proxy/headers.py)
        "preference-applied",
        "deprecation",
        "sunset",
        "ratelimit",
        "ratelimit-policy",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "server-timing",
        "cross-origin-resource-policy",  # it only restricts who may embed the answer
        "x-request-id",  # replaced by the gateway's own on every answer
    }
)
DEFAULT_RELAYED_PREFIXES = ("x-ratelimit-",)


@functools.lru_cache(maxsize=2048)
def never_relayed(lower: str) -> bool:
    """True for a lower-cased response header name the floor refuses (module docstring).
    Cached per name (bounded: an upstream sending new names only turns the cache over)."""
    return (
        lower in NEVER_RELAYED
        or lower.startswith(NEVER_RELAYED_PREFIXES)
        or _ODD_NAME_RE.search(lower) is not None
    )


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """The headers one application lets through in one direction: `names` (lower case, the
    floor already applied) and `prefixes` (checked against `floor` per name, `""` for `"*"`).
    The proxy inlines `allows` on its hot path (app/proxy/headers.py)."""

    names: frozenset[str]
    prefixes: tuple[str, ...]
    floor: Callable[[str], bool]

    def allows(self, lower: str) -> bool:
        """Whether the lower-cased name `lower` passes (before the per-header checks of
        app/proxy/headers.py: `Connection`, `Authorization`, `Link`, `WWW-Authenticate`)."""
        return lower in self.names or (
            bool(self.prefixes) and lower.startswith(self.prefixes) and not self.floor(lower)
        )


@dataclass(frozen=True, slots=True)
class Direction:
    """One direction's defaults, floor and `APPS_FILE` field, with the wording of its problems."""

    setting: str  # the APPS_FILE field
    default: HeaderPolicy
    example: str  # a prefix entry, for the problem text
    refused_prefix: str  # why a refused prefix is refused
    refused_name: str  # why a refused name is refused
    # Names with a setting of their own, never listed: the name -> the problem text.
    reserved: Mapping[str, str] = field(default_factory=dict)


REQUESTS = Direction(
    setting="forward_request_headers",
    default=HeaderPolicy(DEFAULT_FORWARDED, (), never_forwarded),
    example="X-Stainless-*",
    refused_prefix="names forwarding, identity or hop-by-hop headers, which are never "
    "forwarded (docs/security.md)",
    refused_name="is never forwarded (a forwarding, identity, hop-by-hop or gateway header: "
    "docs/security.md)",
    reserved={"authorization": "use forward_authorization = true for 'Authorization'"},
)
RESPONSES = Direction(
    setting="relay_response_headers",
    default=HeaderPolicy(DEFAULT_RELAYED, DEFAULT_RELAYED_PREFIXES, never_relayed),
    example="OpenAI-*",
    refused_prefix="names headers that are never relayed (origin-wide, proxy or hop-by-hop: "
    "docs/security.md)",
    refused_name="is never relayed (an origin-wide, proxy, hop-by-hop or gateway header: "
    "docs/security.md)",
)


def header_policy(
    direction: Direction, entries: Iterable[object], where: str
) -> tuple[HeaderPolicy, list[str]]:
    """The policy for an application's list in `direction.setting` (the defaults plus the
    entries), and the problems found (each names the entry and the fix). `where` prefixes
    each problem."""
    label = f"{where} field '{direction.setting}'"
    default = direction.default
    names = set(default.names)
    prefixes = list(default.prefixes)
    problems: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry or not _ENTRY_RE.match(entry):
            problems.append(
                f"{label}: entry {entry!r} must be a header name (letters, digits, '-') or a "
                f"prefix ending in '*' ('{direction.example}', or '*' for every allowed name)"
            )
            continue
        lower = entry.lower()
        if lower in direction.reserved:
            problems.append(f"{label}: {direction.reserved[lower]}")
        elif lower.endswith("*"):
            prefix = lower[:-1]
            if prefix and default.floor(prefix):
                problems.append(f"{label}: prefix {entry!r} {direction.refused_prefix}: remove it")
            else:
                prefixes.append(prefix)
        elif default.floor(lower):
            problems.append(f"{label}: {entry!r} {direction.refused_name}: remove it")
        else:
            names.add(lower)
    return HeaderPolicy(frozenset(names), tuple(prefixes), default.floor), problems

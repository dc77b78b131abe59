"""Which of a browser's request headers reach an application's upstream: an allowlist.

The decision and its reasons are in docs/security.md ("Forwarding headers"). In short: the
headers an upstream (its framework, a library, its own proxy) takes as the word of "its
proxy" are an open set (every CDN, PaaS and authenticating proxy has its own client-address
or identity header), so no deny list can be complete; what a frontend needs to send an agent
API is a short, known set. So only these reach the upstream:

- `DEFAULT_FORWARDED`: content and negotiation headers, conditionals, `User-Agent`,
  `Referer`, `Origin`, `Last-Event-ID`, `Idempotency-Key`, `Prefer`, trace context ...;
- `Authorization`, when the application sets `forward_authorization = true`;
- the application's own `forward_request_headers` from `APPS_FILE`: names, or prefixes ending
  in `*` (`"X-Stainless-*"`; `"*"` alone forwards every name the floor below allows).

Whatever the allowlist says, a name `never_forwarded` refuses (the floor) is never sent:
hop-by-hop, `Cookie`, `Host`, the gateway's own headers, forwarding, client-address, original
URL, method-override and proxy-identity headers (by name, prefix and word), and every name with
a character other than a letter, a digit or `-`. `APPS_FILE` may not list such a name (exit 2).

Hot path: one frozenset look-up per header for the allowlisted names; only names outside it
are matched against the application's prefixes, and the floor's verdict per name is cached.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

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
_ODD_NAME_RE = re.compile(r"[^a-z0-9-]")


@functools.lru_cache(maxsize=2048)
def never_forwarded(lower: str) -> bool:
    """True for a lower-cased request header name the floor refuses (see the module docstring).

    Cached per name: only names outside `DEFAULT_FORWARDED` reach it, and only for an
    application with `forward_request_headers` prefixes; a flood of distinct names only
    turns the bounded cache over."""
    return (
        lower in NEVER_FORWARDED
        or lower.startswith(NEVER_FORWARDED_PREFIXES)
        or any(word in lower for word in NEVER_FORWARDED_WORDS)
        or _ODD_NAME_RE.search(lower) is not None
    )


@dataclass(frozen=True, slots=True)
class ForwardPolicy:
    """The request headers one application forwards: `names` (lower case, the floor already
    applied) and `prefixes` (checked against the floor per name, `""` for `"*"`)."""

    names: frozenset[str] = DEFAULT_FORWARDED
    prefixes: tuple[str, ...] = ()

    def forwards(self, lower: str) -> bool:
        """Whether the lower-cased name `lower` goes upstream (`Authorization` aside; the
        proxy inlines this on its hot path)."""
        return lower in self.names or (
            bool(self.prefixes) and lower.startswith(self.prefixes) and not never_forwarded(lower)
        )


DEFAULT_POLICY = ForwardPolicy()

_ENTRY_RE = re.compile(r"^[A-Za-z0-9-]*\*?$")


def forward_policy(entries: Iterable[object], where: str) -> tuple[ForwardPolicy, list[str]]:
    """The policy for an application's `forward_request_headers` list, and the problems found
    (each names the entry and the fix). `where` prefixes each problem."""
    label = f"{where} field 'forward_request_headers'"
    names = set(DEFAULT_FORWARDED)
    prefixes: list[str] = []
    problems: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry or not _ENTRY_RE.match(entry):
            problems.append(
                f"{label}: entry {entry!r} must be a header name (letters, digits, '-') or a "
                "prefix ending in '*' ('X-Stainless-*', or '*' for every allowed name)"
            )
            continue
        lower = entry.lower()
        if lower == "authorization":
            problems.append(f"{label}: use forward_authorization = true for 'Authorization'")
        elif lower.endswith("*"):
            prefix = lower[:-1]
            if prefix and never_forwarded(prefix):
                problems.append(
                    f"{label}: prefix {entry!r} names forwarding, identity or hop-by-hop headers, "
                    "which are never forwarded (docs/security.md): remove it"
                )
            else:
                prefixes.append(prefix)
        elif never_forwarded(lower):
            problems.append(
                f"{label}: {entry!r} is never forwarded (a forwarding, identity, hop-by-hop or "
                "gateway header: docs/security.md): remove it"
            )
        else:
            names.add(lower)
    return ForwardPolicy(frozenset(names), tuple(prefixes)), problems

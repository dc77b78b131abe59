"""Which of an upstream's response headers reach the browser: an allowlist over a floor.

The decision and its reasons are in docs/security.md ("Response headers an upstream may not
set"). An upstream shares the gateway's origin with every other application, and browsers keep
adding headers with an effect beyond one answer (origin-wide state, fetches of other paths,
instructions to the proxy in front), so no deny list stays complete. What a frontend reads
from an agent API is a short, known set; a cross-origin frontend cannot even read more than
the CORS-safelisted ones (the gateway exposes only `X-Request-Id`). So only these reach the
browser:

- `DEFAULT_RELAYED` (and the `DEFAULT_RELAYED_PREFIXES`): representation, caching,
  redirects, `Retry-After`, rate-limit headers, `Link` and `WWW-Authenticate` (both filtered
  further in app/proxy/headers.py), `Server-Timing`, `Cross-Origin-Resource-Policy` ...;
- the application's own `relay_response_headers` from `APPS_FILE`: names, or prefixes ending
  in `*` (`"OpenAI-*"`; `"*"` alone relays every name the floor below allows).

Whatever the allowlist says, a name `never_relayed` refuses (the floor: `NEVER_RELAYED`,
`NEVER_RELAYED_PREFIXES`, and any name with a character other than a letter, a digit or `-`)
is never relayed; `APPS_FILE` may not list one (exit 2).

Hot path: one frozenset look-up per header for the allowlisted names; only names outside it
are matched against the application's prefixes, and the floor's verdict per name is cached.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from app.forward_headers import HOP_BY_HOP

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
_ODD_NAME_RE = re.compile(r"[^a-z0-9-]")

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
class RelayPolicy:
    """The response headers one application relays: `names` (lower case, the floor already
    applied) and `prefixes` (checked against the floor per name, `""` for `"*"`)."""

    names: frozenset[str] = DEFAULT_RELAYED
    prefixes: tuple[str, ...] = DEFAULT_RELAYED_PREFIXES

    def relays(self, lower: str) -> bool:
        """Whether the lower-cased name `lower` reaches the browser (before the per-header
        checks of `Link`, `WWW-Authenticate` and `Connection` in app/proxy/headers.py)."""
        return lower in self.names or (lower.startswith(self.prefixes) and not never_relayed(lower))


DEFAULT_RELAY_POLICY = RelayPolicy()

_ENTRY_RE = re.compile(r"^[A-Za-z0-9-]*\*?$")


def relay_policy(entries: Iterable[object], where: str) -> tuple[RelayPolicy, list[str]]:
    """The policy for an application's `relay_response_headers` list, and the problems found
    (each names the entry and the fix). `where` prefixes each problem."""
    label = f"{where} field 'relay_response_headers'"
    names = set(DEFAULT_RELAYED)
    prefixes = list(DEFAULT_RELAYED_PREFIXES)
    problems: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry or not _ENTRY_RE.match(entry):
            problems.append(
                f"{label}: entry {entry!r} must be a header name (letters, digits, '-') or a "
                "prefix ending in '*' ('OpenAI-*', or '*' for every allowed name)"
            )
            continue
        lower = entry.lower()
        if lower.endswith("*"):
            prefix = lower[:-1]
            if prefix and never_relayed(prefix):
                problems.append(
                    f"{label}: prefix {entry!r} names headers that are never relayed "
                    "(origin-wide, proxy or hop-by-hop: docs/security.md): remove it"
                )
            else:
                prefixes.append(prefix)
        elif never_relayed(lower):
            problems.append(
                f"{label}: {entry!r} is never relayed (an origin-wide, proxy, hop-by-hop or "
                "gateway header: docs/security.md): remove it"
            )
        else:
            names.add(lower)
    return RelayPolicy(frozenset(names), tuple(prefixes)), problems

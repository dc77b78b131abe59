"""`ALLOWED_HOSTS`: the host names this gateway answers for (DNS-rebinding defence).

A DNS-rebinding page (`http://attacker.example` re-resolved to the gateway's address) makes the
victim's browser send requests with `Host: attacker.example`; the page is same-origin with
itself, so it reads the answers. Refusing every Host that is not one of the gateway's own names
stops it before any session or upstream work: 421 `host_not_allowed`.

Entries (comma-separated, case-insensitive, a trailing dot ignored):
- `example.com`: that name, on any port;
- `example.com:8443`: that name on that port only (browsers leave default ports out of Host:
  list `example.com` for 80/443);
- `*.example.com`: any name under example.com, at any depth (not example.com itself), on any
  port; `*.example.com:8443` on that port only;
- IP literals: `127.0.0.1`, `[::1]`, with an optional port as above.
Empty (the default): every Host is served.

Behind `TRUSTED_PROXIES` the Host checked is the proxy's `X-Forwarded-Host` when it sends one
(the browser's, as `app.forwarding.client_host` reads it), else `Host`.

This module is pure (no aiohttp, no settings): `parse_allowed_hosts` validates the setting,
`HostAllowlist` answers per request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
# Allowed host strings remembered so a repeat needs one set lookup (bounded: a wildcard entry
# could otherwise let a client grow it without end).
_CACHE_MAX = 1024

EXAMPLE = "ALLOWED_HOSTS=example.com,*.example.com,localhost:8080"


def split_host(value: str) -> tuple[str, str | None] | None:
    """`(name, port)` of a Host value, lower-cased, without a trailing dot (IPv6 in brackets),
    the port canonical (no leading zeros) or None; None when `value` is no valid Host."""
    value = value.lower()
    port: str | None = None
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            return None
        name, rest = value[: close + 1], value[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return None
    else:
        name, colon, port_text = value.partition(":")
        if colon:
            port = port_text
        if name.endswith("."):
            name = name[:-1]
        if not _HOSTNAME_RE.fullmatch(name):
            return None
    if port is not None:
        if not _PORT_RE.fullmatch(port) or not 0 < int(port) <= 65535:
            return None
        port = str(int(port))
    return name, port


class HostAllowlist:
    """Answers whether a Host value is one of the configured entries (`parse_allowed_hosts`'s
    normalized form). Cheap on the hot path: an allowed Host seen before is one set lookup."""

    def __init__(self, entries: Iterable[str]) -> None:
        names: set[str] = set()
        named_ports: set[tuple[str, str]] = set()
        suffixes: list[tuple[str, str | None]] = []
        for entry in entries:
            wildcard = entry.startswith("*.")
            parsed = split_host(entry[2:] if wildcard else entry)
            if parsed is None:
                raise ValueError(f"not a valid ALLOWED_HOSTS entry: {entry!r}")
            name, port = parsed
            if wildcard:
                suffixes.append(("." + name, port))
            elif port is None:
                names.add(name)
            else:
                named_ports.add((name, port))
        self._names = frozenset(names)
        self._named_ports = frozenset(named_ports)
        self._suffixes = tuple(suffixes)
        self._seen: set[str] = set()

    def allows(self, host: str) -> bool:
        if host in self._seen:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        allowed = (
            name in self._names
            or (port is not None and (name, port) in self._named_ports)
            or any(
                name.endswith(suffix) and (wanted is None or wanted == port)
                for suffix, wanted in self._suffixes
            )
        )
        if allowed and len(self._seen) < _CACHE_MAX:
            self._seen.add(host)
        return allowed


def parse_allowed_hosts(raw: str, problems: list[str]) -> tuple[str, ...]:
    """`ALLOWED_HOSTS` as normalized entries (`name`, `name:port`, `*.suffix[:port]`); each bad
    entry is recorded in `problems` naming the variable and the fix."""
    entries: list[str] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        wildcard = item.startswith("*.")
        parsed = split_host(item[2:] if wildcard else item)
        if parsed is None or (wildcard and parsed[0].startswith("[")):
            problems.append(
                f"ALLOWED_HOSTS entry {item!r} is not valid: use host names, *.domain wildcards "
                f"or name:port (no scheme, path or bare *), e.g. {EXAMPLE}"
            )
            continue
        name, port = parsed
        normalized = ("*." if wildcard else "") + name + (f":{port}" if port else "")
        if normalized not in entries:
            entries.append(normalized)
    return tuple(entries)


def is_loopback(host: str) -> bool:
    """Whether a listen address (`HOST`) is reachable only from this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

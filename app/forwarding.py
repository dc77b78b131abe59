"""What the client really is: forwarding headers are believed only from `TRUSTED_PROXIES`.

A peer outside the trusted networks cannot claim HTTPS, another client address or another
host through `Forwarded`/`X-Forwarded-*` (ASVS 5 §4.1.3: intermediary headers cannot be set by
the end user).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from aiohttp import web

from app.config import IPNetwork


def peer_ip(request: web.BaseRequest) -> str:
    """The address of the TCP peer (a proxy, or the browser itself)."""
    return request.remote or ""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# The longest textual IP address without a zone (IPv4-mapped IPv6, fully written out).
_LONGEST_ADDRESS = len("0000:0000:0000:0000:0000:ffff:255.255.255.255")


def _parse_address(text: str) -> IPAddress | None:
    """`text` as an IP address, None when it is not one (or carries a long zone, which no
    caller accepts anyway). Parsed once per distinct text (see `_parse_cached`)."""
    if len(text) > _LONGEST_ADDRESS + 16:
        return None
    return _parse_cached(text)


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> IPAddress | None:
    """Cached: the same few peers and hops come with every request and `ipaddress` parses in
    Python. Bounded in entries and, by `_parse_address`, in key length (a client sending new
    text each time only misses the cache)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def peer_is_trusted(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> bool:
    if not trusted:
        return False
    address = _parse_address(peer_ip(request).split("%", 1)[0])
    return address is not None and any(address in network for network in trusted)


def _first(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(",", 1)[0].strip() or None


def client_scheme(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> str:
    """`https` or `http` as the browser used it."""
    if peer_is_trusted(request, trusted):
        proto = _first(request.headers.get("X-Forwarded-Proto"))
        if proto and proto.lower() in ("http", "https"):
            return proto.lower()
    return "https" if request.transport is not None and _is_tls(request) else "http"


def _is_tls(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


def client_host(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> str:
    """The Host the browser asked for."""
    if peer_is_trusted(request, trusted):
        host = _first(request.headers.get("X-Forwarded-Host"))
        if host:
            return host
    return request.headers.get("Host", "")


def _forwarded_for(request: web.BaseRequest) -> list[str]:
    """Every hop of `X-Forwarded-For`, over all its header lines in order (a proxy may add its
    hop as a line of its own: reading only the first line would believe the client's)."""
    values = request.headers.getall("X-Forwarded-For", ())
    return [hop.strip() for value in values for hop in value.split(",") if hop.strip()]


def client_ip(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> str:
    """The browser's address: the last untrusted hop of `X-Forwarded-For` behind our proxies
    (the first entry of `forwarded_chain`), else the peer's."""
    chain = forwarded_chain(request, trusted)
    return chain[0] if chain else peer_ip(request)


def forwarded_chain(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> list[str]:
    """The `X-Forwarded-For` chain the gateway believes, as it sends it upstream: the client
    address first, then the trusted proxies the request came through, the TCP peer last.

    Behind a trusted peer the hops are walked from the right: the first one that is not in
    `trusted` is the client; hops left of it (anything the client wrote itself) are left out;
    when every hop is trusted the leftmost is the client. A hop that is not an address, or an
    IPv6 address with a zone, ends the walk with the peer as the client (never free text as an
    address). Empty only when the peer address is unknown."""
    ip = peer_ip(request)
    if not ip:
        return []
    if not peer_is_trusted(request, trusted):
        return [ip]
    believed = [ip]
    for hop in reversed(_forwarded_for(request)):
        address = _parse_address(hop)
        if address is None:
            return [ip]
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            # `fe80::1%<any text, spaces too>` parses, but a zone means nothing off its host:
            # never a client address (it would reach logs and per-client keys as free text).
            return [ip]
        believed.append(hop)
        if not any(address in network for network in trusted):
            break
    believed.reverse()
    return believed


def own_origin(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> str:
    """The gateway's own origin as the browser sees it, e.g. `http://localhost:8080`."""
    return f"{client_scheme(request, trusted)}://{client_host(request, trusted)}".lower()

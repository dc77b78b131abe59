"""`REDIS_URL` parsing, pure (standard library only): which topology, nodes, credentials and
database a URL names, or `RedisUrlError` saying what is wrong with it.

Apart from the Redis client (`app.sessions.redis_client.make_client`, which connects to what this
names) so that the configuration (`app.config`) validates a URL without importing redis-py.
Accepted forms (`EXAMPLES`):
- `redis://[user:password@]host[:6379][/db]`, `rediss://…` (TLS): one server;
- `redis+sentinel://[user:password@]host1:26379,host2:26379/<master-name>[/db]`;
- `redis+cluster://[user:password@]host1:7000,host2:7001` (database 0 only).
Query strings and fragments are refused: options go in the `REDIS_*` settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

Topology = Literal["single", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis+sentinel": ("sentinel", False),
    "redis+cluster": ("cluster", False),
}
_DEFAULT_PORT: dict[Topology, int] = {"single": 6379, "sentinel": 26379, "cluster": 6379}
EXAMPLES: dict[Topology, str] = {
    "single": "redis://host:6379/0 (or rediss://host:6380/0 for TLS)",
    "sentinel": "redis+sentinel://host1:26379,host2:26379/<master-name>/0",
    "cluster": "redis+cluster://host1:7000,host2:7001",
}
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


class RedisUrlError(ValueError):
    """`REDIS_URL` is malformed. The message never contains the password; it says what is
    wrong (the caller adds the redacted URL and the variable name); `example` is a correct
    URL of the scheme that was meant."""

    example: str = EXAMPLES["single"]


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a `REDIS_URL` names: a topology, its seed addresses, credentials, database."""

    topology: Topology
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    db: int = 0
    service_name: str | None = None  # the Sentinel master name


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any supported `REDIS_URL`; raise `RedisUrlError` naming the problem.

    Query-string options are refused (redis-py would let them override the explicit retry and
    timeout budget, or switch off TLS verification): use the `REDIS_*` settings instead.
    """
    try:
        return _parse_redis_url(url)
    except RedisUrlError as err:
        scheme = url.partition("://")[0].lower()
        meant: Topology = (
            "sentinel" if "sentinel" in scheme else "cluster" if "cluster" in scheme else "single"
        )
        err.example = EXAMPLES[meant]
        raise


def _parse_redis_url(url: str) -> RedisTarget:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise RedisUrlError("is not a URL")
    scheme = scheme.lower()
    if scheme in ("rediss+sentinel", "rediss+cluster"):
        raise RedisUrlError(
            f"uses {scheme}://, which is not supported: TLS works with a single server "
            "(rediss://); Sentinel and Cluster run over plain TCP here"
        )
    if scheme not in _SCHEMES:
        raise RedisUrlError(
            f"has scheme {scheme!r}: use redis://, rediss:// (TLS), redis+sentinel:// or "
            "redis+cluster://"
        )
    topology, tls = _SCHEMES[scheme]
    # Credentials end at the last '@' (a password may contain '/', '?', '#' or '@').
    userinfo, at, location = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    if "?" in location or "#" in location:
        raise RedisUrlError(
            "has a query string or fragment: options go in the REDIS_* settings"
            " (see docs/configuration.md)"
        )
    hosts, slash, path = location.partition("/")
    nodes = tuple(_parse_node(item, _DEFAULT_PORT[topology]) for item in hosts.split(","))
    if topology == "single" and len(nodes) != 1:
        raise RedisUrlError(
            "names several hosts: redis:// takes one; use redis+sentinel:// or "
            "redis+cluster:// for several"
        )
    segments = [unquote(s) for s in path.split("/")] if slash else []
    while segments and segments[-1] == "":
        segments.pop()
    db = 0
    service_name = None
    if topology == "sentinel":
        if not segments or not segments[0]:
            raise RedisUrlError("names no Sentinel master: add /<master-name> after the hosts")
        service_name = segments[0]
        if any(c.isspace() for c in service_name):
            raise RedisUrlError("has a master name with spaces")
        segments = segments[1:]
    if len(segments) > 1:
        raise RedisUrlError("has an unexpected path: only a database number may follow")
    if segments:
        if not segments[0].isdigit():
            raise RedisUrlError(f"has database {segments[0]!r}: use a number, e.g. /0")
        db = int(segments[0])
    if topology == "cluster" and db != 0:
        raise RedisUrlError(f"asks for database {db}: Redis Cluster has only database 0")
    return RedisTarget(
        topology=topology,
        tls=tls,
        nodes=nodes,
        username=username,
        password=password,
        db=db,
        service_name=service_name,
    )


def _parse_node(item: str, default_port: int) -> tuple[str, int]:
    if not item:
        raise RedisUrlError("names no host (or has an empty entry in its host list)")
    if item.startswith("["):  # [IPv6]:port
        host, bracket, tail = item[1:].partition("]")
        if not bracket or not host or any(c not in "0123456789abcdefABCDEF:." for c in host):
            raise RedisUrlError(f"has an invalid IPv6 host {item!r}")
        if tail and not tail.startswith(":"):
            raise RedisUrlError(f"has an invalid host {item!r}")
        port_text = tail[1:] if tail else ""
    else:
        host, colon, port_text = item.partition(":")
        if not host or any(c not in _HOST_CHARS for c in host):
            raise RedisUrlError(f"has an invalid host {host!r}")
        if colon and not port_text:
            raise RedisUrlError(f"has an empty port after {host!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisUrlError(f"has an invalid port {port_text!r}: use 1-65535")
    return host, int(port_text)

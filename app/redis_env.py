"""The Redis settings of the environment: `REDIS_URL` checked (`check_redis_url`) and redacted
for logs and messages (`redact_url`), and `REDIS_TLS_*` / `REDIS_SENTINEL_PASSWORD` checked
against the URL's scheme (`redis_tls_settings`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from app.env_reader import EnvReader
from app.sessions.redis_url import RedisUrlError, parse_redis_url


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, safe for logs and error messages.

    Both places redis-py reads a password from are redacted: the userinfo and `?password=`.
    The userinfo ends at the *last* `@`, as in `parse_redis_url`: that also covers multi-host
    Sentinel/Cluster URLs and passwords holding an unescaped `/`, `?` or `#`.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, location = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        url = f"{scheme}://{userinfo.partition(':')[0]}:***@{location}"
    elif at or (not sep and "@" in url):
        # A userinfo without `:` may still be a password written in the wrong place, and a
        # malformed URL (`redis:/:pw@host`) has no reliable structure: hide all of it.
        url = f"{scheme}://***@{location}" if sep else "***@" + url.rpartition("@")[2]
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    query = "&".join(
        f"{item.partition('=')[0]}=***" if item.partition("=")[0].lower() == "password" else item
        for item in parts.query.split("&")
    )
    if query == parts.query:
        return url
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def check_redis_url(url: str, problems: list[str]) -> None:
    safe = redact_url(url)
    try:
        parse_redis_url(url)
    except RedisUrlError as err:
        problems.append(f"REDIS_URL={safe!r} {err}: use e.g. {err.example}")


@dataclass(frozen=True, slots=True)
class RedisExtras:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    sentinel_password: str | None = None


def redis_tls_settings(env: Mapping[str, str], r: EnvReader, url: str | None) -> RedisExtras:
    """REDIS_TLS_* (only with rediss://) and REDIS_SENTINEL_PASSWORD (only with Sentinel).

    Checked only for SESSION_STORE=redis with a parseable REDIS_URL; a setting that the URL's
    scheme would silently ignore is a problem, because it usually means TLS is not in use."""
    try:
        target = parse_redis_url(url) if url else None
    except RedisUrlError:
        target = None
    if target is None:
        return RedisExtras()
    files: dict[str, str | None] = {}
    for name in ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"):
        path = env.get(name, "").strip() or None
        files[name] = path
        if path is None:
            continue
        if not target.tls:
            r.problems.append(
                f"{name} is set but REDIS_URL is not rediss://: use a rediss:// URL for TLS, "
                f"or unset {name}"
            )
        elif not os.path.isfile(path) or not os.access(path, os.R_OK):
            r.problems.append(f"{name}={path!r} is not a readable file: give the PEM file path")
    if files["REDIS_TLS_KEY_FILE"] and not files["REDIS_TLS_CERT_FILE"]:
        r.problems.append(
            "REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE: set both for a client "
            "certificate"
        )
    verify_raw = env.get("REDIS_TLS_VERIFY", "").strip()
    verify = r.choice("REDIS_TLS_VERIFY", "true", ("true", "false")) == "true"
    if verify_raw and not target.tls:
        r.problems.append(
            "REDIS_TLS_VERIFY is set but REDIS_URL is not rediss://: unset it or use rediss://"
        )
    sentinel_password = env.get("REDIS_SENTINEL_PASSWORD") or None
    if sentinel_password is not None and target.topology != "sentinel":
        r.problems.append(
            "REDIS_SENTINEL_PASSWORD is set but REDIS_URL is not redis+sentinel://: unset it"
        )
    return RedisExtras(
        ca_file=files["REDIS_TLS_CA_FILE"],
        cert_file=files["REDIS_TLS_CERT_FILE"],
        key_file=files["REDIS_TLS_KEY_FILE"],
        verify=verify,
        sentinel_password=sentinel_password,
    )

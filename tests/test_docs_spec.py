"""Every statement of the Redis session storage spec (the user's page: overview, environment
table with defaults, enabling, key format, TTL, connection, shutdown, local development,
troubleshooting) is still stated in docs/, on the page the README links for that section.
Text is compared with whitespace collapsed, so re-wrapping a paragraph does not matter.
"""

from __future__ import annotations

import re

import pytest

from tests.gateway_process import REPO_ROOT

STATEMENTS = [
    (
        "Overview: memory by default, local dev / single instance",
        "docs/redis.md",
        "which suits local development and a single instance",
    ),
    (
        "Overview: Redis shares sessions across instances behind a LB",
        "docs/redis.md",
        "storage shares the session data between all of them",
    ),
    (
        "env SESSION_STORE default memory",
        "docs/configuration.md",
        "| `SESSION_STORE` | `memory` | `memory` or `redis` |",
    ),
    (
        "env SESSION_TTL_SECONDS default 3600",
        "docs/configuration.md",
        "| `SESSION_TTL_SECONDS` | `3600` |",
    ),
    (
        "env REDIS_URL required when redis",
        "docs/configuration.md",
        "| `REDIS_URL` | — | required when `SESSION_STORE=redis`",
    ),
    (
        "env REDIS_PREFIX default agent:sess:",
        "docs/configuration.md",
        "| `REDIS_PREFIX` | `agent:sess:` | key prefix |",
    ),
    (
        "enable: SESSION_STORE=redis, REDIS_URL, optional prefix",
        "docs/redis.md",
        "SESSION_STORE=redis SESSION_TTL_SECONDS=3600 REDIS_URL=redis://localhost:6379"
        " REDIS_PREFIX=agent:sess: # optional",
    ),
    ("key format", "docs/sessions.md", "`{REDIS_PREFIX}{applicationId}:{sessionId}`"),
    ("key example", "docs/sessions.md", "agent:sess:demo:abc123"),
    (
        "TTL: expire after TTL",
        "docs/sessions.md",
        "Sessions expire `SESSION_TTL_SECONDS` after they were last used",
    ),
    (
        "TTL: refreshed on every update (touch)",
        "docs/sessions.md",
        "The TTL is refreshed on every session update (touch semantics)",
    ),
    (
        "TTL: active sessions stay valid",
        "docs/sessions.md",
        "So an active session stays valid as long as it is used",
    ),
    (
        "connection: reconnection with exponential backoff",
        "docs/redis.md",
        "Automatic reconnection with exponential backoff",
    ),
    ("connection: max 3 retries per request", "docs/redis.md", "(1 + 3 retries per request)"),
    (
        "connection: fail-fast at start",
        "docs/redis.md",
        "Fail-fast start: the gateway PINGs Redis before serving",
    ),
    (
        "shutdown: Redis connection closed, no leaks",
        "docs/redis.md",
        "closed with `aclose()` at shutdown, after in-flight requests finished"
        " — no connection leaks",
    ),
    ("shutdown section", "docs/redis.md", "the Redis connection is closed last (`aclose()`)"),
    (
        "local dev: docker run redis:7-alpine",
        "docs/redis.md",
        "docker run -d --name redis -p 6379:6379 redis:7-alpine",
    ),
    (
        "troubleshooting: running, REDIS_URL, firewall",
        "docs/troubleshooting.md",
        "Redis running and reachable, `REDIS_URL` right, no firewall in the way",
    ),
    (
        "not persisting 1: all SESSION_STORE=redis",
        "docs/troubleshooting.md",
        "Verify all instances are using `SESSION_STORE=redis`",
    ),
    (
        "not persisting 2: same Redis",
        "docs/troubleshooting.md",
        "Ensure all instances are connecting to the same Redis instance",
    ),
    (
        "not persisting 3: same prefix",
        "docs/troubleshooting.md",
        "Check the `REDIS_PREFIX` is consistent across instances",
    ),
]


def collapsed(text: str) -> str:
    """`text` with every run of whitespace as one space."""
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize(("statement", "page", "text"), STATEMENTS, ids=[s[0] for s in STATEMENTS])
def test_the_spec_statement_is_in_the_docs(statement: str, page: str, text: str) -> None:
    assert text in collapsed((REPO_ROOT / page).read_text()), statement

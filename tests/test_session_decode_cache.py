"""Stored values decoded once: `SessionCodec(cache_bytes=...)` and the gateway's reads."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from cryptography.fernet import Fernet

from app.keys import STORAGE_APP_KEY
from app.sessions import codec as codec_module
from app.sessions.codec import SessionCodec
from tests.conftest import CSRF, GatewayFactory

MAPPING = {"a": [1, 2]}
FIELDS: dict[str, Any] = {"created_at": 1_700_000_000}


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every JSON parse of a stored value, recorded."""
    calls: list[bytes] = []
    original = codec_module._loads_object

    def loads(raw: bytes) -> dict[str, Any] | None:
        calls.append(raw)
        return original(raw)

    monkeypatch.setattr(codec_module, "_loads_object", loads)
    return calls


def test_a_value_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    codec = SessionCodec(cache_bytes=64 * 1024)
    raw = codec.encode(MAPPING, 3, "demo:x", **FIELDS)
    first = codec.decode(raw, "demo:x")
    again = codec.decode(bytes(raw), "demo:x")  # an equal value read again
    assert again is first and first.session == MAPPING
    assert len(calls) == 1
    assert SessionCodec().decode(raw, "demo:x") == first  # the same result without a cache


def test_refused_and_stale_values_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    key = Fernet.generate_key().decode()
    codec = SessionCodec([key], cache_bytes=64 * 1024)
    plain = SessionCodec().encode(MAPPING, 1, "demo:x", **FIELDS)
    for _ in range(2):
        assert codec.decode(plain, "demo:x").stale  # plaintext under encryption: stale
        assert codec.decode(b"{corrupt", "demo:x").session is None
    assert len(calls) == 4


def test_encrypted_values_are_kept_per_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    codec = SessionCodec([Fernet.generate_key().decode()], cache_bytes=64 * 1024)
    raw = codec.encode(MAPPING, 1, "demo:x", **FIELDS)
    assert codec.decode(raw, "demo:x").session == MAPPING
    assert codec.decode(raw, "demo:x").session == MAPPING
    # The same ciphertext under another session id is still refused (copied value).
    copied = codec.decode(raw, "demo:y")
    assert copied.session is None and "another session" in copied.problem
    assert len(calls) == 2 + 2  # (outer, inner) once for "demo:x", again for "demo:y"


def test_values_an_older_key_opens_are_not_kept() -> None:
    """Whether such a token is stale depends on its age: decided again on every read."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    raw = SessionCodec([old]).encode(MAPPING, 1, "demo:x", **FIELDS)
    now = [time.time()]
    codec = SessionCodec([new, old], refresh_after=60, clock=lambda: now[0], cache_bytes=1 << 16)
    assert not codec.decode(raw, "demo:x").stale  # fresh: read as it is
    now[0] += 61
    assert codec.decode(raw, "demo:x").stale  # one refresh period old: rewrite it
    assert not codec._cache


def test_the_cache_is_bounded() -> None:
    codec = SessionCodec(cache_bytes=64 * 1024)
    values = [codec.encode({"i": i}, 1, "", created_at=1) for i in range(5000)]
    for raw in values:
        codec.decode(raw, "")
    assert codec._cache_size <= 64 * 1024
    assert 0 < len(codec._cache) < len(values)
    big = codec.encode({"pad": "x" * 2000}, 1, "", created_at=1)
    codec.decode(big, "")
    assert big not in codec._cache  # over 1/64 of the budget: never kept


async def test_sessions_sharing_a_decoded_value_stay_apart(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counting(monkeypatch)
    gw = await gateway_factory("memory")
    assert (await gw.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)).status == 200
    calls.clear()
    for _ in range(3):
        assert await (await gw.client.get("/apps/demo/session")).json() == {"data": {"a": 1}}
    assert len(calls) == 1  # read three times, decoded once
    codec = gw.app[STORAGE_APP_KEY].codec
    (cached,) = codec._cache.values()
    before = json.dumps(cached.session)
    # Writes start from the cached value; they change the stored session, never it.
    resp = await gw.client.patch("/apps/demo/session", json={"b": 2, "a": None}, headers=CSRF)
    assert await resp.json() == {"data": {"b": 2}}
    assert await (await gw.client.get("/apps/demo/session")).json() == {"data": {"b": 2}}
    assert json.dumps(cached.session) == before


async def test_the_answer_to_a_read_is_encoded_once_per_value(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory("memory")
    assert (await gw.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)).status == 200
    first = await gw.client.get("/apps/demo/session")
    assert await first.read() == b'{"data": {"a": 1}}'
    (cached,) = gw.app[STORAGE_APP_KEY].codec._cache.values()
    assert cached.json_body == b'{"a": 1}'
    cached.json_body = b'{"kept": true}'  # what the next read of this value sends
    assert await (await gw.client.get("/apps/demo/session")).json() == {"data": {"kept": True}}
    # A new value is answered from itself.
    resp = await gw.client.patch("/apps/demo/session", json={"b": 2}, headers=CSRF)
    assert await resp.json() == {"data": {"a": 1, "b": 2}}
    assert await (await gw.client.get("/apps/demo/session")).json() == {"data": {"a": 1, "b": 2}}


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_value_written_is_remembered_as_decode_reads_it(
    encrypted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [Fernet.generate_key().decode()] if encrypted else []
    codec = SessionCodec(keys, cache_bytes=1 << 20)
    reference = SessionCodec(keys)  # no cache: always decodes
    data: dict[str, Any] = {
        "é": "ü\u2028",
        "n": [1, -0.0, 1.5e300, 10**30, float("inf"), None, True],
        "o": {"x": {"y": []}},
    }
    meta = {"conversation_id": "c"}
    raw = codec.encode(data, 7, "demo:x", created_at=1_700_000_000, meta=meta, remember=True)
    calls = _counting(monkeypatch)
    kept = codec.decode(raw, "demo:x")
    assert calls == []  # not decoded: remembered
    decoded = reference.decode(raw, "demo:x")
    assert json.dumps(kept.session) == json.dumps(decoded.session)
    assert (kept.created_at, kept.created, kept.meta, kept.max_age, kept.nested) == (
        decoded.created_at,
        decoded.created,
        decoded.meta,
        decoded.max_age,
        decoded.nested,
    )
    data["o"]["x"]["y"].append(1)  # the writer's own dicts are not the remembered ones
    data["o"] = {}
    meta["conversation_id"] = "d"
    assert kept.session == reference.decode(raw, "demo:x").session
    assert kept.meta == {"conversation_id": "c"}
    assert codec.decode(raw, "demo:other").session is None or encrypted is False


async def test_a_read_after_a_write_decodes_nothing(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await gateway_factory("memory")
    assert (await gw.client.patch("/apps/demo/session", json={"a": 1}, headers=CSRF)).status == 200
    assert (await gw.client.patch("/apps/demo/session", json={"b": 2}, headers=CSRF)).status == 200
    calls = _counting(monkeypatch)
    assert await (await gw.client.get("/apps/demo/session")).json() == {"data": {"a": 1, "b": 2}}
    assert calls == []

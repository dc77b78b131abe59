"""Neither an upgrade nor a rollback logs anyone out: stored values written by the release
before the public storage (`{"v":1,"r":...,"data":{...},"gw":{...}}`) still load and keep
their conversation, lifetime and revision; their next write adds only `created`
(aiohttp-session's `Session.created`), in a layout that release still reads.

The values in tests/fixtures/sessions_v1.json are real bytes captured from that release
(commit 5750bdd): written through its HTTP API (PATCH) and by its codec as its storage called
it, plaintext and encrypted. Run on every store: memory, fakeredis, a real redis-server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from pytest_aiohttp import AiohttpServer

from app.proxy.headers import THREAD_HEADER
from app.sessions.codec import FORMAT_VERSION, SessionCodec
from tests.conftest import CSRF, STORE_KINDS, Gateway, GatewayFactory
from tests.fake_upstream import ServedUpstream, serve_upstream, sse, start_sse

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "sessions_v1.json").read_text())
KEY: str = FIXTURES["encryption_key"]
CASES = [(mode, entry) for mode in ("plaintext", "encrypted") for entry in FIXTURES[mode]]


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> ServedUpstream:
    served = await serve_upstream(aiohttp_server)

    async def chat(request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse("done", {}))
        await response.write_eof()
        return response

    served.fake.on("/v1/chat", chat)
    return served


async def gateway_for(
    factory: GatewayFactory, kind: str, mode: str, upstream: ServedUpstream, tmp_path: Path
) -> Gateway:
    apps = tmp_path / "apps.toml"
    apps.write_text(
        "".join(f'[apps.{app}]\nupstream = "{upstream.base}"\n\n' for app in ("demo", "shop"))
    )
    env = {"APPS_FILE": str(apps)}
    if mode == "encrypted":
        env["SESSION_ENCRYPTION_KEYS"] = KEY
    return await factory(kind, env)


def cookie(sid: str) -> dict[str, str]:
    return {"Cookie": f"agent_sid={sid}"}


def stored_fields(mode: str, raw: bytes, binding: str) -> dict[str, Any]:
    """The stored value's plaintext object (the encrypted one's inner object, decrypted)."""
    value: dict[str, Any] = json.loads(raw)
    if mode == "encrypted":
        assert set(value) == {"v", "r", "enc"}
        inner: dict[str, Any] = json.loads(Fernet(KEY.encode()).decrypt(value["enc"].encode()))
        assert inner.pop("k") == binding
        return {"v": value["v"], "r": value["r"], **inner}
    return value


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize(("mode", "entry"), CASES, ids=lambda c: c if isinstance(c, str) else "")
async def test_a_value_of_the_previous_release_loads_and_is_upgraded_by_its_next_write(
    gateway_factory: GatewayFactory,
    upstream: ServedUpstream,
    tmp_path: Path,
    kind: str,
    mode: str,
    entry: dict[str, Any],
) -> None:
    gateway = await gateway_for(gateway_factory, kind, mode, upstream, tmp_path)
    app, sid = entry["app"], entry["session_id"]
    key = gateway.key(sid, app)
    await gateway.raw.set(key, entry["raw"].encode(), 600)
    session = f"/apps/{app}/session"

    # Read as it is: the browser's data, nothing written.
    resp = await gateway.client.get(session, headers=cookie(sid))
    assert (resp.status, await resp.json()) == (200, {"data": entry["data"]})
    assert await gateway.raw.get(key) == entry["raw"].encode()

    # The conversation carries over (nothing to write when it exists).
    resp = await gateway.client.post(f"/apps/{app}/agent/chat", headers={**CSRF, **cookie(sid)})
    assert resp.status == 200
    await resp.read()
    thread = upstream.fake.last.headers[THREAD_HEADER]
    if entry["conversation_id"] is not None:
        assert thread == entry["conversation_id"]
        assert await gateway.raw.get(key) == entry["raw"].encode()

    # The next write: same id, data merged, created_at and the conversation kept, the revision
    # continued, `created` added.
    resp = await gateway.client.patch(session, json={"more": 1}, headers={**CSRF, **cookie(sid)})
    assert (resp.status, await resp.json()) == (200, {"data": {**entry["data"], "more": 1}})
    assert "Set-Cookie" not in resp.headers
    raw = await gateway.raw.get(key)
    assert raw is not None
    value = stored_fields(mode, raw, f"{app}:{sid}")
    assert value["v"] == FORMAT_VERSION
    assert value["r"] == entry["revision"] + (2 if entry["conversation_id"] is None else 1)
    assert value["data"] == {**entry["data"], "more": 1}
    assert isinstance(value["created"], int) and value["created"] >= entry["created_at"]
    assert value["gw"] == {"created_at": entry["created_at"], "conversation_id": thread}
    resp = await gateway.client.get(session, headers=cookie(sid))
    assert await resp.json() == {"data": {**entry["data"], "more": 1}}


@pytest.mark.parametrize(("mode", "entry"), CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_the_codec_reads_the_previous_release_as_the_mapping_with_its_fields(
    mode: str, entry: dict[str, Any]
) -> None:
    codec = SessionCodec([KEY] if mode == "encrypted" else [])
    decoded = codec.decode(entry["raw"].encode(), f"{entry['app']}:{entry['session_id']}")
    assert decoded.session == entry["data"]
    assert decoded.created_at == decoded.created == entry["created_at"]
    expected_meta = (
        {} if entry["conversation_id"] is None else {"conversation_id": entry["conversation_id"]}
    )
    assert dict(decoded.meta) == expected_meta
    assert decoded.max_age is None and not decoded.stale


@pytest.mark.parametrize("encrypted", [False, True])
def test_the_previous_release_reads_what_this_one_writes(encrypted: bool) -> None:
    """A rolling deploy (or a rollback): the previous release's decoder, as it was (commit
    5750bdd's `_session_mapping` and version check), accepts this release's values."""
    keys = [KEY] if encrypted else []
    raw = SessionCodec(keys).encode(
        {"a": [1]},
        5,
        "demo:x",
        created_at=1_700_000_000,
        created=1_700_000_100,
        meta={"conversation_id": "c" * 32},
    )
    value = json.loads(raw)
    if encrypted:
        value = json.loads(Fernet(KEY.encode()).decrypt(value["enc"].encode()))
        assert value["k"] == "demo:x"
    # What 5750bdd's codec required of a value (besides decryption).
    assert json.loads(raw)["v"] == 1 and json.loads(raw)["r"] == 5
    assert isinstance(value["data"], dict) and isinstance(value["gw"], dict)
    assert isinstance(value["gw"]["created_at"], int)
    assert value["data"] == {"a": [1]}
    assert value["gw"]["conversation_id"] == "c" * 32

"""Encryption at rest (`SESSION_ENCRYPTION_KEYS`): what the store holds reveals nothing, a
tampered or copied value is no session, keys rotate (first encrypts, all decrypt), and the
documented transitions (plaintext before the key was set, a retired key) behave as docs/security.md
says. Memory store, fakeredis and a real redis-server; several gateways share one store.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import fakeredis
import pytest
from cryptography.fernet import Fernet
from pytest_aiohttp import AiohttpClient

from app.config import ConfigError, Settings
from app.keys import BACKEND_KEY, STORAGE_APP_KEY
from app.main import create_app
from app.sessions.codec import FORMAT_VERSION
from app.sessions.memory import MemoryBackend
from app.sessions.redis import RedisBackend
from tests.conftest import (
    CSRF,
    STORE_KINDS,
    Gateway,
    GatewayFactory,
    MemoryRaw,
    RedisRaw,
    make_settings,
)
from tests.gateway_process import run_gateway_to_exit
from tests.test_sessions_http import UNKNOWN_SID, patch, set_cookie_headers

K1 = Fernet.generate_key().decode()
K2 = Fernet.generate_key().decode()
SECRET = "s3cr3t-Zoë"

MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture(params=STORE_KINDS)
async def gateways(
    request: pytest.FixtureRequest,
    gateway_factory: GatewayFactory,
    aiohttp_client: AiohttpClient,
) -> MakeGateway:
    """`await gateways(SESSION_ENCRYPTION_KEYS=...)`: gateways that all share ONE store (as
    replicas, or one replica across a restart with new settings, would)."""
    kind: str = request.param
    if kind == "redis":

        async def on_redis(**env: str) -> Gateway:
            return await gateway_factory("redis", **env)

        return on_redis
    if kind == "memory":
        memory = MemoryBackend()

        async def on_memory(**env: str) -> Gateway:
            settings = make_settings(env, SESSION_STORE="memory")
            client = await aiohttp_client(create_app(settings, backend=memory))
            return Gateway(kind=kind, client=client, raw=MemoryRaw(memory))

        return on_memory
    server = fakeredis.FakeServer()

    async def on_fakeredis(**env: str) -> Gateway:
        environ = {"REDIS_URL": "redis://fakeredis.invalid:6379/0", **env}
        settings = make_settings(environ, SESSION_STORE="redis")
        fake = fakeredis.FakeAsyncRedis(server=server)
        client = await aiohttp_client(create_app(settings, backend=RedisBackend(fake)))
        assert isinstance(client.app[BACKEND_KEY], RedisBackend)
        return Gateway(kind=kind, client=client, raw=RedisRaw(fake))

    return on_fakeredis


async def with_sid(
    gateway: Gateway, method: str, path: str, sid: str | None, body: Any = None
) -> tuple[int, Any, str | None]:
    """One request carrying only `sid` (no cookie jar): (status, JSON, the new cookie)."""
    headers = {**CSRF, **({"Cookie": f"agent_sid={sid}"} if sid else {})}
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.request(method, gateway.client.make_url(path), json=body, headers=headers) as resp,
    ):
        payload = await resp.json() if resp.content_type == "application/json" else None
        morsel = resp.cookies.get("agent_sid")
        return resp.status, payload, morsel.value if morsel is not None else None


async def new_session(gateway: Gateway, data: dict[str, Any]) -> str:
    status, _, sid = await with_sid(gateway, "PATCH", "/apps/demo/session", None, data)
    assert status == 200 and sid
    return sid


async def read(gateway: Gateway, sid: str) -> Any:
    status, body, _ = await with_sid(gateway, "GET", "/apps/demo/session", sid)
    assert status == 200
    return body["data"]


def token_of(raw: bytes) -> bytes:
    value = json.loads(raw)
    assert set(value) == {"v", "r", "enc"}, value
    return str(value["enc"]).encode()


# -- what the store holds ------------------------------------------------------------------


async def test_the_store_holds_only_ciphertext(gateways: MakeGateway) -> None:
    gw = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    await patch(gw.client, {"secret": SECRET, "card": "4111111111111111"})
    # The demo agent: the gateway stores a conversation id in the session.
    resp = await gw.client.post("/apps/demo/agent/chat", json={"message": "hi"}, headers=CSRF)
    assert resp.status == 200
    await resp.read()
    sid = gw.session_id()
    assert sid is not None
    raw = await gw.raw.get(gw.key(sid))
    assert raw is not None
    hidden = [SECRET.encode(), b"s3cr3t", b"4111", b"created_at", b"conversation", b"data"]
    for plain in hidden:
        assert plain not in raw, plain
    token = token_of(raw)
    assert Fernet(K1.encode()).decrypt(token)  # really Fernet under the configured key
    assert json.loads(raw)["v"] == FORMAT_VERSION
    assert await read(gw, sid) == {"secret": SECRET, "card": "4111111111111111"}


async def test_a_tampered_value_is_no_session(gateways: MakeGateway) -> None:
    """No key opens it: Fernet cannot tell a tampered token from one under a key this replica
    lacks (which another replica may read), so it is left to its TTL, never used."""
    gw = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    sid = await new_session(gw, {"role": "guest"})
    key = gw.key(sid)
    raw = await gw.raw.get(key)
    assert raw is not None
    value = json.loads(raw)
    token = bytearray(base64.urlsafe_b64decode(value["enc"]))
    token[40] ^= 0x01  # one bit of the ciphertext
    value["enc"] = base64.urlsafe_b64encode(bytes(token)).decode()
    tampered = json.dumps(value, separators=(",", ":")).encode()
    await gw.raw.set(key, tampered, 600)
    assert await read(gw, sid) == {}
    assert await gw.raw.get(key) == tampered
    # A write with that cookie starts a fresh session, never a 500.
    status, body, new_sid = await with_sid(gw, "PATCH", "/apps/demo/session", sid, {"a": 1})
    assert (status, body) == (200, {"data": {"a": 1}})
    assert new_sid is not None and new_sid != sid


async def test_a_ciphertext_copied_to_another_session_is_refused(gateways: MakeGateway) -> None:
    """With write access to Redis one could paste an admin's (valid) value under one's own
    id; the value is bound to its own application and session id."""
    gw = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    admin = await new_session(gw, {"role": "admin"})
    mine = await new_session(gw, {"role": "guest"})
    admin_raw = await gw.raw.get(gw.key(admin))
    assert admin_raw is not None
    await gw.raw.set(gw.key(mine), admin_raw, 600)
    assert await read(gw, mine) == {}
    assert await gw.raw.get(gw.key(mine)) is None
    assert await read(gw, admin) == {"role": "admin"}


async def test_updates_and_rotation_keep_working_encrypted(gateways: MakeGateway) -> None:
    gw = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    await patch(gw.client, {"a": 1})
    await patch(gw.client, {"b": 2})
    resp = await gw.client.post("/apps/demo/session/rotate", headers=CSRF)
    assert (await resp.json()) == {"data": {"a": 1, "b": 2}, "rotated": True}
    await patch(gw.client, {"c": 3})
    assert await (await gw.client.get("/apps/demo/session")).json() == {
        "data": {"a": 1, "b": 2, "c": 3}
    }
    sid = gw.session_id()
    assert sid is not None
    raw = await gw.raw.get(gw.key(sid))
    assert raw is not None
    assert json.loads(raw)["r"] == 4  # create, update, rotate, update
    token_of(raw)
    # The old id's rotation tombstone holds no data (plaintext: nothing to hide), and answers
    # 409 session_rotated even with encryption on (never "re-encrypted" or removed).
    (old_key,) = [k for k in await gw.raw.keys() if k != gw.key(sid)]
    tomb = await gw.raw.get(old_key)
    assert tomb is not None and set(json.loads(tomb)) == {"v", "r", "rotated"}
    old_sid = old_key.rpartition(":")[2]
    gw.client.session.cookie_jar.clear()  # only the old id
    resp = await gw.client.get("/apps/demo/session", headers={"Cookie": f"agent_sid={old_sid}"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "session_rotated"
    assert await gw.raw.get(old_key) == tomb


# -- keys rotate -----------------------------------------------------------------------------


async def test_keys_rotate_first_encrypts_all_decrypt(gateways: MakeGateway) -> None:
    old = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    sid = await new_session(old, {"a": 1})
    untouched = await new_session(old, {"b": 2})

    # Step 1 of a key rotation: the new key first, the old one still listed.
    both = await gateways(SESSION_ENCRYPTION_KEYS=f"{K2}, {K1}")
    assert await read(both, sid) == {"a": 1}
    status, _, _ = await with_sid(both, "PATCH", "/apps/demo/session", sid, {"a": 2})
    assert status == 200
    raw = await both.raw.get(both.key(sid))
    assert raw is not None
    Fernet(K2.encode()).decrypt(token_of(raw))  # re-encrypted under the new key on write

    # Step 2: the old key retired. Sessions written since step 1 read; the others are no
    # session here (left in place: a replica still listing the old key can read them).
    new = await gateways(SESSION_ENCRYPTION_KEYS=K2)
    assert await read(new, sid) == {"a": 2}
    assert await read(new, untouched) == {}
    assert await read(both, untouched) == {"b": 2}


async def test_a_session_only_read_moves_to_the_new_key_after_one_idle_ttl(
    gateways: MakeGateway,
) -> None:
    """After the first key changed, a session nobody writes is re-encrypted by a read once its
    token is one idle TTL old (so dropping the old key later logs nobody out); a fresher
    token is left alone (replicas on `K1,K2` and `K2,K1` during a deploy would otherwise
    rewrite it back and forth on every read)."""
    old = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    sid = await new_session(old, {"a": 1})
    new = await gateways(SESSION_ENCRYPTION_KEYS=f"{K2},{K1}")
    key = new.key(sid)
    before = await new.raw.get(key)
    assert await read(new, sid) == {"a": 1}
    assert await new.raw.get(key) == before, "a fresh older-key token was rewritten"

    ttl = new.settings.session_ttl_seconds
    storage = new.app[STORAGE_APP_KEY]
    storage.clock = lambda: time.time() + ttl + 1  # the token is now one idle TTL old
    assert await read(new, sid) == {"a": 1}
    raw = await new.raw.get(key)
    assert raw is not None and raw != before
    Fernet(K2.encode()).decrypt(token_of(raw))  # under the new key now, by a read
    assert json.loads(raw)["r"] == json.loads(before or b"{}")["r"] + 1

    only_new = await gateways(SESSION_ENCRYPTION_KEYS=K2)
    assert await read(only_new, sid) == {"a": 1}


async def test_switching_encryption_on_keeps_plaintext_sessions(gateways: MakeGateway) -> None:
    """Sessions stored before `SESSION_ENCRYPTION_KEYS` was set stay valid: read, and
    re-encrypted at once (a read) or on the write."""
    plain = await gateways()
    read_first = await new_session(plain, {"a": 1})
    written_first = await new_session(plain, {"b": 1})
    encrypted = await gateways(SESSION_ENCRYPTION_KEYS=K1)

    assert await read(encrypted, read_first) == {"a": 1}
    raw = await encrypted.raw.get(encrypted.key(read_first))
    assert raw is not None and b'"a"' not in raw
    Fernet(K1.encode()).decrypt(token_of(raw))  # re-encrypted by the read
    assert json.loads(raw)["r"] == 2
    assert await read(encrypted, read_first) == {"a": 1}

    status, body, cookie = await with_sid(
        encrypted, "PATCH", "/apps/demo/session", written_first, {"c": 2}
    )
    assert (status, body, cookie) == (200, {"data": {"b": 1, "c": 2}}, None)  # same id
    raw = await encrypted.raw.get(encrypted.key(written_first))
    assert raw is not None
    Fernet(K1.encode()).decrypt(token_of(raw))
    assert await read(encrypted, written_first) == {"b": 1, "c": 2}


async def test_encrypted_sessions_are_no_session_without_keys(gateways: MakeGateway) -> None:
    """A replica without keys (encryption being switched off, or on and not yet deployed
    there) cannot read them, and leaves them to the replicas that can."""
    encrypted = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    sid = await new_session(encrypted, {"a": 1})
    plain = await gateways()
    assert await read(plain, sid) == {}
    assert await read(encrypted, sid) == {"a": 1}


async def test_a_rolling_key_change_logs_nobody_out(gateways: MakeGateway) -> None:
    """The documented rollout, replicas on two configurations at every step sharing one
    store: add the new key second, deploy; move it first, deploy; drop the old one."""
    old = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    sid = await new_session(old, {"n": 0})

    # Step 1: some replicas list `K1,K2` (still encrypting with K1), others only K1.
    step1 = await gateways(SESSION_ENCRYPTION_KEYS=f"{K1},{K2}")
    for n, (writer, reader) in enumerate([(step1, old), (old, step1)], start=1):
        status, _, _ = await with_sid(writer, "PATCH", "/apps/demo/session", sid, {"n": n})
        assert status == 200
        assert await read(reader, sid) == {"n": n}

    # Step 2: some replicas encrypt with K2 (`K2,K1`), the others still list both.
    step2 = await gateways(SESSION_ENCRYPTION_KEYS=f"{K2},{K1}")
    untouched = await new_session(step1, {"u": 1})  # under K1
    for n, (writer, reader) in enumerate([(step2, step1), (step1, step2), (step2, step1)], 3):
        status, _, _ = await with_sid(writer, "PATCH", "/apps/demo/session", sid, {"n": n})
        assert status == 200
        assert await read(reader, sid) == {"n": n}
    raw = await step2.raw.get(step2.key(sid))
    assert raw is not None
    Fernet(K2.encode()).decrypt(token_of(raw))

    # A replica that lacks the key a value was written with: no session, but nothing
    # deleted (e.g. an old-config replica during a rollout that skipped step 1).
    assert await read(old, sid) == {}
    assert await read(step2, sid) == {"n": 5}

    # Step 3: K1 dropped. Values still under K1 are no session there, yet kept for the
    # replicas that still list K1 until they are rewritten or expire.
    step3 = await gateways(SESSION_ENCRYPTION_KEYS=K2)
    assert await read(step3, sid) == {"n": 5}
    assert await read(step3, untouched) == {}
    assert await read(step2, untouched) == {"u": 1}


async def test_the_size_limit_applies_to_the_plaintext(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("memory", SESSION_ENCRYPTION_KEYS=K1, SESSION_MAX_BYTES="300")
    resp = await patch(gw.client, {"text": "x" * 200})
    assert resp.status == 200
    sid = gw.session_id()
    assert sid is not None
    raw = await gw.raw.get(gw.key(sid))
    assert raw is not None and len(raw) > 300  # the ciphertext may be larger
    resp = await patch(gw.client, {"text": "x" * 300})
    assert resp.status == 413
    assert set_cookie_headers(resp) == []


async def test_junk_in_the_envelope_is_no_session(gateways: MakeGateway) -> None:
    gw = await gateways(SESSION_ENCRYPTION_KEYS=K1)
    key = gw.key(UNKNOWN_SID)
    for junk in (
        b'{"v":1,"r":1,"enc":42}',
        b'{"v":1,"r":1,"enc":"not a token"}',
        b'{"v":1,"r":1,"enc":"\xc3\xa9t\xc3\xa9"}',
        b'{"v":1,"r":1,"enc":""}',
        (
            "{" + '"v":1,"r":1,"enc":"' + Fernet(K1.encode()).encrypt(b"[1]").decode() + '"}'
        ).encode(),
        ("{" + '"v":1,"r":1,"enc":"' + Fernet(K1.encode()).encrypt(b"{").decode() + '"}').encode(),
    ):
        await gw.raw.set(key, junk, 600)
        assert await read(gw, UNKNOWN_SID) == {}, junk
        assert await gw.raw.get(key) is None, junk


# -- configuration ---------------------------------------------------------------------------


def test_keys_are_parsed_in_order_and_kept_out_of_repr() -> None:
    settings = make_settings(SESSION_ENCRYPTION_KEYS=f" {K2} ,{K1},")
    assert settings.session_encryption_keys == (K2, K1)
    assert K1 not in repr(settings) and K2 not in repr(settings)
    assert make_settings().session_encryption_keys == ()


@pytest.mark.parametrize(
    "value",
    [
        "not-a-key",
        "A" * 43,
        base64.urlsafe_b64encode(b"x" * 16).decode(),
        f"{K1},short",
        f"{K1},{K1}",
        "clé-é" * 9,
    ],
    ids=lambda value: value.replace(K1, "<k1>"),
)
def test_a_bad_key_is_a_config_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SESSION_ENCRYPTION_KEYS": value}, dotenv_path=None)
    (problem,) = info.value.problems
    assert problem.startswith("SESSION_ENCRYPTION_KEYS entry ")
    for part in value.split(","):
        if len(part) > 8:
            assert part not in problem, "a key was echoed"


@pytest.mark.system
def test_a_bad_key_stops_the_process_with_exit_2() -> None:
    code, stderr, _ = run_gateway_to_exit({"SESSION_ENCRYPTION_KEYS": f"{K1},nope-not-a-key"})
    assert code == 2, stderr
    assert "SESSION_ENCRYPTION_KEYS entry 2 of 2 is not a valid key" in stderr
    assert K1 not in stderr and "nope-not-a-key" not in stderr


@pytest.mark.system
def test_the_cost_script_runs() -> None:
    """scripts/session_crypto_cost.py (the numbers in docs/security.md), codec part, briefly."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "session_crypto_cost.py"
    done = subprocess.run(
        [sys.executable, str(script), "--codec-only", "--iterations", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "encrypted" in done.stdout and "60 KB" in done.stdout

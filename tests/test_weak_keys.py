"""Issue 12 row 12a: weak `SESSION_ENCRYPTION_KEYS` are refused at start (exit 2, one line
naming the variable and the entry's position, never the key), and a key repeated under another
base64 spelling counts as a repeat. Keys from `Fernet.generate_key()` always pass."""

from __future__ import annotations

import base64

import pytest
from cryptography.fernet import Fernet

from app.config import ConfigError, Settings
from app.encryption_keys import key_weakness
from tests.gateway_process import run_gateway_to_exit


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


GOOD = Fernet.generate_key().decode()
WEAK = {
    "all zero": b64(bytes(32)),
    "one byte repeated": b64(b"\xa5" * 32),
    "a short pattern": b64(b"\x13\x37\xbe\xef" * 8),
    "a counter": b64(bytes(range(32))),
    "a counter with a step": b64(bytes(range(0, 256, 8))),
    "equal halves": b64(base64.urlsafe_b64decode(GOOD)[:16] * 2),
    "a passphrase": b64(b"correct horse battery staple 123"),
}


def problems_of(keys: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"SESSION_ENCRYPTION_KEYS": keys}, dotenv_path=None)
    return info.value.problems


@pytest.mark.parametrize("name", list(WEAK))
def test_a_weak_key_is_refused_by_position_without_echoing_it(name: str) -> None:
    weak = WEAK[name]
    Fernet(weak.encode())  # a well-formed Fernet key: only its content is wrong
    problems = problems_of(f"{GOOD},{weak}")
    assert len(problems) == 1, problems
    assert problems[0].startswith("SESSION_ENCRYPTION_KEYS entry 2 of 2 is a weak key"), problems
    assert "generate_key" in problems[0]
    assert weak not in problems[0] and GOOD not in problems[0]


def test_a_repeated_key_is_refused_also_under_another_spelling() -> None:
    assert problems_of(f"{GOOD},{GOOD}") == [
        "SESSION_ENCRYPTION_KEYS entry 2 of 2 repeats an earlier key: remove it"
    ]
    # The last base64 character carries 2 unused bits: flipping them is the same 32 bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(GOOD[-2])
    respelled = GOOD[:-2] + alphabet[last ^ 1] + GOOD[-1]
    assert respelled != GOOD
    assert base64.urlsafe_b64decode(respelled) == base64.urlsafe_b64decode(GOOD)
    assert problems_of(f"{GOOD},{respelled}") == [
        "SESSION_ENCRYPTION_KEYS entry 2 of 2 repeats an earlier key: remove it"
    ]


def test_generated_keys_always_pass() -> None:
    for _ in range(20_000):
        assert key_weakness(base64.urlsafe_b64decode(Fernet.generate_key())) is None
    two = f"{Fernet.generate_key().decode()},{Fernet.generate_key().decode()}"
    settings = Settings.from_env({"SESSION_ENCRYPTION_KEYS": two}, dotenv_path=None)
    assert len(settings.session_encryption_keys) == 2


@pytest.mark.system
def test_a_real_process_exits_2_on_an_all_zero_key() -> None:
    code, stderr, _ = run_gateway_to_exit({"SESSION_ENCRYPTION_KEYS": WEAK["all zero"]})
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [
        "agent-bff: configuration error: SESSION_ENCRYPTION_KEYS entry 1 of 1 is a weak key "
        "(every byte is 0x00): generate one with: python -c 'from cryptography.fernet import "
        "Fernet; print(Fernet.generate_key().decode())'"
    ], stderr
    assert WEAK["all zero"] not in stderr

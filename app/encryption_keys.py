"""`SESSION_ENCRYPTION_KEYS`: Fernet keys parsed and checked (`parse_encryption_keys`), a key
that cannot have come from a random generator refused (`key_weakness`)."""

from __future__ import annotations

import base64
import itertools

# A Fernet key is 32 bytes: a 16-byte signing key and a 16-byte encryption key. For 16 random
# bytes, fewer than 8 distinct byte values has a probability of about 6e-13 (for the 15 steps
# between them, about 2e-11), and 32 random bytes all printable ASCII about 2e-14: such a key
# was typed, counted or derived from text, not generated.
_MIN_DISTINCT_BYTES_PER_HALF = 8
_PRINTABLE_ASCII = frozenset(range(0x20, 0x7F))
_KEY_HINT = (
    "generate one with: python -c 'from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())'"
)


def key_weakness(key: bytes) -> str | None:
    """Why the 32 raw bytes of a Fernet key cannot have come from a random generator, or None.

    Refused: a half (the signing or the encryption key) with fewer than
    `_MIN_DISTINCT_BYTES_PER_HALF` distinct byte values (all zeros, a repeated pattern) or
    distinct steps from one byte to the next (a counter such as 00 01 02 ...), both halves equal,
    or every byte printable ASCII (a password or a phrase, encoded). A key from
    `Fernet.generate_key()` fails one of these with a probability under 1e-10."""
    signing, encryption = key[:16], key[16:]
    if len(set(key)) == 1:
        return f"every byte is {key[0]:#04x}"
    for half in (signing, encryption):
        steps = {(b - a) % 256 for a, b in itertools.pairwise(half)}
        if min(len(set(half)), len(steps)) < _MIN_DISTINCT_BYTES_PER_HALF:
            return "too few distinct bytes (a pattern or a counter, not random bytes)"
    if signing == encryption:
        return "its signing and encryption halves are equal"
    if _PRINTABLE_ASCII.issuperset(key):
        return "it is printable text, not random bytes"
    return None


def parse_encryption_keys(raw: str, problems: list[str]) -> tuple[str, ...]:
    """`SESSION_ENCRYPTION_KEYS`: comma-separated Fernet keys (32 random bytes, URL-safe
    base64). A bad entry is reported by position, never echoed (it is a secret): one that does
    not decode, a weak one (`key_weakness`), or one repeating an earlier entry (compared as
    bytes, so another spelling of the same base64 is a repeat too)."""
    entries = [item.strip() for item in raw.split(",") if item.strip()]
    if not entries:
        return ()
    # Imported only when keys are set: cryptography's OpenSSL bindings add ~8.6 MB of RSS to
    # every replica, which the default (no encryption) does not need.
    from cryptography.fernet import Fernet

    keys: list[str] = []
    seen: set[bytes] = set()
    for position, item in enumerate(entries, start=1):
        where = f"SESSION_ENCRYPTION_KEYS entry {position} of {len(entries)}"
        try:
            Fernet(item.encode("ascii"))
            key = base64.urlsafe_b64decode(item.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            problems.append(
                f"{where} is not a valid key: each key is 32 random bytes in URL-safe base64 "
                f"(44 characters); {_KEY_HINT}"
            )
            continue
        weakness = key_weakness(key)
        if weakness is not None:
            problems.append(f"{where} is a weak key ({weakness}): {_KEY_HINT}")
            continue
        if key in seen:
            problems.append(f"{where} repeats an earlier key: remove it")
            continue
        seen.add(key)
        keys.append(item)
    return tuple(keys)

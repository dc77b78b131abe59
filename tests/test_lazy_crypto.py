"""Without `SESSION_ENCRYPTION_KEYS` the gateway never loads cryptography's Fernet bindings
(~8 MB of RSS per replica); with keys it does."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from tests.gateway_process import REPO_ROOT

PROBE = """
import sys
from app.config import Settings
from app.main import create_app
from app.sessions.codec import SessionCodec

env = {"SESSION_STORE": "memory"}
if len(sys.argv) > 1:
    env["SESSION_ENCRYPTION_KEYS"] = sys.argv[1]
settings = Settings.from_env(env, dotenv_path=None)
create_app(settings)
SessionCodec(settings.session_encryption_keys)
print(any(name.startswith("cryptography.hazmat.bindings") for name in sys.modules))
"""


@pytest.mark.parametrize("with_keys", [False, True])
@pytest.mark.system
def test_the_fernet_bindings_load_only_with_encryption_keys(with_keys: bool) -> None:
    args = [Fernet.generate_key().decode()] if with_keys else []
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(with_keys)

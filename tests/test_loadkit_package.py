"""The load kit as a package (`app.loadkit`): the commands `pip install 'agent-bff[load]'`
installs, what they say without the extra, and a gateway that never loads the kit."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.gateway_process import REPO_ROOT

COMMANDS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent


def test_the_kit_declares_its_three_commands() -> None:
    assert COMMANDS == {
        "agent-bff-loadgen": "app.loadkit.commands:loadgen",
        "agent-bff-stub": "app.loadkit.commands:stub",
        "agent-bff-bench": "app.loadkit.commands:bench",
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.system
def test_each_installed_command_answers_help(command: str) -> None:
    """The console scripts pip wrote into the virtualenv (scripts/install reinstalls it when
    pyproject.toml changes) run and print their own usage."""
    path = BIN / command
    assert path.exists(), f"{path} missing: run scripts/install --dev"
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {command} ")


@pytest.mark.parametrize("command", ["loadgen", "bench"])
@pytest.mark.system
def test_a_command_without_the_load_extra_says_what_to_install(command: str) -> None:
    """As after a plain `pip install agent-bff`: hdrhistogram cannot be imported."""
    code = (
        "import sys; sys.modules['hdrh'] = None; sys.argv[1:] = ['--help']; "
        f"from app.loadkit.commands import {command}; sys.exit({command}())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "missing: hdrh" in done.stderr
    assert "pip install 'agent-bff[load]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.system
def test_the_stub_needs_no_extra() -> None:
    code = (
        "import sys; sys.modules['hdrh'] = sys.modules['matplotlib'] = None; "
        "sys.argv[1:] = ['--help']; from app.loadkit.commands import stub; sys.exit(stub())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.system
def test_the_gateway_loads_no_part_of_the_kit() -> None:
    """`python -m app` imports app.__main__ and builds the application through create_app: none
    of it may import app.loadkit or the kit's extra dependencies."""
    code = (
        "import sys, app.__main__; from app.config import Settings; from app.main import "
        "create_app; create_app(Settings.from_env({'SESSION_STORE': 'memory'}, dotenv_path=None))"
        "; print('\\n'.join(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "app.main" in loaded
    kit = [name for name in loaded if name.split(".")[0] in ("hdrh", "matplotlib")]
    kit += [name for name in loaded if name.startswith("app.loadkit")]
    assert kit == []

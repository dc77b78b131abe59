"""The first hour, as a new user meets it: `scripts/run` (arguments, `.env`), the start-up log,
the package build (no deprecation noise, a licence), and `scripts/cluster status` after `down`.

`scripts/run` is run for real; every case here ends by itself before binding a port (`--help`,
or a configuration error from the `.env` under test, exit 2), so nothing is left listening.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from app.__main__ import main
from app.loadkit.ports import free_port
from scripts import cluster
from tests.gateway_process import REPO_ROOT, GatewayProcess

RUN = REPO_ROOT / "scripts" / "run"


def run_script(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`scripts/run ARGS` from `cwd` with a clean environment plus `env`."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [str(RUN), *args],
        cwd=cwd,
        env={**base, "HOST": "127.0.0.1", "PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.system
def test_scripts_run_help_prints_usage_and_serves_nothing(tmp_path: Path) -> None:
    """Before: `scripts/run --help` ignored the argument and started a server."""
    done = run_script(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m app"), done.stdout
    text = " ".join(done.stdout.split())
    assert "--env-file PATH" in text and "README.md, 'Configuration'" in text
    assert "listening on" not in done.stderr


@pytest.mark.system
def test_scripts_run_reads_the_env_file_of_the_working_directory(tmp_path: Path) -> None:
    """Before: scripts/run changed to the repository and read its `.env`, not the caller's."""
    (tmp_path / ".env").write_text("SESSION_TTL_SECONDS=soon\n")
    done = run_script(tmp_path)
    assert done.returncode == 2, done.stderr
    assert "SESSION_TTL_SECONDS" in done.stderr
    # Relative paths in it (APPS_FILE) are relative to the same directory.
    (tmp_path / ".env").write_text("APPS_FILE=apps.toml\n")
    (tmp_path / "apps.toml").write_text('[apps.shop]\nupstream = "ftp://nowhere"\n')
    done = run_script(tmp_path)
    assert done.returncode == 2, done.stderr
    assert "APPS_FILE 'apps.toml' [apps.shop]" in done.stderr
    # --env-file names another file instead; one that does not exist is an error.
    (tmp_path / "prod.env").write_text("SESSION_STORE=floppy\n")
    done = run_script(tmp_path, "--env-file", "prod.env")
    assert done.returncode == 2 and "SESSION_STORE" in done.stderr, done.stderr
    done = run_script(tmp_path, "--env-file", "missing.env")
    assert done.returncode == 2 and "--env-file missing.env: no such file" in done.stderr


def test_python_m_app_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "usage: python -m app" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["--port", "80"])  # settings are environment variables, not options
    assert done.value.code == 2


@pytest.mark.system
def test_the_start_up_log_lists_the_applications(tmp_path: Path) -> None:
    apps = tmp_path / "apps.toml"
    apps.write_text(
        '[apps.shop]\nupstream = "http://127.0.0.1:9/v1"\n\n'
        '[apps.demo]\nupstream = "builtin:demo"\n'
    )
    with GatewayProcess({"APPS_FILE": str(apps)}) as gateway:
        log = gateway.stderr
    assert (
        f"applications (2, APPS_FILE={apps}): demo -> builtin:demo, shop -> http://127.0.0.1:9/v1"
        in log
    )
    with GatewayProcess({}) as gateway:
        log = gateway.stderr
    assert "applications (1, built-in default): demo -> builtin:demo" in log


# -- packaging ------------------------------------------------------------------------------


@pytest.mark.system
def test_the_build_prints_no_deprecation_and_ships_the_licence(tmp_path: Path) -> None:
    """Before: every install printed `project.license as a TOML table is deprecated` (3 x 15
    lines). The build backend runs as pip runs it, with every warning shown."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    [requirement] = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    installed = Version(importlib.metadata.version("setuptools"))
    assert installed in SpecifierSet(requirement.removeprefix("setuptools"))
    assert installed >= Version("77")
    code = (
        "import sys; from setuptools import build_meta; "
        "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", code, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    output = (done.stdout + done.stderr).lower()
    assert "deprecat" not in output and "warning" not in output, done.stderr
    dist_info = tmp_path / done.stdout.strip().splitlines()[-1]
    metadata = (dist_info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    licence = (REPO_ROOT / "LICENSE").read_text()
    assert (dist_info / "licenses" / "LICENSE").read_text() == licence
    assert project["project"]["license"] == "Apache-2.0"
    assert licence.lstrip().startswith("Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in licence


def test_the_changelog_names_the_current_version() -> None:
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert f"## {version}" in changelog or "## Unreleased" in changelog


# -- scripts/cluster ------------------------------------------------------------------------


def test_cluster_status_after_down_says_how_to_start(tmp_path: Path) -> None:
    """Before: `status` after `down` still said "stop it with: scripts/cluster down"."""
    state = cluster.State(
        dir=str(tmp_path),
        lb_port=free_port(),
        redis_port=None,
        redis_url="",
        store="memory",
        python=sys.executable,
        workdir=str(tmp_path),
        replicas=[cluster.Replica(index=0, port=free_port())],
    )
    stopped = cluster._summary(state)
    assert "stop it with" not in stopped
    assert stopped.splitlines()[-1] == "nothing is running: start it with: scripts/cluster up"
    # This test's own process stands in for a running replica.
    started = cluster._start_time(os.getpid())
    assert started is not None
    state.replicas[0].proc = cluster.Proc(pid=os.getpid(), started=started, log="r.log")
    assert cluster._summary(state).splitlines()[-1] == "stop it with: scripts/cluster down"

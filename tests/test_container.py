"""The container image and the deployment files, checked without a Docker engine.

- The Dockerfile is hadolint-clean and has the shape the deployment relies on (multi-stage,
  non-root numeric user, exec-form entrypoint, HEALTHCHECK on /healthz, scripts/install).
- The image's steps run here as plain processes: a small interpreter for the Dockerfile's
  own instructions replays the build stage (COPY into a fresh context, RUN the shared
  `scripts/install` into a fresh virtualenv) and starts the runtime stage's ENTRYPOINT as its
  non-root USER with only its ENV plus environment configuration; then /healthz, the
  HEALTHCHECK command, a session round trip stored in Redis, and a clean SIGTERM exit.
- deploy/compose.yaml validates against the compose-spec schema, deploy/k8s/*.yaml against the
  Kubernetes schemas (strict), and deploy/nginx.conf keeps its streaming and retry settings
  and passes `nginx -t` once rendered by scripts/cluster. Each validator is also shown a
  broken file, so a validator that checks nothing cannot pass the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from app.loadkit.ports import free_port
from scripts import cluster
from tests.gateway_process import REPO_ROOT
from tests.redis_server import RedisServer

BIN = Path(sys.executable).parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "deploy" / "compose.yaml"
K8S = sorted((REPO_ROOT / "deploy" / "k8s").glob("*.yaml"))
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
INSTALL_TIMEOUT = float(os.environ.get("CONTAINER_INSTALL_TIMEOUT_SECONDS", "300"))
START_TIMEOUT = float(os.environ.get("CONTAINER_START_TIMEOUT_SECONDS", "20"))


def tool(name: str, *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """Run a checker installed with the dev extras (next to this interpreter)."""
    path = BIN / name
    assert path.exists(), f"{name} missing: run scripts/install --dev (dev extras)"
    return subprocess.run(
        [str(path), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# -- the Dockerfile, parsed -----------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name}: no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile (continuations joined, comments dropped, ARGs applied)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            named = len(parts) == 3 and parts[1].lower() == "as"
            stages.append(Stage(base=base, name=parts[2] if named else str(len(stages))))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, rest))
    return stages


def env_pairs(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` -> {"A": "1", "B": "x y"}."""
    pairs: dict[str, str] = {}
    for token in shlex.split(args):
        name, _, value = token.partition("=")
        pairs[name] = value
    return pairs


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.mark.system
def test_dockerfile_is_hadolint_clean() -> None:
    done = tool("hadolint", str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr
    # The linter really lints: a classic mistake is reported.
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "Dockerfile"
        bad.write_text("FROM python\nRUN cd /src && pip install .\nCMD python -m app\n")
        assert tool("hadolint", str(bad)).returncode != 0


def test_dockerfile_shape(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage"
    build, runtime = stages[0], stages[-1]
    for stage in stages:
        assert stage.base == "python:3.11-slim"
    # Dependencies in their own layer: copied and installed before the application code.
    build_steps = [(i.keyword, i.args) for i in build.instructions]
    deps_at = build_steps.index(("RUN", "scripts/install --venv /opt/venv --deps-only"))
    app_at = build_steps.index(("COPY", "app app"))
    assert deps_at < app_at
    assert [a for k, a in build_steps[:deps_at] if k == "COPY"] == [
        "pyproject.toml ./",
        "scripts/install scripts/install",
    ]
    # Everything the build copies from the context passes .dockerignore (which ignores the rest).
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignore
    for args in build.all("COPY"):
        for source in args.split()[:-1]:
            assert f"!{source}" in ignore or f"!{source}/**" in ignore, source
    # Non-root, numeric (Kubernetes runAsNonRoot can verify it), exec-form entrypoint.
    user = runtime.last("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    assert json.loads(runtime.last("ENTRYPOINT")) == ["python", "-m", "app"]
    assert "/healthz" in runtime.last("HEALTHCHECK")
    env = {k: v for args in runtime.all("ENV") for k, v in env_pairs(args).items()}
    assert env["UVLOOP"] == "1"
    assert runtime.last("STOPSIGNAL") == "SIGTERM"


# -- the image's steps as plain processes ---------------------------------------------------


@dataclass
class Image:
    """What replaying the Dockerfile produced: paths mapped from the image to a temp dir."""

    root: Path
    paths: dict[str, Path]
    stages: list[Stage]

    def map(self, text: str) -> str:
        for image_path, host_path in self.paths.items():
            text = text.replace(image_path, str(host_path))
        return text

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        """The runtime stage's ENV (paths mapped) plus `extra`; nothing from this process."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
        for args in self.runtime.all("ENV"):
            for name, value in env_pairs(args).items():
                env[name] = self.map(value.replace("$PATH", env["PATH"]))
        env.update(extra)
        return env

    def user_argv(self, argv: list[str]) -> list[str]:
        """`argv` run as the runtime stage's USER (setpriv: we are root here)."""
        uid, _, gid = self.runtime.last("USER").partition(":")
        return [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid or uid}",
            "--clear-groups",
            *[self.map(a) for a in argv],
        ]


def _world_runnable(path: Path) -> bool:
    real = path.resolve()
    if not real.is_file() or not real.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in real.parents)


def runnable_python() -> str:
    """A Python >= 3.11 any user may run (a pyenv build under /root is not one)."""
    candidates = [Path("/usr/local/bin/python3"), Path("/usr/bin/python3")]
    candidates.append(Path(getattr(sys, "_base_executable", sys.executable)))
    for candidate in candidates:
        if not candidate.exists() or not _world_runnable(candidate):
            continue
        version = subprocess.run(
            [str(candidate), "-c", "import sys, venv; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if version.stdout.strip() == "True":
            return str(candidate)
    raise AssertionError(f"no Python >= 3.11 with venv runnable by every user in {candidates}")


def _copytree_ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or n.endswith(".pyc")}


@pytest.fixture(scope="module")
def image(stages: list[Stage]) -> Iterator[Image]:
    """Replay the build stage: COPY from the repository into a fresh context, RUN with the
    image's absolute paths mapped into a temp directory readable by the image's user."""
    root = Path(tempfile.mkdtemp(prefix="agent-bff-image-"))
    root.chmod(0o755)
    built = Image(root=root, paths={"/opt/venv": root / "venv"}, stages=stages)
    try:
        build = stages[0]
        workdir = root / "build-context"
        built.paths[build.last("WORKDIR")] = workdir
        workdir.mkdir()
        # The image's `python3` is world-executable; so must ours be (the venv links to it).
        env = {"PATH": os.environ["PATH"], "HOME": str(root), "PYTHON": runnable_python()}
        for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT"):
            if name in os.environ:
                env[name] = os.environ[name]
        for step in build.instructions:
            if step.keyword == "ENV":
                env.update(env_pairs(step.args))
            elif step.keyword == "COPY":
                *sources, dest = step.args.split()
                target = workdir / dest
                for source in sources:
                    src = REPO_ROOT / source
                    if src.is_dir():
                        shutil.copytree(src, target, ignore=_copytree_ignore)
                    else:
                        to = target / src.name if dest.endswith("/") else target
                        to.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, to)
            elif step.keyword == "RUN":
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", built.map(step.args)],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=INSTALL_TIMEOUT,
                    check=False,
                )
                assert done.returncode == 0, f"RUN {step.args}:\n{done.stdout}{done.stderr}"
        # The runtime stage: an empty WORKDIR, the venv copied from the build stage.
        runtime = stages[-1]
        copied = [a for a in runtime.all("COPY") if a.startswith("--from=")]
        assert copied == ["--from=build /opt/venv /opt/venv"]
        srv = root / "workdir"
        srv.mkdir()
        built.paths[runtime.last("WORKDIR")] = srv
        yield built
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _get(url: str, cookie: str | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def _proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.mark.system
def test_the_image_ships_the_load_kit_code_but_not_its_extra(image: Image) -> None:
    """The image is a plain install: the kit's commands exist; the stub (aiohttp only) runs,
    the load generator and the bench say which extra they need instead of a traceback."""
    env, workdir = image.env({}), image.paths[image.runtime.last("WORKDIR")]
    answers = {
        command: subprocess.run(
            image.user_argv([f"/opt/venv/bin/{command}", "--help"]),
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for command in ("agent-bff-stub", "agent-bff-loadgen", "agent-bff-bench")
    }
    assert answers["agent-bff-stub"].returncode == 0, answers["agent-bff-stub"].stderr
    for command in ("agent-bff-loadgen", "agent-bff-bench"):
        assert answers[command].returncode == 2, answers[command].stderr
        assert "pip install 'agent-bff[load]'" in answers[command].stderr
        assert "Traceback" not in answers[command].stderr


@pytest.mark.system
def test_the_image_steps_run_as_plain_processes(image: Image, shared_redis: RedisServer) -> None:
    installed = image.paths["/opt/venv"] / "lib" / "python3.11" / "site-packages" / "app"
    assert (installed / "__main__.py").exists(), "a regular install (not editable)"
    assert (installed / "static").is_dir(), "package data (the demo page) installed"
    port = free_port()
    env = image.env(
        {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "SESSION_STORE": "redis",
            "REDIS_URL": shared_redis.url,
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
            "LOG_FORMAT": "json",
        }
    )
    assert "PYTHONPATH" not in env  # the installed package, not this checkout
    entrypoint = json.loads(image.runtime.last("ENTRYPOINT"))
    workdir = image.paths[image.runtime.last("WORKDIR")]
    log = image.root / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            image.user_argv(entrypoint),
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if _get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        uid = int(image.runtime.last("USER").split(":")[0])
        assert _proc_uid(proc.pid) == uid

        # The HEALTHCHECK command, exactly as the image runs it (same user, same env).
        health = image.runtime.last("HEALTHCHECK")
        health_argv = json.loads(health[health.index("CMD") + 3 :].strip())
        checked = subprocess.run(
            image.user_argv(health_argv), env=env, cwd=workdir, timeout=10, check=False
        )
        assert checked.returncode == 0

        # A session round trip, stored in Redis under the spec's key.
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/apps/demo/session",
            data=b'{"cart": ["book"]}',
            method="PATCH",
            headers={"X-CSRF": "1", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            assert response.status == 200
            cookie = response.headers["Set-Cookie"].split(";", 1)[0]
        status, body, _ = _get(f"http://127.0.0.1:{port}/apps/demo/session", cookie)
        assert (status, json.loads(body)) == (200, {"data": {"cart": ["book"]}})
        session_id = cookie.split("=", 1)[1]
        with shared_redis.client() as redis:
            assert redis.ttl(f"agent:sess:demo:{session_id}") > 0
        assert _get(f"http://127.0.0.1:{port}/")[0] == 200  # the demo page (package data)
        status, metrics, _ = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "agent_bff_http_requests_total" in metrics

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        output = log.read_text()
        assert "event loop: uvloop" in output  # uvloop is installed and used
        assert session_id not in output
        # The health check fails once the process is gone.
        after = subprocess.run(
            image.user_argv(health_argv),
            env=env,
            cwd=workdir,
            timeout=10,
            check=False,
            capture_output=True,
        )
        assert after.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# -- deployment files -----------------------------------------------------------------------


@pytest.mark.system
def test_compose_file_is_valid_and_has_the_topology() -> None:
    done = tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert done.returncode == 0, done.stdout + done.stderr
    compose = YAML(typ="safe").load(COMPOSE.read_text())
    services = compose["services"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
    gateways = [s for s in services.values() if s.get("build", {}).get("dockerfile")]
    assert len(gateways) >= 3
    for gateway in gateways:
        assert gateway["environment"]["SESSION_STORE"] == "redis"
        grace = int(gateway["stop_grace_period"].rstrip("s"))
        assert grace > float(gateway["environment"]["SHUTDOWN_TIMEOUT_SECONDS"])
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["lb"]["volumes"]
    # The validator really validates.
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / "compose.yaml"
        broken.write_text("services:\n  web:\n    image: nginx\n    restart_policy: always\n")
        assert (
            tool(
                "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(broken)
            ).returncode
            != 0
        )


def _k8s_documents() -> list[dict[str, object]]:
    documents: list[dict[str, object]] = []
    for path in K8S:
        documents += [d for d in YAML(typ="safe").load_all(path.read_text()) if d]
    return documents


@pytest.mark.system
def test_kubernetes_manifests_are_valid() -> None:
    done = tool("kubernetes-validate", "--strict", "--quiet", *map(str, K8S))
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = {str(d["kind"]) for d in _k8s_documents()}
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= kinds
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / "broken.yaml"
        broken.write_text(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n"
            "spec:\n  ports:\n    - port: 80\n      targetPorts: http\n"
        )
        assert tool("kubernetes-validate", "--strict", "--quiet", str(broken)).returncode != 0


def test_kubernetes_deployment_drains_gracefully() -> None:
    (deployment,) = [d for d in _k8s_documents() if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]  # type: ignore[index]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SESSION_STORE"] == "redis"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Endpoints drop the pod during preStop; then the drain; then aiohttp's final 5 s.
    needed = float(pre_stop[1]) + float(env["SHUTDOWN_TIMEOUT_SECONDS"]) + 5
    assert pod["terminationGracePeriodSeconds"] > needed
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.system
def test_nginx_config_streams_and_never_replays_non_idempotent_requests(tmp_path: Path) -> None:
    text = NGINX_CONF.read_text()
    directives = [
        line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0]
    ]
    for wanted in (
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_read_timeout 3600s;",
        "proxy_next_upstream error timeout;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header Connection $upstream_connection;",
    ):
        assert wanted in directives, wanted
    assert not [d for d in directives if "non_idempotent" in d]
    # The same file, rendered for loopback by scripts/cluster, is accepted by nginx.
    state = cluster.State(
        dir=str(tmp_path),
        lb_port=free_port(),
        redis_port=None,
        redis_url="",
        store="redis",
        python=sys.executable,
        workdir=str(tmp_path),
    )
    rendered = cluster.render_nginx(text, state=state, ports=[free_port(), free_port()])
    assert "gateway1" not in rendered
    conf = tmp_path / "nginx.conf"
    conf.write_text(rendered)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "nginx-temp" / kind).mkdir(parents=True)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    done = subprocess.run(
        [nginx, "-t", "-q", "-e", str(tmp_path / "nginx.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr

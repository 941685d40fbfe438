"""The image built with README's command and run as the deploy files run it (issue 24).

The build command is read from README's "Deployment" section and run verbatim with whichever engine is here: a
Docker engine that answers, else podman (Debian's 4.3, root). With podman the command is the air-gapped one: the
base from Debian's packages (deploy/image/python-base.sh) and the locked wheels (deploy/image/wheelhouse.sh into
build/wheelhouse), prepared by `.ci/run` before the suite, so the build itself runs with `--network none`. The
containers then run against the session's dev server on loopback (`--network host`) or contact nothing beyond
their own loopback (the default bridge, a closed port as the secondary), with the SQLite file on a volume (a
directory of the host owned by the image's uid).

Without an engine, or without the prepared base and wheels, the tests are skipped with the reason; with
SYNCD_TEST_IMAGE=required (as `.ci/run` sets it) they fail instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from syncd.devserver.launcher import RunningDevServer
from tests.e2e import free_port
from tests.test_demo import demo_tables

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
IMAGE = "syncd:0.1.0"
IMAGE_UID = 10001
BASE_IMAGE = "localhost/python-base:3.11-bookworm"
WHEELHOUSE = ROOT / "build" / "wheelhouse"
PODMAN_CONF = ROOT / "deploy" / "image" / "containers.conf"
SHUTDOWN_TIMEOUT = 10   # syncd's default --shutdown-timeout
STOP_GRACE = 30         # the README's and the Dockerfile header's --stop-timeout
MAX_IMAGE_MB = 300

pytestmark = pytest.mark.slow


@dataclass
class Engine:
    """docker or podman, with the environment its commands need here."""

    name: str
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([self.name, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})
        if check and done.returncode != 0:
            raise AssertionError(f"{self.name} {shlex.join(args)} exited {done.returncode}: {done.stderr[-3000:]}")
        return done

    def read_only_flags(self) -> list[str]:
        """A read-only root as compose (`read_only`, `tmpfs: [/tmp]`) and Kubernetes (readOnlyRootFilesystem, an
        emptyDir on /tmp) make it: SQLite needs a writable temporary directory once a statement's journal spills
        (SQLITE_IOERR_GETTEMPPATH without one, seen here with the demo app's cascading deletes). podman's own
        /tmp is turned off so that the tmpfs is the one given."""
        return ["--read-only", *(["--read-only-tmpfs=false"] if self.name == "podman" else []),
                "--tmpfs", "/tmp:rw,size=64m,mode=1777"]


def unavailable(reason: str) -> None:
    if os.environ.get("SYNCD_TEST_IMAGE") == "required":
        pytest.fail(f"SYNCD_TEST_IMAGE=required: {reason}")
    pytest.skip(reason)


def find_engine() -> Engine | None:
    """A Docker engine that answers `docker info`, else podman; None without either."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
        return Engine("docker")
    if shutil.which("podman"):
        env = {} if os.environ.get("CONTAINERS_CONF") else {"CONTAINERS_CONF": str(PODMAN_CONF)}
        return Engine("podman", env)
    return None


def readme_build_command(engine: str) -> str:
    """The `ENGINE build ...` command of README's "Deployment" section, continuation lines joined."""
    section = README.read_text(encoding="utf-8").split("## Deployment", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        command = block.replace("\\\n", " ")
        for line in command.splitlines():
            if line.strip().startswith(f"{engine} build "):
                return " ".join(line.split())
    raise AssertionError(f"README's Deployment section gives no `{engine} build` command in a sh block")


@pytest.fixture(scope="session")
def engine() -> Engine:
    found = find_engine()
    if found is None:
        unavailable("no container engine: neither a Docker engine (`docker info`) nor podman")
    assert found is not None
    return found


@dataclass
class Built:
    image: str
    seconds: float
    command: str


@pytest.fixture(scope="session")
def built(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The image, built once per run by README's command (the other xdist workers wait for it, then reuse it)."""
    command = readme_build_command(engine.name)
    if engine.name == "podman":
        if engine.run("image", "exists", BASE_IMAGE, check=False).returncode != 0:
            unavailable(f"no base image {BASE_IMAGE}: run deploy/image/python-base.sh (README, Deployment)")
        if not any(WHEELHOUSE.glob("*.whl")):
            unavailable(f"no wheels in {WHEELHOUSE}: run deploy/image/wheelhouse.sh build/wheelhouse")
    basetemp = tmp_path_factory.getbasetemp()
    shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp  # the run's, not every run's
    with open(shared / "image-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = shared / "image-build.json"
        if record.exists():
            return Built(**json.loads(record.read_text()))
        before = image_id(engine)
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, **engine.env})
        assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        if before and before != image_id(engine):  # the image this build replaced, untagged now: not kept per run
            engine.run("rmi", before, check=False)
        result = Built(IMAGE, round(time.monotonic() - started, 1), command)
        record.write_text(json.dumps(result.__dict__))
        return result


def image_id(engine: Engine) -> str | None:
    found = engine.run("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False)
    return found.stdout.strip() if found.returncode == 0 else None


@pytest.fixture
def containers(engine: Engine) -> Iterator[list[str]]:
    """Names of the containers a test starts; removed afterwards whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        engine.run("rm", "-f", *(["-t", "0"] if engine.name == "podman" else []), name, check=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The volume: a host directory owned by the image's uid, as a new named volume mounted at /data is."""
    directory = tmp_path / "data"
    directory.mkdir()
    os.chown(directory, IMAGE_UID, IMAGE_UID)
    return directory


@pytest.fixture
def demo_secondary(devserver: RunningDevServer, pg: psycopg.Connection) -> Iterator[RunningDevServer]:
    """The session's dev server with the demo's users and empty demo tables (emptied again afterwards)."""
    with demo_tables(pg):
        yield devserver


def inspect_image(engine: Engine, image: str) -> dict[str, object]:
    config: dict[str, object] = json.loads(engine.run("image", "inspect", image).stdout)[0]
    return config


def healthcheck_command(engine: Engine, image: str) -> list[str]:
    """The image's HEALTHCHECK command (["CMD", ...] in the image's config: Docker keeps it in .Config.Healthcheck,
    podman 4.3 in .Healthcheck), without the CMD marker."""
    image = inspect_image(engine, image)
    config = image["Config"]
    assert isinstance(config, dict)
    healthcheck = config.get("Healthcheck") or image.get("Healthcheck") or {}
    assert isinstance(healthcheck, dict)
    test = healthcheck.get("Test")
    assert test and test[0] == "CMD", f"the image has no exec-form HEALTHCHECK: {test}"
    return list(test[1:])


def wait_for(url: str, status: int, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code == status:
                return answer
            last = f"{answer.status_code} {answer.text}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status} within {timeout} s (last: {last})")


def state(engine: Engine, name: str) -> dict[str, object]:
    value: dict[str, object] = json.loads(engine.run("inspect", name).stdout)[0]["State"]
    return value


def stop_within_grace(engine: Engine, name: str) -> float:
    """`stop` with README's timeout; the seconds it took. Asserts exit 0 (not 137: the grace was enough)."""
    started = time.monotonic()
    engine.run("stop", "-t", str(STOP_GRACE), name, timeout=STOP_GRACE + 30)
    took = time.monotonic() - started
    exit_code = state(engine, name)["ExitCode"]
    assert exit_code == 0, f"{name} exited {exit_code} on SIGTERM after {took:.1f} s:\n" + \
        engine.run("logs", name, check=False).stderr[-3000:]
    assert took < STOP_GRACE, f"{name} took {took:.1f} s to stop, the whole grace"
    return took


def wait_for_an_empty_outbox(db: Path, timeout: float) -> int:
    """The outbox's length once it is 0, or when `timeout` seconds have passed (read through SQLite, read-only)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            waiting = int(conn.execute("SELECT count(*) FROM _syncd_outbox").fetchone()[0])
        if waiting == 0 or time.monotonic() > deadline:
            return waiting
        time.sleep(0.5)


def app_in_image(engine: Engine, data: Path, *args: str) -> None:
    """The demo application, run from the image as compose's `app` service runs it."""
    engine.run("run", "--rm", "--network", "none", *engine.read_only_flags(), "--cap-drop", "ALL",
               "-v", f"{data}:/data", "--entrypoint", "python", IMAGE, "-m", "syncd.demo.app",
               "--db", "/data/app.sqlite3", *args, timeout=120)


def syncd_in_image(engine: Engine, data: Path, *args: str, network: str = "none", extra: Sequence[str] = (),
                   check: bool = True) -> subprocess.CompletedProcess[str]:
    """A one-off syncd command from the image over the volume (compose's `syncd-install`); `extra`: more flags of
    `run` (volumes, environment)."""
    return engine.run("run", "--rm", "--network", network, *engine.read_only_flags(), "--cap-drop", "ALL",
                      "-v", f"{data}:/data", "-e", "SYNCD_CONFIG=/app/config/demo.toml", *extra, IMAGE, *args,
                      timeout=180, check=check)


# ---- the build -----------------------------------------------------------------------------------------------


def test_the_readme_command_builds_a_lean_image(engine: Engine, built: Built) -> None:
    """README's command builds the image; its config is what the Dockerfile promises, and nothing of the build
    (wheels, locks, pip's offline configuration, the wheelhouse) is in it."""
    print(f"image built by `{built.command}` in {built.seconds} s")
    image = inspect_image(engine, IMAGE)
    config = image["Config"]
    assert isinstance(config, dict)
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["syncd"] and config["Cmd"] == ["run"]
    assert "9464/tcp" in config["ExposedPorts"]
    assert "SYNCD_METRICS_ADDR=0.0.0.0:9464" in config["Env"]
    assert healthcheck_command(engine, IMAGE) == ["syncd", "healthcheck"]
    size_mb = int(str(image["Size"])) / 1e6
    assert size_mb < MAX_IMAGE_MB, f"the image is {size_mb:.0f} MB"
    # Debian's base keeps venv's own wheels in /usr/share/python-wheels: the base's, not the build's.
    search = ("find / -xdev -path /usr/share/python-wheels -prune -o \\( -name '*.whl' -o -name 'requirements*.txt' "
              "-o -path /wheelhouse -o -path /etc/pip.conf -o -path /src \\) -print; stat -c %u /data; syncd --version")
    leftovers = engine.run("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c", search).stdout.split()
    assert leftovers[-3:] == [str(IMAGE_UID), "syncd", "0.1.0"], leftovers
    assert leftovers[:-3] == [], f"build files left in the image: {leftovers[:-3]}"


# ---- the daemon in the container -------------------------------------------------------------------------------


def test_defaults_serve_the_metrics_port_and_say_why_not_ready(engine: Engine, built: Built, data: Path,
                                                               containers: list[str]) -> None:
    """The image's own command and address (0.0.0.0:9464 in the container), published on 127.0.0.1 of the host:
    /healthz is 200, the HEALTHCHECK passes, /readyz is 503 with the reason while the secondary (a closed port of
    the container's own loopback) is unreachable, /metrics has syncd's series; SIGTERM exits 0."""
    app_in_image(engine, data, "--rate", "20", "--duration", "1s", "--seed", "1")
    assert syncd_in_image(engine, data, "install").returncode == 0
    port = free_port()
    name = f"syncd-image-defaults-{port}"
    containers.append(name)
    engine.run("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:9464", *engine.read_only_flags(),
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "-v", f"{data}:/data",
               "-e", "SYNCD_CONFIG=/app/config/demo.toml", "-e", "SYNCD_TARGET_URL=http://127.0.0.1:1/rest/v1",
               "-e", "SUPABASE_JWT_SECRET=image-test-secret-of-at-least-32-characters", IMAGE)
    root = f"http://127.0.0.1:{port}"
    assert wait_for(f"{root}/healthz", 200).json() == {"alive": True}
    assert engine.run("exec", name, *healthcheck_command(engine, IMAGE), check=False).returncode == 0
    not_ready = wait_for(f"{root}/readyz", 503).json()
    assert not_ready["ready"] is False and not_ready["reason"], not_ready
    assert "syncd_outbox_pending" in httpx.get(f"{root}/metrics", timeout=5).text
    stop_within_grace(engine, name)


def test_ships_from_a_volume_read_only_as_the_image_user_and_stops_cleanly_mid_request(
        engine: Engine, built: Built, data: Path, containers: list[str], demo_secondary: RunningDevServer,
        faults: Callable[..., dict[str, object]], tmp_path: Path) -> None:
    """The sidecar as deployed: read-only root, no capabilities, uid 10001, the key as a mounted secret file, the
    metrics address moved by SYNCD_METRICS_ADDR (the HEALTHCHECK follows it). It ships the demo app's writes; a
    stop while a request is in flight (the secondary answering slowly) exits 0 within the grace; after a restart
    the rest ships and `syncd verify` finds the secondary equal: nothing was lost."""
    app_in_image(engine, data, "--rate", "40", "--duration", "2s", "--seed", "2")
    syncd_in_image(engine, data, "install")
    syncd_in_image(engine, data, "resync", "--all")  # README's order: the rows the app wrote before install
    key = tmp_path / "service_key"
    key.write_text(demo_secondary.service_key)
    os.chown(key, IMAGE_UID, IMAGE_UID)
    key.chmod(0o400)
    port = free_port()
    name = f"syncd-image-sidecar-{port}"
    containers.append(name)
    target = ["-v", f"{key}:/run/secrets/service_key:ro", "-e", f"SYNCD_TARGET_URL={demo_secondary.url}",
              "-e", "SUPABASE_SERVICE_KEY_FILE=/run/secrets/service_key"]
    engine.run("run", "-d", "--name", name, "--network", "host", *engine.read_only_flags(), "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "-v", f"{data}:/data", "-e", "SYNCD_CONFIG=/app/config/demo.toml",
               "-e", f"SYNCD_METRICS_ADDR=127.0.0.1:{port}", *target, IMAGE)
    root = f"http://127.0.0.1:{port}"
    wait_for(f"{root}/healthz", 200)
    assert engine.run("exec", name, *healthcheck_command(engine, IMAGE), check=False).returncode == 0
    wait_for(f"{root}/readyz", 200, timeout=60)
    assert engine.run("exec", name, "id", "-u").stdout.strip() == str(IMAGE_UID)
    refused = engine.run("exec", name, "sh", "-c", "touch /opt/syncd/x", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    logged = engine.run("logs", name)
    logs = logged.stdout + logged.stderr
    assert demo_secondary.service_key not in logs

    faults(delay_ms=3000)
    app_in_image(engine, data, "--rate", "40", "--duration", "1s", "--seed", "3")
    time.sleep(1.0)  # the wake, the claim, the request that now waits 3 s for its answer
    took = stop_within_grace(engine, name)
    assert took >= 0.5, f"the stop took {took:.1f} s: no request was in flight"
    faults(delay_ms=0)

    engine.run("start", name)
    wait_for(f"{root}/readyz", 200, timeout=60)
    waiting = wait_for_an_empty_outbox(data / "app.sqlite3", timeout=60)
    assert waiting == 0, f"{waiting} changes still in the outbox a minute after the restart"
    stop_within_grace(engine, name)
    verified = syncd_in_image(engine, data, "verify", network="host", extra=target, check=False)
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]
    assert demo_secondary.service_key not in verified.stdout + verified.stderr

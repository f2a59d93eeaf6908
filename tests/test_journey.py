"""The user's journey on the cluster users get: `cluster/local.sh` (own loopback addresses, token auth), jobs
sent with the `ray job` CLI as `make demo` sends them, and headless Chromium on the links the product prints.

The session's default-settings cluster (tests/conftest.py), while it is fresh: the demo's runs are its first
jobs, where Ray's start-up errors (if any) would reach the job's output.
"""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from launch import demo
from tests.cluster_fixtures import chromium, chromium_typed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The demo's command, cut to 20 steps with one evaluation at the end.
SHORT = ["--set", "optim.max_steps=20", "log_every=5"]
# A Ray log line at level E: "[2026-12-07 19:56:47,459 E 13077 13077] (raylet) main.cc:1108: ..."
RAY_ERROR = re.compile(r"\d E \d+ \d+\]")


@pytest.fixture(scope="module")
def journey(default_cluster):
    assert not default_cluster.client.list_jobs(), "test_journey runs first on the default cluster"
    return default_cluster


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def post(url: str, origin: str) -> int:
    """The status MLflow answers a browser's POST from a page at `origin`."""
    req = urllib.request.Request(url + "/ajax-api/2.0/mlflow/experiments/search", data=b'{"max_results": 1}',
                                 headers={"Origin": origin, "Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_demo_runs_side_by_side_in_the_browser_quietly(journey, tmp_path, capfd):
    state = journey.state
    names = ["journey-a", "journey-b"]
    for name, lr in zip(names, ("0.2", "0.05")):  # the demo's lr, and a smaller one to compare
        done, log = demo.submit(state, name, "--data", str(journey.data), *SHORT, f"optim.lr={lr}",
                                log_dir=tmp_path)
        assert done, log.read_text()[-3000:]
        assert not [line for line in log.read_text().splitlines() if RAY_ERROR.search(line)]
    demo.show_runs(state["mlflow"], "digits_demo")
    printed = capfd.readouterr().out
    # A healthy run shows no Ray error line, and the nodes logged none (the metrics agent connects).
    assert not [line for line in printed.splitlines() if RAY_ERROR.search(line)], printed
    logs = Path(state["ray_tmp"], "session_latest/logs")
    errors = [line for f in logs.glob("*.out") for line in f.read_text().splitlines() if RAY_ERROR.search(line)]
    assert not errors, errors

    client = mlflow.MlflowClient(state["mlflow"])
    exp = client.get_experiment_by_name("digits_demo")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == set(names) and all(r.info.status == "FINISHED" for r in runs.values())
    # The commit of the checkout the jobs were submitted from, although the workers ran from Ray's copy.
    commit = head_commit()
    assert {r.data.tags["mlflow.source.git.commit"] for r in runs.values()} == {commit}

    links = re.findall(r"http://\S+", printed)
    table = next(u for u in links if u.endswith("/runs?workflowType=machine_learning"))
    charts = next(u for u in links if u.endswith("&compareRunsMode=CHART"))
    # The chart view draws only the charts in view, sections in alphabetical order (val/ last): typed into
    # its search box, "top1" brings train/top1 and val/top1 up, as docs/mlflow.md tells users to do.
    shot = tmp_path / "mlflow_charts.png"
    shown = chromium_typed(charts, "Search metric charts", "top1", "val/top1", shot)
    for url, page in ((table, chromium(table)), (charts, shown)):
        assert all(name in page for name in names), (url, page[-3000:])
        assert "Request error" not in page and "INTERNAL_ERROR" not in page, (url, page[-3000:])
    assert all(f"{name} (val/top1)" in shown for name in names), shown[-3000:]  # the chart's legend
    print(f"\n[journey] charts screenshot: {shot}")
    run = runs["journey-a"]
    run_link = next(u for u in links if f"/runs/{run.info.run_id}?" in u)
    page = chromium(run_link)
    # The run page prints each metric's value in full (JavaScript's shortest round-trip form, as Python's
    # repr); a rounded form is no substring of it once the rounding carries (0.1156 vs 0.11555555555555555).
    assert commit[:7] in page and repr(run.data.metrics["val/top1"]) in page, page[-3000:]
    assert "Failed to load" not in page
    # The Model training view: its side bar (Runs, Models, Model registry), not GenAI's (Evaluation runs).
    assert "Model registry" in page and "Evaluation runs" not in page

    # What the server saw: no request refused. A page on another origin is still refused.
    server_log = Path(state["dir"], "mlflow.log").read_text()
    assert "Blocked" not in server_log and not re.search(r'" 403\b|\b403 Forbidden', server_log), server_log[-3000:]
    assert post(state["mlflow"], state["mlflow"]) == 200
    assert post(state["mlflow"], "http://evil.example:5000") == 403


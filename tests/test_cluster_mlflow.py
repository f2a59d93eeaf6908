"""cluster/mlflow/server.sh with PostgreSQL as the backend store: the server the local cluster (and the
KubeRay / AWS configs) run, started for real, written to by the MLflow client and read back over REST.
The sqlite default serves every job in test_launch_ray.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import mlflow
import psycopg
import pytest
from trainer_fixtures import free_port, start_on_free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def _answers(url: str) -> bool:
    try:
        return get(url) == b"OK"
    except OSError:
        return False


def test_tracking_server_on_postgresql(tmp_path):
    script = str(ROOT / "cluster/mlflow/server.sh")
    started: list[dict[str, str]] = []  # each attempt's environment, to stop its PostgreSQL

    def start(port: int) -> subprocess.Popen:
        # PostgreSQL runs as user postgres, which cannot enter pytest's private tmp folders.
        pgdata = tempfile.mkdtemp(prefix="deepspike-pg-")
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   MLFLOW_BACKEND="postgres", MLFLOW_PORT=str(port), PG_PORT=str(free_port()), PGDATA=pgdata)
        started.append(env)
        with open(tmp_path / "server.log", "ab") as log:
            return subprocess.Popen([script, "run", str(tmp_path)], env=env, start_new_session=True, stdout=log,
                                    stderr=subprocess.STDOUT)

    def stop_postgres(env: dict[str, str]) -> None:
        subprocess.run([script, "stop", str(tmp_path)], env=env, check=True)

    try:
        server, port = start_on_free_port(start, lambda p: _answers(f"http://127.0.0.1:{p}/health"))
    except BaseException:
        for env in started:
            stop_postgres(env)
        raise
    for env in started[:-1]:  # attempts whose MLflow port was taken: their PostgreSQL goes
        stop_postgres(env)
        shutil.rmtree(env["PGDATA"])
    env = started[-1]
    pg_port, pgdata = int(env["PG_PORT"]), Path(env["PGDATA"])
    uri = f"http://127.0.0.1:{port}"
    try:
        client = mlflow.MlflowClient(uri)  # not the fluent API: no process-wide tracking URI
        run = client.create_run(client.create_experiment("pg-check"), run_name="r1")
        client.log_param(run.info.run_id, "model.name", "ms_resnet20")
        for step in range(3):
            client.log_metric(run.info.run_id, "train/loss", 2.0 - step, step=step)
        (tmp_path / "config.yaml").write_text("recipe: digits_tiny\n")
        client.log_artifact(run.info.run_id, str(tmp_path / "config.yaml"))
        client.set_terminated(run.info.run_id)
        got = json.loads(get(f"{uri}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}"))["run"]
        assert got["info"]["status"] == "FINISHED" and got["data"]["params"] == [
            {"key": "model.name", "value": "ms_resnet20"}]
        history = json.loads(get(f"{uri}/api/2.0/mlflow/metrics/get-history?run_id={run.info.run_id}"
                                 "&metric_key=train/loss"))["metrics"]
        assert [(m["step"], m["value"]) for m in history] == [(0, 2.0), (1, 1.0), (2, 0.0)]
        # The rows are in PostgreSQL, the artifact in the server-proxied store.
        with psycopg.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="mlflow") as db:
            rows = db.execute("select count(*) from metrics where run_uuid = %s",
                              [run.info.run_id]).fetchone()
        assert rows == (3,)
        [artifact] = (tmp_path / "artifacts").rglob("config.yaml")
        assert artifact.read_text() == "recipe: digits_tiny\n"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        stop_postgres(env)
    assert not (pgdata / "postmaster.pid").exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", pg_port)) != 0  # PostgreSQL is down
    shutil.rmtree(pgdata)

"""MLflow logging against a real `mlflow server`, including a server that is down when training starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from trainer_fixtures import digits_shards, free_port, spawn, start_on_free_port, tiny_config

from trainer.mlflow_logger import metric_key

EXPERIMENT = "trainer-server-test"


def test_metric_keys_are_made_mlflow_legal():
    assert metric_key("train/loss") == "train/loss"
    assert metric_key("timing(s)/gen@1%") == "timing_s_/gen_1_"


def _train_worker(rank: int, data: Path, run_dir: Path, uri: str) -> None:
    from trainer.train import train

    train(tiny_config(data, run_dir, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}",
                      f"mlflow.experiment={EXPERIMENT}", "optim.max_steps=24"))


def _start_server(tmp: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
         "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait_healthy(uri: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _healthy(uri):
            return
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} did not come up")


def mlflow_server(tmp: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free port of 127.0.0.1, answering: (process, tracking URI)."""
    proc, port = start_on_free_port(lambda p: _start_server(tmp, p, *extra),
                                    lambda p: _healthy(f"http://127.0.0.1:{p}"))
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_server_down_at_start_then_up_loses_nothing(tmp_path, tmp_path_factory, capfd):
    data = digits_shards(tmp_path_factory)
    port = free_port()  # nothing listens here until the server is started below
    uri = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    ctx = spawn(_train_worker, 1, data, run_dir, uri, join=False,
                env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    server = None
    try:
        # Training is under way (its config is written after the logger has started failing to connect).
        deadline = time.time() + 120
        while not (run_dir / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (run_dir / "config.yaml").exists()
        server = _start_server(tmp_path, port)
        while not ctx.join(timeout=1):
            pass
        _wait_healthy(uri)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    try:
        import mlflow

        # The first requests failed (nothing listened yet): one warning, then silent retries.
        assert capfd.readouterr().err.count("training continues, metrics are kept") == 1
        assert not (run_dir / "mlflow_unsent.json").exists()
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.data.params["optim.global_batch"] == "32" and run.data.params["recipe"] == "digits_tiny"
        assert (run.data.params["plan.global_batch"], run.data.params["plan.grad_accumulation"],
                run.data.params["plan.policy"]) == ("32", "2", "scale")
        assert run.data.tags["world_size"] == "1"
        # Every training log line, in order, and the final evaluation: nothing was dropped while down.
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [4, 8, 12, 16, 20, 24]
        assert {"val/top1", "val/top5", "spikes/rate", "energy/mj_per_image"} <= set(run.data.metrics)
        assert {"config.yaml", "ds_config.json", "batch_plan.json"} <= \
            {a.path for a in client.list_artifacts(run.info.run_id)}
        # The final and best weights came through the outage too, as logged models of this run.
        exp_id = run.info.experiment_id
        assert sorted(m.name for m in client.search_logged_models([exp_id])
                      if m.source_run_id == run.info.run_id) == ["best", "final"]
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)

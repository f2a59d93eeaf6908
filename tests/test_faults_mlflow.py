"""MLflow never loses or duplicates: spill files, a refusing server, resumed runs, a server killed and
restarted mid-run. Real MLflow stores and servers throughout."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import mlflow
import pytest
from test_trainer_mlflow import _start_server, _wait_healthy, mlflow_server
from trainer_fixtures import digits_shards, free_port, poisoned_forward, spawn, tiny_config

from trainer.config import MlflowConfig
from trainer.mlflow_logger import MlflowLogger


def _logger(tmp_path: Path, uri: str, run_id: str | None = None, **kw) -> MlflowLogger:
    cfg = MlflowConfig(tracking_uri=uri, system_metrics=False, flush_timeout_s=kw.pop("flush", 30.0))
    return MlflowLogger(cfg, "faults", "r", run_id, tmp_path / "mlflow_unsent.json")


def _steps(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)]


def test_spill_is_replayed_then_removed_and_a_torn_one_is_kept_aside(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    # An unreachable server: everything spills, atomically.
    dead = _logger(tmp_path, f"http://127.0.0.1:{free_port()}", flush=2.0)
    for step in (1, 2, 3):
        dead.log_metrics({"train/loss": 1.0 / step}, step)
    assert dead.close() is False
    spill = json.loads((tmp_path / "mlflow_unsent.json").read_text())
    assert spill["run_id"] is None and [op[0] for op in spill["ops"]] == ["metrics"] * 3 + ["terminate"]
    assert not list(tmp_path.glob("*.tmp"))
    # The next invocation sends the spilled items first, then its own; the file goes once they are sent.
    live = _logger(tmp_path, uri)
    live.log_metrics({"train/loss": 0.2}, 4)
    assert live.close() is True and not (tmp_path / "mlflow_unsent.json").exists()
    assert _steps(uri, live.run_id) == [1, 2, 3, 4]
    # A file cut in the middle is an error and kept for the user, not dropped or half-replayed.
    (tmp_path / "mlflow_unsent.json").write_text('{"run_id": null, "ops": [["metrics", [["a", 1')
    with caplog.at_level(logging.ERROR, "trainer.mlflow_logger"):
        again = _logger(tmp_path, uri)
    assert "unreadable" in caplog.text
    assert again.close() is True
    kept = list(tmp_path.glob("mlflow_unsent.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text().startswith('{"run_id": null')


def test_a_reopened_run_does_not_log_a_step_twice(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    first = _logger(tmp_path, uri)
    for step in range(4, 24, 4):
        first.log_metrics({"train/loss": 1.0 / step, "val/top1": 0.5}, step)
    first.close()
    # A resume from the step-16 checkpoint recomputes and logs 17..24 again; only 24 is new.
    resumed = _logger(tmp_path, uri, run_id=first.run_id)
    for step in (20, 24):
        resumed.log_metrics({"train/loss": 1.0 / step}, step)
    resumed.close()
    assert _steps(uri, first.run_id) == [4, 8, 12, 16, 20, 24]
    assert _steps(uri, first.run_id, "val/top1") == [4, 8, 12, 16, 20]


@pytest.mark.slow
def test_a_refusing_server_is_reported_once_and_nothing_is_lost(tmp_path, caplog):
    # A real server that only accepts another Host header answers every request with 403.
    server, uri = mlflow_server(tmp_path, "--allowed-hosts", "mlflow.example.org")
    try:
        with caplog.at_level(logging.WARNING, "trainer.mlflow_logger"):
            logger = _logger(tmp_path, uri, flush=180.0)
            for step in (1, 2):
                logger.log_metrics({"train/loss": 1.0}, step)
            t0 = time.monotonic()
            assert logger.close() is False
        closed_s = time.monotonic() - t0
        print(f"a refusing server: close() returned after {closed_s:.1f} s (flush timeout 180 s)")
        assert closed_s < 90  # not retried until the flush timeout (generous: a loaded machine is slow)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "HTTP 403" in errors[0].getMessage()
        assert "Invalid Host header" in errors[0].getMessage() or "403" in errors[0].getMessage()
        ops = json.loads((tmp_path / "mlflow_unsent.json").read_text())["ops"]
        assert [op[0] for op in ops] == ["metrics", "metrics", "terminate"]
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def _train(rank: int, data: Path, run_dir: Path, uri: str) -> None:
    from trainer.train import train

    train(tiny_config(data, run_dir, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}", "mlflow.experiment=f",
                      "optim.max_steps=240", "log_every=4", "checkpoint.every_steps=80", "mlflow.log_model=false"))


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run(tmp_path, tmp_path_factory):
    data = digits_shards(tmp_path_factory)
    server, uri = mlflow_server(tmp_path)
    port = int(uri.rsplit(":", 1)[1])
    ctx = spawn(_train, 1, data, tmp_path / "run", uri, join=False,
                env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
                     "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"})
    client = mlflow.MlflowClient(uri)
    try:
        deadline = time.time() + 180
        run_id = None
        while time.time() < deadline:  # wait until a few steps are on the server
            exp = client.get_experiment_by_name("f")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(_steps(uri, runs[0].info.run_id)) >= 3:
                run_id = runs[0].info.run_id
                break
            time.sleep(0.5)
        assert run_id, "training logged nothing"
        killed = time.time()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        time.sleep(3)  # training goes on; the logger queues and retries
        server = _start_server(tmp_path, port)
        restarted = time.time()
        while not ctx.join(timeout=1):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    try:
        _wait_healthy(uri)
        steps = _steps(uri, run_id)
        print(f"server down {restarted - killed:.1f} s (then its start-up); train/loss points: {len(steps)} of 60, "
              f"{len(steps) - len(set(steps))} duplicated")  # figures for docs/reliability.md
        assert steps == list(range(4, 241, 4))  # every step exactly once, in order
        assert client.get_run(run_id).info.status == "FINISHED"
        # MLflow's own system-metrics thread gave up during the outage; it was restarted.
        cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        assert any(m.timestamp / 1000 > restarted for m in cpu)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _train_until_nan(rank: int, data: Path, run_dir: Path, uri: str) -> None:
    from trainer.train import train

    with poisoned_forward(11):  # 1 rank x micro 16, global 32: two forwards a step; this is step 6's first
        train(tiny_config(data, run_dir, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}", "mlflow.experiment=f",
                          "optim.max_steps=12", "log_every=2", "engine.nonfinite=stop", "mlflow.log_model=false",
                          "mlflow.system_metrics=false"))


def test_a_run_that_dies_is_marked_failed_not_left_running(tmp_path, tmp_path_factory):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(Exception, match="non-finite"):
        spawn(_train_until_nan, 1, digits_shards(tmp_path_factory), tmp_path / "run", uri)
    (run,) = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("f").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")] == [2, 4]


def test_two_points_of_one_key_and_step_in_one_backed_up_batch_go_out_once(tmp_path):
    """A backed-up queue (here: a spill replayed in one request) holding a rollback event at step 5 and the
    recomputed step 5: the first point is sent, the second dropped, as when they go out one by one."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    dead = _logger(tmp_path, f"http://127.0.0.1:{free_port()}", flush=2.0)
    dead.log_metrics({"health/rollbacks": 1.0, "train/loss": 0.5}, 5)
    dead.log_metrics({"health/rollbacks": 2.0}, 5)
    dead.log_metrics({"train/loss": 0.4}, 5)
    dead.log_metrics({"train/loss": 0.3}, 6)
    assert dead.close() is False
    live = _logger(tmp_path, uri)
    assert live.close() is True
    client = mlflow.MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(live.run_id, "health/rollbacks")] == [(5, 1.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(live.run_id, "train/loss")] == [(5, 0.5), (6, 0.3)]


class _LosingProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real server that forwards every request and, for the first
    `drop[path suffix]` requests to a path, closes the connection instead of replying: the server has
    committed the request, the client never hears so (a reply lost to a timeout or a dropped connection)."""

    def __init__(self, upstream: str, drop: dict[str, int]):
        import http.server
        import threading
        import urllib.error
        import urllib.request

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = urllib.request.Request(upstream + self.path, data=body or None, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, headers, data = r.status, r.getheaders(), r.read()
                except urllib.error.HTTPError as e:
                    status, headers, data = e.code, e.headers.items(), e.read()
                path = self.path.split("?")[0]
                for suffix, left in proxy.drop.items():
                    if path.endswith(suffix) and left > 0:
                        proxy.drop[suffix] -= 1
                        proxy.dropped.append(path)
                        self.close_connection = True
                        return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.drop, self.dropped = dict(drop), []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_committed_request_whose_reply_is_lost_is_not_applied_twice(tmp_path):
    """A real server behind a proxy that loses the replies of the first run creation and of the first
    metrics batch: the retry loop sends both again, and the server holds one run with each point once."""
    server, uri = mlflow_server(tmp_path)
    proxy = _LosingProxy(uri, {"/runs/create": 1, "/runs/log-batch": 1})
    try:
        logger = _logger(tmp_path, proxy.uri, flush=60.0)
        for step in (1, 2, 3):
            logger.log_metrics({"train/loss": 1.0 / step}, step)
        assert logger.close() is True
        assert proxy.dropped == ["/api/2.0/mlflow/runs/create", "/api/2.0/mlflow/runs/log-batch"]
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
        assert [r.info.run_id for r in runs] == [logger.run_id]
        assert _steps(uri, logger.run_id) == [1, 2, 3]
    finally:
        proxy.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

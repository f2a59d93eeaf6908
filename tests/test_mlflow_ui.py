"""What a user gets from MLflow after training, against a real `mlflow server`: a model-training experiment,
MLflow's standard source tags, the final and best weights as logged models that load in a fresh process,
and `trainer.evaluate` on a `models:/` URI. The pages in a browser, on the cluster users get:
tests/test_journey.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer_mlflow import mlflow_server
from trainer_fixtures import digits_shards, spawn, tiny_config

from trainer.evaluate import main as evaluate_main
from trainer.export import load_exported

EXPERIMENT = "ui-test"
ROOT = Path(__file__).resolve().parents[1]


def _train(rank: int, data: Path, run_dir: Path, uri: str, name: str) -> None:
    from trainer.train import train

    train(tiny_config(data, run_dir, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}", "mlflow.system_metrics=false",
                      f"mlflow.experiment={EXPERIMENT}", f"run_name={name}", "optim.max_steps=8"))


def _load_in_fresh_process(uri: str, model_uri: str, example: Path, cwd: Path) -> torch.Tensor:
    """mlflow.pytorch.load_model in a new interpreter outside the checkout (deepspike as installed)."""
    out = cwd / "logits.pt"
    code = ("import sys, numpy, torch, mlflow, mlflow.pytorch; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pytorch.load_model(sys.argv[2]); assert not m.training, 'not in eval mode'; "
            "torch.save(m(torch.from_numpy(numpy.load(sys.argv[3]))).detach(), sys.argv[4])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, uri, model_uri, str(example), str(out)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_runs_and_logged_models(tmp_path, tmp_path_factory, capfd):
    import mlflow

    data = digits_shards(tmp_path_factory)
    server, uri = mlflow_server(tmp_path)
    try:
        names = ["ui-run-a", "ui-run-b"]
        for name in names:
            spawn(_train, 1, data, tmp_path / name, uri, name)
        printed = capfd.readouterr().out
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        assert set(runs) == set(names) and all(r.info.status == "FINISHED" for r in runs.values())
        run = runs["ui-run-a"]
        tags = run.data.tags
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["mlflow.source.git.commit"])
        assert tags["mlflow.source.name"].startswith("python") and tags["mlflow.user"]
        # The links the trainer printed open the run and the model-training runs table.
        base = f"{uri}/#/experiments/{exp.experiment_id}/runs"
        assert f"[trainer] MLflow run: {base}/{run.info.run_id}" in printed
        assert f"[trainer] MLflow runs table: {base}?workflowType=machine_learning" in printed

        models = {m.name: m for m in client.search_logged_models([exp.experiment_id])
                  if m.source_run_id == run.info.run_id}
        assert set(models) == {"final", "best"}
        final = models["final"]
        linked = {m.key: m.value for m in final.metrics or []}
        assert linked["val/top1"] == run.data.metrics["val/top1"]  # linked to the step's metrics
        assert final.params["name"] == "ms_resnet20"

        # The logged model in a fresh process gives the exported checkpoint's logits.
        run_dir = tmp_path / "ui-run-a"
        example = run_dir / "input_example.npy"
        logits = _load_in_fresh_process(uri, f"models:/{final.model_id}", example, tmp_path)
        exported, _ = load_exported(run_dir / "model.pt")
        import numpy as np

        with torch.no_grad():
            assert torch.equal(logits, exported.eval()(torch.from_numpy(np.load(example))))

        # trainer.evaluate takes the URI (config from the logged model) and agrees with the file.
        capfd.readouterr()
        evaluate_main([f"models:/{final.model_id}", "--tracking-uri", uri])
        by_uri = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
        evaluate_main([str(run_dir / "model.pt")])
        by_file = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
        assert by_uri["val/top1"] == by_file["val/top1"] and by_uri["step"] == by_file["step"] == 8

    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

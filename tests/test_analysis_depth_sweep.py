"""The depth sweep end to end: real trainer runs (single process, world size 1) on real digits, results
read back from MLflow into the table and plot; a re-run trains nothing; bad input fails early."""

from __future__ import annotations

import csv
import json

import pytest
from mlflow.tracking import MlflowClient

from analysis.depth_sweep import FAMILIES, main


def _argv(tmp_path, *extra):
    return ["--dataset", "digits", "--depths", "20", "--families", "ms,spiking", "--epochs", "1", "--T", "2",
            "--size", "8", "--runs-dir", str(tmp_path / "runs"), "--jobs", "2",
            "--set", "model.kwargs.widths=[4,8,8]", "data.batch_size=64", "optim.global_batch=64", "optim.max_steps=6",
            "log_every=2", "mlflow.log_model=false", *extra, "--out", str(tmp_path / "docs")]


@pytest.mark.slow
def test_sweep_trains_through_the_trainer_and_reads_back_mlflow(tmp_path):
    runs = main(_argv(tmp_path))
    uri = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("depth_sweep_digits")
    logged = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(logged) == ["digits-ms20-T2-e1", "digits-spiking20-T2-e1"]

    with open(tmp_path / "docs" / "depth_sweep.csv") as f:
        table = {r["run_name"]: r for r in csv.DictReader(f)}
    for run in runs:
        mlflow_run = logged[run.name]
        log = (tmp_path / "runs" / "logs" / f"{run.name}.log").read_text()
        assert mlflow_run.info.status == "FINISHED" and table[run.name]["status"] == "ok", log[-3000:]
        assert float(table[run.name]["val_top1"]) == pytest.approx(mlflow_run.data.metrics["val/top1"], rel=1e-3)
        # the overrides reached the trainer: the family's own model with its default init, our widths
        params = mlflow_run.data.params
        assert params["model.name"] == f"{FAMILIES[run.family]}20"
        assert json.loads(params["model.kwargs"]) == {"widths": [4, 8, 8]}
        assert [step for step, _ in run.result["loss_curve"]] == [2, 4, 6]
    md = (tmp_path / "docs" / "depth_sweep.md").read_text()
    assert "python -m analysis.depth_sweep --dataset digits --depths 20" in md and "| 20 | " in md
    assert (tmp_path / "docs" / "depth_sweep.png").stat().st_size > 10_000

    first = (tmp_path / "docs" / "depth_sweep.csv").read_text()
    main(_argv(tmp_path))  # both runs are FINISHED in MLflow: nothing is trained again
    assert len(client.search_runs([exp.experiment_id])) == 2
    assert (tmp_path / "docs" / "depth_sweep.csv").read_text() == first


def test_bad_input_fails_before_training(tmp_path):
    with pytest.raises(SystemExit):
        main(["--dataset", "digits", "--depths", "21", "--epochs", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--dataset", "cifar10", "--epochs", "1", "--out", str(tmp_path)])  # no --data
    with pytest.raises(KeyError, match="nope"):
        main(_argv(tmp_path, "optim.nope=1"))
    with pytest.raises(KeyError, match="nope"):  # a second --set adds to the first
        main(["--dataset", "digits", "--depths", "20", "--epochs", "1", "--runs-dir", str(tmp_path / "runs"),
              "--set", "optim.nope=1", "--set", "optim.lr=0.1", "--collect-only", "--out", str(tmp_path / "docs")])
    assert not (tmp_path / "runs" / "logs").exists()

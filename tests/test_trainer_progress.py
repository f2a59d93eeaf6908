"""What a person reads: the progress lines, the metrics file and the MLflow UI links (no processes)."""

import json

from trainer.mlflow_logger import ui_links
from trainer.run_record import MetricsFile, eval_line, step_line

TRAIN = {"train/loss": 1.43719, "train/top1": 0.49412, "perf/images_per_s": 168.4, "grad/norm_block_3": 0.026}
VAL = {"val/top1": 0.55, "val/top5": 0.9134, "val/loss": 1.2009}


def test_step_and_eval_lines():
    assert step_line(84, 252, 42, TRAIN, 62.4) == \
        "step 84/252 (epoch 2/6) | loss 1.437 | top-1 49.4 % | 168 img/s | ETA 0:01:02"
    assert step_line(85, 252, 42, TRAIN, 3725).endswith("(epoch 3/6) | loss 1.437 | top-1 49.4 % | 168 img/s | "
                                                         "ETA 1:02:05")
    # a run of max_steps that ends inside an epoch still names the epoch it is in
    assert step_line(8, 8, 42, TRAIN, float("nan")).startswith("step 8/8 (epoch 1/1) |")
    assert step_line(8, 8, 42, TRAIN, float("nan")).endswith("ETA ?")
    assert eval_line(84, 252, 42, VAL, 0.61) == \
        "eval step 84/252 (epoch 2/6) | top-1 55.0 % | top-5 91.3 % | loss 1.201 | best 61.0 %"


def test_metrics_file_appends_each_step_once(tmp_path):
    f = MetricsFile(tmp_path / "metrics.jsonl")
    f.write(4, TRAIN)
    f.write(8, VAL)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 4, **TRAIN}, {"step": 8, **VAL}]
    # A resume from step 4 logs steps 8 and 12 again: step 8's validation metrics are not written twice, a
    # line cut short by a crash is skipped, and the new step goes in.
    with open(tmp_path / "metrics.jsonl", "a") as torn:
        torn.write('{"step": 12, "train/lo')
    resumed = MetricsFile(tmp_path / "metrics.jsonl")
    resumed.write(8, VAL)
    resumed.write(12, VAL)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and lines[2] == '{"step": 12, "train/lo' and json.loads(lines[3]) == {"step": 12, **VAL}


def test_ui_links_open_the_model_training_view():
    links = ui_links("http://mlflow.example:5000/", "7", "abc")
    assert links == {"runs": "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning",
                     "charts": "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"
                               "&compareRunsMode=CHART",
                     "run": "http://mlflow.example:5000/#/experiments/7/runs/abc?workflowType=machine_learning"}
    # a database store has no server: the links assume `mlflow ui` on its default address
    assert ui_links("sqlite:///runs/mlflow.db", "1")["runs"].startswith("http://127.0.0.1:5000/#/experiments/1/")


def test_a_health_event_after_a_resume_is_kept_by_both_sinks(tmp_path):
    """A run logged its health counters up to step 16 and is resumed from its step-12 checkpoint; a rollback
    at recomputed step 13 goes in after everything the run already logged for those keys (step 17) in
    metrics.jsonl and in MLflow (a real sqlite store), instead of being dropped as a repeat of step 13."""
    import mlflow

    from trainer.batch_setting import batch_setting
    from trainer.config import apply_overrides
    from trainer.recipes import get_recipe
    from trainer.run_record import RunRecord

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = get_recipe("digits_tiny")
    apply_overrides(cfg, [f"run_dir={tmp_path / 'run'}", "mlflow.enabled=true", f"mlflow.tracking_uri={uri}",
                          "mlflow.experiment=events", "mlflow.system_metrics=false"])
    run = dict(world=1, device="cpu", batch=batch_setting(cfg.optim, cfg.data.batch_size, 1, None), ds_config={},
               steps_per_epoch=42, total_steps=100)
    first = RunRecord(cfg, 0, run, None, None)
    for step in range(1, 17):
        first.log({"train/loss": 1.0, "health/rollbacks": 0}, step)
    first.event({"health/rollbacks": 1}, 11)  # at a step already logged: it goes in just after the newest
    first.close("KILLED")
    resumed = RunRecord(cfg, 0, run, tmp_path / "run" / "checkpoints" / "step_00000012", first.run_id)
    resumed.event({"health/rollbacks": 2}, 13)
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [(r["step"], r["health/rollbacks"]) for r in rows if r["health/rollbacks"] > 0]
    assert events == [(17, 1), (18, 2)], events
    history = mlflow.MlflowClient(uri).get_metric_history(first.run_id, "health/rollbacks")
    assert [(m.step, m.value) for m in history if m.value > 0] == [(17, 1.0), (18, 2.0)]

"""`RunRecord`: everything a run leaves besides its checkpoints, owned by rank 0 (other ranks hold a silent one).

The run directory's files (`config.yaml`, `ds_config.json`, `batch_plan.json`, `metrics.jsonl`, the exported
`model.pt` / `model_best.pt`), the MLflow run (`trainer.mlflow_logger.MlflowLogger`: params, source tags,
metrics, logged models) and what a person reads while a run trains, one line per log step and one per
evaluation:

    step 84/252 (epoch 2/6) | loss 1.437 | top-1 49.4 % | 168 img/s | ETA 0:01:02
    eval step 84 (epoch 2/6) | top-1 55.0 % | top-5 91.3 % | loss 1.201 | best 55.0 %

The full metrics (25+ keys: gradient norms, spike rates, decode errors, ...) are not printed: they go to
MLflow and, one JSON object a line, to `metrics.jsonl`, which needs no server to read back.
"""

from __future__ import annotations

import datetime
import getpass
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from trainer.batch_setting import BatchSetting
from trainer.config import TrainConfig, save_config, to_dict
from trainer.set_aside import set_aside


def local_store_uri(folder: str | Path) -> str:
    """An sqlite store in `folder`, where runs are tracked without a tracking server: MLflow's file store is
    off by default (docs/stack.md, MLflow)."""
    return f"sqlite:///{(Path(folder) / 'mlflow.db').resolve()}"


def git_commit() -> str:
    """The checkout's commit; a Ray worker runs from an uploaded copy without .git, so the launcher passes
    the submitting checkout's commit in DEEPSPIKE_GIT_COMMIT."""
    if commit := os.environ.get("DEEPSPIKE_GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(resumed_from: Path | None) -> dict[str, str]:
    """MLflow's own tags for where a run came from (the UI shows them in the runs table). The Ray launcher
    names its command in DEEPSPIKE_ENTRY_POINT; a worker's own argv is Ray's."""
    entry = os.environ.get("DEEPSPIKE_ENTRY_POINT") or " ".join(["python -m trainer.train", *sys.argv[1:]])
    return {"mlflow.source.git.commit": git_commit(), "mlflow.source.name": entry[:500],
            "mlflow.source.type": "JOB", "mlflow.user": getpass.getuser(),
            "resumed_from": str(resumed_from) if resumed_from else ""}


def flat_params(cfg: TrainConfig, batch: BatchSetting) -> dict[str, Any]:
    """~50 headline hyper-parameters as flat MLflow params; the full config goes in as an artifact."""
    flat: dict[str, Any] = {}
    for section in ("model", "data", "optim", "engine"):
        for k, v in to_dict(getattr(cfg, section)).items():
            flat[f"{section}.{k}"] = json.dumps(v) if isinstance(v, dict | list) else v
    flat.update({"recipe": cfg.recipe, "checkpoint.every_steps": cfg.checkpoint.every_steps,
                 "derived.grad_accumulation": batch.grad_accumulation, "derived.world_size_at_start": batch.world_size,
                 **batch.params()})
    return flat


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


def _where(step: int, total: int, steps_per_epoch: int) -> str:
    """`step 84/252 (epoch 2/6)`: the epoch a step belongs to, counted from 1 as people do."""
    epoch = max(1, math.ceil(step / steps_per_epoch))
    return f"{step}/{total} (epoch {epoch}/{math.ceil(total / steps_per_epoch)})"


def step_line(step: int, total: int, steps_per_epoch: int, metrics: dict[str, float], eta_s: float) -> str:
    # A window of steps all dropped as non-finite (engine.nonfinite=skip) has no loss or accuracy.
    fit = (f"loss {metrics['train/loss']:.3f} | top-1 {100 * metrics['train/top1']:.1f} %"
           if "train/loss" in metrics else "all steps dropped (non-finite)")
    return (f"step {_where(step, total, steps_per_epoch)} | {fit} | {metrics['perf/images_per_s']:.0f} img/s | "
            f"ETA {_clock(eta_s)}")


def eval_line(step: int, total: int, steps_per_epoch: int, metrics: dict[str, float], best_top1: float) -> str:
    return (f"eval step {_where(step, total, steps_per_epoch)} | top-1 {100 * metrics['val/top1']:.1f} % | "
            f"top-5 {100 * metrics['val/top5']:.1f} % | loss {metrics['val/loss']:.3f} | "
            f"best {100 * best_top1:.1f} %")


HEALTH = "health/"


class MetricsFile:
    """Append-only JSON lines, one per logging call, each written whole and flushed. Like the MLflow logger
    it writes a (key, step) once: a resumed run recomputes the steps after its checkpoint, and those
    already in the file are not written again. A line cut short by a crash is ignored when reading back."""

    def __init__(self, path: Path):
        self.path = path
        self._last_step: dict[str, int] = {}
        text = path.read_text() if path.is_file() else ""
        self._torn = bool(text) and not text.endswith("\n")  # the next line must not continue it
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in row.keys() - {"step"}:
                self._last_step[key] = max(row["step"], self._last_step.get(key, -1))

    def newest_step(self, prefix: str) -> int:
        """The newest step written for any key starting with `prefix`; -1 if none."""
        return max((step for key, step in self._last_step.items() if key.startswith(prefix)), default=-1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        new = {k: v for k, v in metrics.items() if step > self._last_step.get(k, -1)}
        if not new:
            return
        with open(self.path, "a") as f:
            f.write("\n" * self._torn + json.dumps({"step": step, **new}) + "\n")
        self._torn = False
        self._last_step.update(dict.fromkeys(new, step))


class RunRecord:
    """Rank 0's record of one run (see the module docstring); on other ranks every call does nothing.
    Opened after the restore: a resume continues the MLflow run whose id the checkpoint holds."""

    def __init__(self, cfg: TrainConfig, rank: int, run: dict[str, Any], resumed_from: Path | None,
                 mlflow_run_id: str | None):
        """`run`: the facts the start line and the MLflow tags name (world, device, batch, ds_config,
        steps_per_epoch, total_steps)."""
        self.cfg, self.run_dir, self.on = cfg, cfg.resolved_run_dir(), rank == 0
        self.total, self.steps_per_epoch = run["total_steps"], run["steps_per_epoch"]
        self.logger, self.metrics_file, self._health_step = None, None, -1
        if not self.on:
            return
        if resumed_from is None:  # a fresh start's steps are not those of an earlier attempt
            set_aside(self.run_dir / "metrics.jsonl")
        self.metrics_file = MetricsFile(self.run_dir / "metrics.jsonl")
        self._health_step = self.metrics_file.newest_step(HEALTH)
        self._write_files(run["ds_config"], run["batch"])
        if cfg.mlflow.enabled:
            self._start_mlflow(run, resumed_from, mlflow_run_id)
        batch, start = run["batch"], f"resuming from {resumed_from}" if resumed_from else "fresh start"
        print(f"[trainer] {cfg.resolved_run_name()}: world {run['world']} x micro {batch.micro_batch} x accum "
              f"{batch.grad_accumulation} = {batch.global_batch} at lr {batch.lr:g} ({batch.policy} policy); "
              f"{self.steps_per_epoch} steps/epoch, {self.total} steps; {start}", flush=True)

    def _write_files(self, ds_config: dict[str, Any], batch: BatchSetting) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        (self.run_dir / "batch_plan.json").write_text(json.dumps(batch.to_dict(), indent=2))

    def _start_mlflow(self, run: dict[str, Any], resumed_from: Path | None, run_id: str | None) -> None:
        import deepspeed
        import torch

        from trainer.mlflow_logger import MlflowLogger  # mlflow loads only when logging is on

        cfg = self.cfg
        self.logger = MlflowLogger(cfg.mlflow, cfg.mlflow.experiment or cfg.recipe or cfg.model.name,
                                   cfg.resolved_run_name(), run_id, self.run_dir / "mlflow_unsent.json")
        self.logger.log_params(flat_params(cfg, run["batch"]))
        self.logger.set_tags({**source_tags(resumed_from), "world_size": run["world"], "device": run["device"],
                              "torch": torch.__version__, "deepspeed": deepspeed.__version__, "recipe": cfg.recipe})
        for name in ("config.yaml", "ds_config.json", "batch_plan.json"):
            self.logger.log_artifact(self.run_dir / name)

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger:
            self.logger.log_metrics(metrics, step)
        if self.metrics_file:
            self.metrics_file.write(step, metrics)
        if any(key.startswith(HEALTH) for key in metrics):
            self._health_step = max(self._health_step, step)

    def event(self, metrics: dict[str, float], step: int) -> None:
        """A health event at `step`, or just after the newest step the run holds health counters for: metrics
        keep one value per key and step (MLflow and metrics.jsonl alike), and after a rollback the same step
        can fail again, as a resumed run's recomputed steps can fail where the earlier attempt logged."""
        self.log(metrics, max(step, self._health_step + 1))

    def say(self, text: str) -> None:
        """One line for people, printed by rank 0 above a terminal's progress bar."""
        if self.on:
            tqdm.write(text)

    def train_line(self, step: int, metrics: dict[str, float], eta_s: float) -> None:
        self.say(step_line(step, self.total, self.steps_per_epoch, metrics, eta_s))

    def eval_line(self, step: int, metrics: dict[str, float], best_top1: float) -> None:
        self.say(eval_line(step, self.total, self.steps_per_epoch, metrics, best_top1))

    @property
    def logs_models(self) -> bool:
        return bool(self.logger and self.cfg.mlflow.log_model)

    def log_models(self, final: Path, best: Path, example: np.ndarray) -> None:
        """The final and the best checkpoint as MLflow logged models, `example` (one validation input) as
        their input example; `model.pt` (the final weights) also stays in the run directory for
        trainer.evaluate."""
        from trainer.export import export

        example_file = self.run_dir / "input_example.npy"
        np.save(example_file, example)
        for name, step_dir, file in (("final", final, "model.pt"), ("best", best, "model_best.pt")):
            self.logger.log_model(name, export(step_dir, self.run_dir / file), example_file,
                                  self.run_dir / "config.yaml")

    def close(self, status: str | None = None) -> dict[str, str]:
        """End the MLflow run (`status`: FAILED or KILLED when training raised); returns its id for the
        run's summary and prints its links."""
        if not self.logger:
            return {}
        if status:
            self.logger.close(status)
            return {}
        self.logger.close()
        if links := self.logger.links():
            print(f"[trainer] MLflow run: {links['run']}\n[trainer] MLflow runs table: {links['runs']}", flush=True)
        return {"mlflow_run_id": self.logger.run_id}

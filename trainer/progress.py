"""What a person reads while a run trains: one line per log step and one per evaluation, printed by rank 0,
e.g.

    step 84/252 (epoch 2/6) | loss 1.437 | top-1 49.4 % | 168 img/s | ETA 0:01:02
    eval step 84 (epoch 2/6) | top-1 55.0 % | top-5 91.3 % | loss 1.201 | best 55.0 %

The full metrics (25+ keys: gradient norms, spike rates, decode errors, ...) are not printed: they go to
MLflow and, one JSON object a line, to `<run_dir>/metrics.jsonl`, which needs no server to read back.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path


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

    def write(self, step: int, metrics: dict[str, float]) -> None:
        new = {k: v for k, v in metrics.items() if step > self._last_step.get(k, -1)}
        if not new:
            return
        with open(self.path, "a") as f:
            f.write("\n" * self._torn + json.dumps({"step": step, **new}) + "\n")
        self._torn = False
        self._last_step.update(dict.fromkeys(new, step))

"""`Trainer`: one rank's training run, read top to bottom in `fit`.

    trainer = Trainer(cfg)   # process group, data, model, engine; resumes from the newest checkpoint
    result = trainer.fit()   # train, evaluate at epoch ends, checkpoint, export; returns the summary

Construction does the whole setup, including the restore; `restore(step_dir)` may also be called later to
roll the run back to a checkpoint. Every rank runs the same calls in the same order (they are collective).
Each concern is one object the trainer holds: `checkpoints` (trainer.checkpoint: when and what is saved,
the resume point), `guard` (trainer.health: a non-finite loss, gradient or weight found collectively, and
`engine.nonfinite`'s verdict: skip the step, stop, or roll back to the newest checkpoint and continue after
the batches that diverged) and `record` (trainer.run_record: the run directory, metrics, MLflow, the
printed lines).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from dataloaders import build_loader
from models.grad_norms import BlockGradNorms
from trainer.batch_setting import BatchSetting, batch_setting
from trainer.checkpoint import CheckpointManager
from trainer.config import TrainConfig, to_dict
from trainer.deepspeed_config import deepspeed_config
from trainer.distributed import init_distributed, rank_seed, seed_all
from trainer.evaluate import evaluate
from trainer.health import GO, ROLLBACK, SKIP, NonFiniteError, NonFiniteGuard, Verdict
from trainer.loop_state import LoopState
from trainer.metrics import TrainWindow, loss_scale_metrics, peak_memory_gib
from trainer.precision import autocast, weights_dtype
from trainer.run_record import RunRecord
from trainer.wrap import wrap

Report = Callable[[dict[str, float], str], None]
"""Called after every checkpoint with the metrics and the step directory (the Ray launcher's hook)."""


class RolledBack(Exception):
    """Raised inside `fit` after a rollback: the epoch loop restarts from the restored position."""


class Trainer:
    def __init__(self, cfg: TrainConfig, report: Report | None = None):
        self.cfg, self.report = cfg, report
        self.rank, self.world, self.device = init_distributed(cfg.engine.backend, cfg.engine.device,
                                                                cfg.engine.cudnn_benchmark)
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.resolved_run_dir() / "checkpoints",
                                             cfg.engine.zero_stage)
        self.resumed_from = self.checkpoints.resume_point
        self.batch = self._batch_setting(self.checkpoints.started_global_batch())
        self.accum = self.batch.grad_accumulation
        ds_config = deepspeed_config(cfg, self.batch, self.device.type == "cuda")

        data = dataclasses.replace(cfg.data, batch_size=self.batch.micro_batch)
        self.train_loader = build_loader(data, "train", self.rank, self.world)
        self.val_loader = build_loader(data, "val", self.rank, self.world)
        if not cfg.model.num_classes:  # the recipe leaves the head to the data set (`folder`)
            cfg.model.num_classes = len(self.train_loader.classes)
        seed_all(cfg.engine.seed)  # identical initial weights on every rank
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"one epoch has {len(self.train_loader)} micro-batches per rank, fewer than the "
                             f"{self.accum} one optimizer step needs; lower optim.global_batch or use more data")
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.end = min(self.total_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else self.total_steps
        self.engine = wrap(cfg.model.build(), cfg, ds_config, self.batch, self.total_steps, self.steps_per_epoch,
                           self.device.type == "cuda")
        self.input_dtype = weights_dtype(self.engine.module)
        seed_all(rank_seed(cfg.engine.seed, self.rank))  # a distinct stream per rank; checkpointed per rank

        self.state = LoopState()
        self.checkpoints.track(self.engine, self.train_loader, self.state, dict(
            world_size=self.world, zero_stage=cfg.engine.zero_stage, precision=cfg.engine.precision,
            grad_accumulation=self.accum, config=to_dict(cfg), global_batch=self.batch.global_batch))
        if self.resumed_from is not None:
            self.restore(self.resumed_from)
        self.guard = NonFiniteGuard(cfg.engine, self.engine, self.device, self.state, self.checkpoints.newest)
        self.last_train: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.evaluated_at = -1
        self.window = TrainWindow(self.device)
        self.grad_norms = BlockGradNorms(self.engine)  # hooks only inside `with`, on logging steps' last micro-batch
        self.record = RunRecord(cfg, self.rank, dict(
            world=self.world, device=self.device.type, batch=self.batch, ds_config=ds_config,
            steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps), self.resumed_from,
            self.state.mlflow_run_id)

    def fit(self) -> dict[str, Any]:
        # A tqdm bar only on a terminal (disable=None); job logs get the one-line summaries of log_train.
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=None if self.rank == 0 else True,
                   desc="train", dynamic_ncols=True)
        self.engine.train()
        try:
            while True:
                try:
                    self._train_to_end(bar)
                    break
                except RolledBack:
                    bar.reset(total=self.total_steps)
                    bar.update(self.state.step)
            bar.close()
        except BaseException as e:  # not left RUNNING; a resume reopens it
            self.record.close("KILLED" if isinstance(e, KeyboardInterrupt | SystemExit) else "FAILED")
            raise
        return self.close()

    def _train_to_end(self, bar) -> None:
        s = self.state
        while s.step < self.end:
            for micro_batches in self._steps_left_in_epoch():
                self.train_step(micro_batches)
                bar.update(1)
                if s.step % self.cfg.log_every == 0 or s.step == self.end:
                    self.log_train()
                if s.epoch_step < self.steps_per_epoch and s.step < self.end and self.checkpoints.due(s.step):
                    self.save()
            if s.epoch_step == self.steps_per_epoch:
                self._next_epoch()
        if s.step == self.total_steps and self.evaluated_at != s.step:
            self.save(self.evaluate())
        elif self.checkpoints.due(s.step, last_step=True):
            self.save()

    def _steps_left_in_epoch(self) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """The micro-batches of each remaining optimizer step of this epoch, drawn lazily so the loader's
        position is exact at every checkpoint. Micro-batches left over at the epoch's end (fewer than one
        step) are skipped."""
        batches = iter(self.train_loader)  # starts mid-epoch after a resume
        while self.state.epoch_step < self.steps_per_epoch and self.state.step < self.end:
            yield itertools.islice(batches, self.accum)

    def train_step(self, micro_batches) -> None:
        """One optimizer step over `accum` micro-batches; DeepSpeed applies the optimizer on the last, after
        the collective finiteness check (`guard.step`)."""
        cfg, s = self.cfg, self.state
        t0 = time.perf_counter()
        logging = (s.step + 1) % cfg.log_every == 0 or s.step + 1 == self.end
        bad_loss = torch.zeros((), device=self.device)
        seen = []
        self.guard.begin_step()
        for done, (x, y) in enumerate(micro_batches, 1):
            x, y = self.train_loader.to_model(x, y, self.device, self.input_dtype)
            with self.grad_norms if logging and done == self.accum else nullcontext():
                with autocast(self.device, cfg.engine.precision):
                    logits = self.engine(x)
                # Label -1 marks a sample the loader could not decode (logged and counted there).
                loss = (F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing,
                                        ignore_index=-1) if (y >= 0).any() else logits.float().sum() * 0.0)
                self.engine.backward(loss)
            bad_loss += ~loss.detach().isfinite()
            seen.append((loss.detach(), logits.detach(), y))
            if done < self.accum:
                self.engine.step()
        if len(seen) < self.accum:
            raise RuntimeError(f"the training loader ended after {s.epoch_step} of {self.steps_per_epoch} "
                               f"steps of epoch {s.epoch}; its len() promised more batches")
        verdict = self.guard.step(bad_loss)
        self._act(verdict, time.perf_counter() - t0, consumed=1)  # may raise (stop) or roll back (RolledBack)
        if verdict.action == GO:  # a skipped step's losses stay out of the window
            for loss, logits, y in seen:
                self.window.add(loss, logits, y)
        s.step += 1
        s.epoch_step += 1
        self.window.steps += 1
        self.window.seconds += time.perf_counter() - t0

    def _act(self, verdict: Verdict, detect_s: float, consumed: int) -> None:
        """Follow the guard's verdict on a step (`consumed`: whether its batches were read)."""
        s = self.state
        if verdict.action == GO:
            return
        event = {"health/nonfinite_steps": s.nonfinite_steps, "health/rollbacks": s.rollbacks,
                 "health/detect_s": detect_s}
        if verdict.action == ROLLBACK:
            self._roll_back(verdict, event, s.step + consumed, s.epoch_step + consumed)
        if verdict.logged:
            self.record.event(event, s.step + consumed)
        if verdict.action == SKIP:
            self.record.say(f"[trainer] {verdict.what}: step dropped (engine.nonfinite=skip)")
            return
        raise NonFiniteError(verdict.message)

    def _roll_back(self, verdict: Verdict, event: dict[str, float], failed_step: int, epoch_step: int) -> None:
        """Collective: the engine, RNG and step counter of the verdict's target; the data position stays where
        it is (`epoch_step` steps into this epoch), so the diverged window's batches are not read again."""
        s = self.state
        epoch, counters = s.epoch, (s.nonfinite_steps, s.rollbacks + 1)
        self.record.event({**event, "health/rollbacks": counters[1]}, failed_step)
        self.restore(verdict.target)
        s.nonfinite_steps, s.rollbacks = counters
        s.epoch, s.epoch_step = epoch, epoch_step
        # Past the epoch's end `_next_epoch` moves the loader on.
        self.train_loader.seek(epoch, epoch_step * self.accum if epoch_step < self.steps_per_epoch else 0)
        self.window = TrainWindow(self.device)
        self.record.say(f"[trainer] {verdict.what}: rolled back to {verdict.target.name} (rollback {s.rollbacks} "
                        f"of at most {self.cfg.engine.max_rollbacks}); {failed_step - s.step} step(s) to "
                        f"recompute, continuing at batch {epoch_step} of epoch {epoch}")
        raise RolledBack

    def _next_epoch(self) -> None:
        s = self.state
        s.epoch += 1
        s.epoch_step = 0
        self.train_loader.set_epoch(s.epoch)
        evaluated = s.epoch % self.cfg.eval_every_epochs == 0 or s.step == self.total_steps
        self.save(self.evaluate() if evaluated else None)

    def log_train(self) -> None:
        s, engine = self.state, self.engine
        m = {**self.window.metrics(self.batch.global_batch), "optim/lr": engine.get_lr()[0],
             "health/nonfinite_steps": s.nonfinite_steps, "health/rollbacks": s.rollbacks,
             "memory/peak_gib": peak_memory_gib(self.device), "progress/epoch": s.epoch,
             "progress/images_seen": s.step * self.batch.global_batch}
        if self.cfg.engine.precision == "fp16":
            m.update(loss_scale_metrics(engine.optimizer, engine.skipped_steps))
        # DeepSpeed divides each micro-batch loss by `accum` (and multiplies by the fp16 loss scale).
        m.update(self.grad_norms.metrics(loss_scale=m.get("train/loss_scale", 1.0) / self.accum))
        m.update(self.train_loader.metrics(self.device))
        self.last_train, self.window = m, TrainWindow(self.device)
        self.record.log(m, s.step)
        self.record.train_line(s.step, m, (self.end - s.step) * m["perf/step_s"])

    def evaluate(self) -> float:
        """Collective: the full validation set; returns its top-1."""
        s = self.state
        self.evaluated_at = s.step
        self.last_val = evaluate(self.engine.module, self.val_loader, self.device, self.cfg.engine.precision)
        self.last_val.update(self.val_loader.metrics(self.device))
        s.best_top1 = max(s.best_top1 or 0.0, self.last_val["val/top1"])
        self.record.log({**self.last_val, "val/best_top1": s.best_top1}, s.step)
        self.record.eval_line(s.step, self.last_val, s.best_top1)
        return self.last_val["val/top1"]

    def save(self, val_here: float | None = None) -> Path:
        """Collective: a checkpoint of this step (`val_here`: its validation top-1, if measured)."""
        s = self.state
        self._act(self.guard.weights(self.engine.module), 0.0, consumed=0)
        s.mlflow_run_id = self.record.run_id or s.mlflow_run_id
        step_dir = self.checkpoints.save({**self.last_train, **self.last_val}, val_here)
        if self.report is not None:
            self.report({"step": s.step, "epoch": s.epoch, **self.last_train, **self.last_val}, str(step_dir))
        return step_dir

    def restore(self, step_dir: Path) -> None:
        """Collective: continue from `step_dir` as if the run had just written it."""
        self.checkpoints.restore(Path(step_dir), self.cfg.engine.seed, self.accum, self.cfg.optim.global_batch)

    def close(self) -> dict[str, Any]:
        """Collective: export the model of a finished run, end the MLflow run; returns the summary."""
        s = self.state
        final = self.checkpoints.step_dir(self.checkpoints.saved_step)
        result = {"step": s.step, "epoch": s.epoch, "checkpoint": str(final), "run_dir": str(self.record.run_dir),
                  "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                  "best_top1": s.best_top1, **self.last_train, **self.last_val}
        if s.step >= self.total_steps and self.record.logs_models:
            x, y = next(iter(self.val_loader))  # one validation image: the logged models' input example
            example = self.val_loader.to_model(x[:1], y[:1], torch.device("cpu"), torch.float32)[0]
            self.record.log_models(final, self.checkpoints.best() or final, example.float().numpy())
        result.update(self.record.close())
        dist.barrier()
        return result

    def _batch_setting(self, started_at: int | None) -> BatchSetting:
        """The recipe's setting for this world size; a resumed run keeps the global batch it started with."""
        batch = batch_setting(self.cfg.optim, self.cfg.data.batch_size, self.world, started_at)
        if started_at is not None and batch.global_batch != started_at and self.rank == 0:
            print(f"[trainer] warning: this run trained with a global batch of {started_at}, which {self.world} "
                  f"ranks cannot split: it goes on with {batch.global_batch} at lr {batch.lr:g} "
                  "(optim.batch_policy=scale), so the resume is not exact", flush=True)
        return batch

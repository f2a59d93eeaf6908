"""`Trainer`: one rank's training run, read top to bottom in `fit`.

    trainer = Trainer(cfg)   # process group, data, model, engine; resumes from the newest checkpoint
    result = trainer.fit()   # train, evaluate at epoch ends, checkpoint, export; returns the summary

Construction does the whole setup, including the restore; `restore(step_dir)` may also be called later to
roll the run back to a checkpoint. Every rank runs the same calls in the same order (they are collective).

A non-finite loss or gradient on any rank is found by one all-reduce per step, before the update, and every
rank then follows `engine.nonfinite` (trainer.health): skip the step, stop, or roll back to the newest
checkpoint and continue after the batches that diverged.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from dataloaders import build_loader
from dataloaders.datasets import get_dataset
from models import create_model
from models.grad_norms import BlockGradNorms
from trainer.batch_plan import BatchPlan, batch_plan
from trainer.checkpoint import (
    CheckpointManager,
    CheckpointMeta,
    Progress,
    best_checkpoint,
    read_meta,
    step_dir_name,
)
from trainer.config import OptimConfig, TrainConfig, from_dict, save_config, to_dict
from trainer.deepspeed_config import deepspeed_config
from trainer.distributed import init_distributed, rank_seed, seed_all
from trainer.evaluate import evaluate
from trainer.export import export
from trainer.health import NonFiniteError, grads_finite, ranks_flagged, weights_finite
from trainer.metrics import TrainWindow, loss_scale_metrics, peak_memory_gib
from trainer.precision import autocast, model_input, weights_dtype
from trainer.progress import MetricsFile, eval_line, step_line
from trainer.run_info import flat_params, source_tags
from trainer.set_aside import set_aside
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
        self.run_dir = cfg.resolved_run_dir()
        ck = cfg.checkpoint
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", ck.keep_last, ck.keep_best,
                                             cfg.engine.zero_stage)
        self.resumed_from = self._resume_point()
        if self.resumed_from is None and not ck.auto_resume:
            self.checkpoints.set_aside()
        self.plan = self._batch_plan()
        self.ds_config = deepspeed_config(cfg, self.plan, self.device.type == "cuda")
        self.accum = self.plan.grad_accumulation

        data = dataclasses.replace(cfg.data, batch_size=self.plan.micro_batch)
        self.train_loader = build_loader(data, "train", self.rank, self.world)
        self.time_first = get_dataset(cfg.data.dataset).time_first
        self.val_loader = build_loader(data, "val", self.rank, self.world)
        if not cfg.model.num_classes:  # the recipe leaves the head to the data set (`folder`)
            cfg.model.num_classes = len(self.train_loader.classes)
        seed_all(cfg.engine.seed)  # identical initial weights on every rank
        model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T, **cfg.model.kwargs)
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"one epoch has {len(self.train_loader)} micro-batches per rank, fewer than the "
                             f"{self.accum} one optimizer step needs; lower optim.global_batch or use more data")
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.end = min(self.total_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else self.total_steps
        self.engine = wrap(model, cfg, self.ds_config, self.plan, self.total_steps, self.steps_per_epoch,
                           self.device.type == "cuda")
        self.input_dtype = weights_dtype(self.engine.module)
        seed_all(rank_seed(cfg.engine.seed, self.rank))  # a distinct stream per rank; checkpointed per rank

        self.progress = Progress()
        self.saved_step = -1
        if self.resumed_from is not None:
            self.restore(self.resumed_from)
        self.last_train: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.evaluated_at = -1
        self.window = TrainWindow(self.device)
        self._skipped = False  # whether the last step was dropped as non-finite
        self._event_step = -1  # the step of the last health event logged
        # Hooks only inside `with`, on the last micro-batch of logging steps.
        self.grad_norms = BlockGradNorms(self.engine)
        self.metrics_file = None
        if self.rank == 0:
            if self.resumed_from is None:  # a fresh start's steps are not those of an earlier attempt
                set_aside(self.run_dir / "metrics.jsonl")
            self.metrics_file = MetricsFile(self.run_dir / "metrics.jsonl")
        self.logger = self._start_record() if self.rank == 0 else None

    def fit(self) -> dict[str, Any]:
        p = self.progress
        # A tqdm bar only on a terminal (disable=None); job logs get the one-line summaries of log_train.
        bar = tqdm(total=self.total_steps, initial=p.step, disable=None if self.rank == 0 else True,
                   desc="train", dynamic_ncols=True)
        self.engine.train()
        try:
            while True:
                try:
                    self._train_to_end(bar)
                    break
                except RolledBack:
                    bar.reset(total=self.total_steps)
                    bar.update(p.step)
            bar.close()
        except BaseException as e:
            if self.logger:  # not left RUNNING; a resume reopens it
                self.logger.close("KILLED" if isinstance(e, KeyboardInterrupt | SystemExit) else "FAILED")
            raise
        return self.close()

    def _train_to_end(self, bar) -> None:
        cfg, p = self.cfg, self.progress
        while p.step < self.end:
            for micro_batches in self._steps_left_in_epoch():
                self.train_step(micro_batches)
                bar.update(1)
                if p.step % cfg.log_every == 0 or p.step == self.end:
                    self.log_train()
                mid_epoch = p.epoch_step < self.steps_per_epoch and p.step < self.end
                if mid_epoch and cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0:
                    self.save()
            if p.epoch_step == self.steps_per_epoch:
                self._next_epoch()
        if p.step == self.total_steps and self.evaluated_at != p.step:
            self.save(self.evaluate())
        elif self.saved_step != p.step:
            self.save()

    def _steps_left_in_epoch(self) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """The micro-batches of each remaining optimizer step of this epoch, drawn lazily so the loader's
        position is exact at every checkpoint. Micro-batches left over at the epoch's end (fewer than one
        step) are skipped."""
        batches = iter(self.train_loader)  # starts mid-epoch after a resume
        while self.progress.epoch_step < self.steps_per_epoch and self.progress.step < self.end:
            yield itertools.islice(batches, self.accum)

    def train_step(self, micro_batches) -> None:
        """One optimizer step over `accum` micro-batches; DeepSpeed applies the optimizer on the last,
        after the collective finiteness check (`_check_step`)."""
        cfg, p = self.cfg, self.progress
        t0 = time.perf_counter()
        logging = (p.step + 1) % cfg.log_every == 0 or p.step + 1 == self.end
        poisoned = (p.epoch * self.steps_per_epoch + p.epoch_step in cfg.engine.nan_at_batches
                    and cfg.engine.nan_rank in (-1, self.rank))
        bad_loss = torch.zeros((), device=self.device)
        seen = []
        done = 0
        for x, y in micro_batches:
            y = y.to(self.device, non_blocking=True)
            x = model_input(x, self.device, self.input_dtype, self.time_first, self.train_loader.normalize, y)
            with self.grad_norms if logging and done == self.accum - 1 else nullcontext():
                with autocast(self.device, cfg.engine.precision):
                    logits = self.engine(x)
                # Label -1 marks a sample the loader could not decode (logged and counted there).
                loss = (F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing,
                                        ignore_index=-1) if (y >= 0).any() else logits.float().sum() * 0.0)
                if poisoned:
                    loss = loss * float("nan")  # NaN gradients too, as a real divergence has
                self.engine.backward(loss)
            bad_loss += ~loss.detach().isfinite()
            seen.append((loss.detach(), logits.detach(), y))
            done += 1
            if done == self.accum:
                self._check_step(bad_loss, t0)  # may raise (stop) or roll back (RolledBack)
            else:
                self.engine.step()
        if done < self.accum:
            raise RuntimeError(f"the training loader ended after {p.epoch_step} of {self.steps_per_epoch} "
                               f"steps of epoch {p.epoch}; its len() promised more batches")
        if not self._skipped:
            for loss, logits, y in seen:
                self.window.add(loss, logits, y)
        p.step += 1
        p.epoch_step += 1
        self.window.steps += 1
        self.window.seconds += time.perf_counter() - t0

    def _check_step(self, bad_loss: torch.Tensor, t0: float) -> None:
        """The accumulation boundary: find (collectively) whether this step is finite, then let DeepSpeed
        apply it, or make it a step without update and follow engine.nonfinite."""
        cfg, engine = self.cfg, self.engine
        # fp16's loss scaler expects and handles overflowing gradients itself; only its loss counts here.
        check_grads = cfg.engine.precision != "fp16"
        grads_ok = grads_finite(engine.module.parameters(), self.device) if check_grads else bad_loss == 0
        loss_ranks, grad_ranks = ranks_flagged(torch.stack([bad_loss, (~grads_ok).float()]))
        bad = bool(loss_ranks or grad_ranks)
        if not bad:
            engine.step()
            if cfg.engine.zero_stage > 0 and check_grads and not engine._step_applied:
                # ZeRO's own norm check (fp32) dropped it: gradients this rank could not see were non-finite.
                bad, grad_ranks = True, list(range(self.world))
        elif cfg.engine.zero_stage == 0:
            # SGD leaves parameters without a gradient untouched (no momentum or weight decay either), and
            # DeepSpeed steps the lr schedule as usual.
            for param in engine.module.parameters():
                param.grad = None
            engine.step()
        else:
            self._zero_step_as_overflow()
            if engine._step_applied:
                raise RuntimeError("DeepSpeed applied an optimizer step that was found non-finite")
        if bad and not engine._step_applied and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()  # a dropped step still counts in the schedule, as at ZeRO-0
        self._skipped = bad
        if bad:
            what = "loss" if loss_ranks else "gradients"
            ranks = loss_ranks or grad_ranks
            self._nonfinite(f"non-finite {what} on rank(s) {ranks} at step {self.progress.step + 1}",
                            time.perf_counter() - t0)

    def _zero_step_as_overflow(self) -> None:
        """ZeRO >= 1 holds the gradients in its partitions: take its own overflow path for this step (free
        the gradients, no update), as it does for an fp16 overflow. Its check would not fire for fp32 and
        bf16, so it is made to report one; every rank gets here together (the decision was collective)."""
        zero = self.engine.optimizer
        was = zero.check_grad_overflow
        zero.check_grad_overflow = True
        zero.check_overflow = lambda partition_gradients=True: setattr(zero, "overflow", True)
        try:
            self.engine.step()
        finally:
            del zero.check_overflow
            zero.check_grad_overflow = was

    def _nonfinite(self, what: str, detect_s: float, consumed: int = 1) -> None:
        """Follow engine.nonfinite for a non-finite step (`consumed`: whether its batches were read)."""
        cfg, p = self.cfg, self.progress
        p.nonfinite_steps += 1
        policy = cfg.engine.nonfinite
        event = {"health/nonfinite_steps": p.nonfinite_steps, "health/rollbacks": p.rollbacks,
                 "health/detect_s": detect_s}
        if policy == "skip":
            self._log_event(event, p.step + consumed)
            if self.rank == 0:
                tqdm.write(f"[trainer] {what}: step dropped (engine.nonfinite=skip)")
            return
        if policy == "stop":
            self._log_event(event, p.step + consumed)
            raise NonFiniteError(f"{what}; engine.nonfinite=stop. The newest checkpoint "
                                 f"({self.checkpoints.newest() or 'none yet'}) is finite.")
        target = self.checkpoints.newest()
        if target is None or p.rollbacks >= cfg.engine.max_rollbacks:
            self._log_event(event, p.step + consumed)
            why = ("no checkpoint to roll back to yet" if target is None else
                   f"{p.rollbacks} rollback(s) done, engine.max_rollbacks={cfg.engine.max_rollbacks}")
            raise NonFiniteError(f"{what}; {why}. Lower optim.lr or raise optim.grad_clip; the newest "
                                 f"checkpoint ({target or 'none'}) is finite.")
        self._roll_back(target, what, event, p.step + consumed, p.epoch_step + consumed)

    def _roll_back(self, target: Path, what: str, event: dict[str, float], failed_step: int,
                   epoch_step: int) -> None:
        """Collective: the engine, RNG and step counter of `target`; the data position stays where it is
        (`epoch_step` steps into this epoch), so the diverged window's batches are not read again."""
        p = self.progress
        epoch = p.epoch
        counters = (p.nonfinite_steps, p.rollbacks + 1)
        self._log_event({**event, "health/rollbacks": counters[1]}, failed_step)
        self.restore(target)
        p.nonfinite_steps, p.rollbacks = counters
        p.epoch, p.epoch_step = epoch, epoch_step
        if epoch_step < self.steps_per_epoch:
            self.train_loader.seek(epoch, epoch_step * self.accum)
        else:
            self.train_loader.seek(epoch, 0)  # the epoch is over: `_next_epoch` moves the loader on
        self.window = TrainWindow(self.device)
        if self.rank == 0:
            tqdm.write(f"[trainer] {what}: rolled back to {target.name} (rollback {p.rollbacks} of at most "
                       f"{self.cfg.engine.max_rollbacks}); {failed_step - p.step} step(s) to recompute, "
                       f"continuing at batch {epoch_step} of epoch {epoch}")
        raise RolledBack

    def _next_epoch(self) -> None:
        p = self.progress
        p.epoch += 1
        p.epoch_step = 0
        self.train_loader.set_epoch(p.epoch)
        evaluated = p.epoch % self.cfg.eval_every_epochs == 0 or p.step == self.total_steps
        self.save(self.evaluate() if evaluated else None)

    def log_train(self) -> None:
        p, engine = self.progress, self.engine
        m = {**self.window.metrics(self.plan.global_batch), "optim/lr": engine.get_lr()[0],
             "health/nonfinite_steps": p.nonfinite_steps, "health/rollbacks": p.rollbacks,
             "memory/peak_gib": peak_memory_gib(self.device), "progress/epoch": p.epoch,
             "progress/images_seen": p.step * self.plan.global_batch}
        if self.cfg.engine.precision == "fp16":
            m.update(loss_scale_metrics(engine.optimizer, engine.skipped_steps))
        # DeepSpeed divides each micro-batch loss by `accum` (and multiplies by the fp16 loss scale).
        grad_scale = m.get("train/loss_scale", 1.0) / self.accum
        m.update(self.grad_norms.metrics(loss_scale=grad_scale))
        m.update(self.train_loader.metrics(self.device))
        self.last_train, self.window = m, TrainWindow(self.device)
        self._log(m)
        if self.rank == 0:
            eta = (self.end - p.step) * m["perf/step_s"]
            tqdm.write(step_line(p.step, self.total_steps, self.steps_per_epoch, m, eta))

    def evaluate(self) -> float:
        """Collective: the full validation set; returns its top-1."""
        p = self.progress
        self.evaluated_at = p.step
        self.last_val = evaluate(self.engine.module, self.val_loader, self.device, self.cfg.engine.precision,
                                 time_first=self.time_first)
        self.last_val.update(self.val_loader.metrics(self.device))
        p.best_top1 = max(p.best_top1 or 0.0, self.last_val["val/top1"])
        self._log({**self.last_val, "val/best_top1": p.best_top1})
        if self.rank == 0:
            tqdm.write(eval_line(p.step, self.total_steps, self.steps_per_epoch, self.last_val, p.best_top1))
        return self.last_val["val/top1"]

    def save(self, val_here: float | None = None) -> Path:
        """Collective: a checkpoint of this step (`val_here`: its validation top-1, if measured)."""
        cfg, p = self.cfg, self.progress
        if not weights_finite(self.engine.module):
            # A step with finite loss and gradients overflowed the weights. They are never written, so the
            # checkpoints on disk (and the ones pruning keeps) are all finite.
            what = f"non-finite weights after step {p.step}"
            if cfg.engine.nonfinite == "skip":
                p.nonfinite_steps += 1
                raise NonFiniteError(f"{what} (finite loss and gradients overflowed them); "
                                     "engine.nonfinite=skip cannot undo an applied update")
            self._nonfinite(what, 0.0, consumed=0)
        p.mlflow_run_id = self.logger.run_id if self.logger else p.mlflow_run_id
        meta = CheckpointMeta(p, world_size=self.world, zero_stage=cfg.engine.zero_stage,
                              precision=cfg.engine.precision, grad_accumulation=self.accum, config=to_dict(cfg),
                              global_batch=self.plan.global_batch, best_metric_here=val_here,
                              metrics={**self.last_train, **self.last_val})
        step_dir = self.checkpoints.save(self.engine, self.train_loader, meta)
        self.saved_step = p.step
        if self.report is not None:
            self.report({"step": p.step, "epoch": p.epoch, **self.last_train, **self.last_val}, str(step_dir))
        return step_dir

    def restore(self, step_dir: Path) -> None:
        """Collective: continue from `step_dir` as if the run had just written it."""
        meta = self.checkpoints.restore(self.engine, self.train_loader, Path(step_dir), self.cfg.engine.seed,
                                        self.accum, self.cfg.optim.global_batch)
        vars(self.progress).update(vars(meta.progress))  # in place: `fit` holds on to it
        self.saved_step = self.progress.step

    def close(self) -> dict[str, Any]:
        """Collective: export the model of a finished run, end the MLflow run; returns the summary."""
        p = self.progress
        final = self.checkpoints.root / step_dir_name(self.saved_step)
        result = {"step": p.step, "epoch": p.epoch, "checkpoint": str(final), "run_dir": str(self.run_dir),
                  "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                  "best_top1": p.best_top1, **self.last_train, **self.last_val}
        if self.logger:
            if p.step >= self.total_steps and self.cfg.mlflow.log_model:
                self._log_models(final)
            self.logger.close()
            result["mlflow_run_id"] = self.logger.run_id
            if links := self.logger.links():
                print(f"[trainer] MLflow run: {links['run']}\n[trainer] MLflow runs table: {links['runs']}",
                      flush=True)
        dist.barrier()
        return result

    def _log_models(self, final: Path) -> None:
        """Rank 0: the final and the best checkpoint as MLflow logged models, one validation image as the
        input example; `model.pt` (the final weights) also stays in the run directory for trainer.evaluate."""
        x, y = next(iter(self.val_loader))
        example = self.run_dir / "input_example.npy"
        x = model_input(x[:1], torch.device("cpu"), torch.float32, self.time_first, self.val_loader.normalize, y[:1])
        np.save(example, x.float().numpy())
        best = best_checkpoint(self.checkpoints.root) or final
        for name, step_dir, file in (("final", final, "model.pt"), ("best", best, "model_best.pt")):
            self.logger.log_model(name, export(step_dir, self.run_dir / file), example, self.run_dir / "config.yaml")

    def _resume_point(self) -> Path | None:
        if self.cfg.checkpoint.resume:
            path = Path(self.cfg.checkpoint.resume)
            if not (path / "meta.json").is_file():
                raise FileNotFoundError(f"checkpoint.resume={path} is not a complete checkpoint (no meta.json)")
            return path
        return self.checkpoints.newest() if self.cfg.checkpoint.auto_resume else None

    def _batch_plan(self) -> BatchPlan:
        """The recipe's plan for this world size; a resumed run keeps the global batch it started with."""
        cfg, started_at = self.cfg, None
        if self.resumed_from is not None:
            meta = read_meta(self.resumed_from)
            saved = meta["config"]
            # Recorded since the batch plan; older files: the plan that run had at its world size.
            started_at = meta.get("global_batch") or batch_plan(
                from_dict(OptimConfig, saved["optim"]), saved["data"]["batch_size"], meta["world_size"]).global_batch
        plan = batch_plan(cfg.optim, cfg.data.batch_size, self.world, started_at)
        if started_at is not None and plan.global_batch != started_at and self.rank == 0:
            print(f"[trainer] warning: this run trained with a global batch of {started_at}, which {self.world} "
                  f"ranks cannot split: it goes on with {plan.global_batch} at lr {plan.lr:g} "
                  "(optim.batch_policy=scale), so the resume is not exact", flush=True)
        return plan

    def _start_record(self):
        """Rank 0: the run directory's config files, the MLflow run (continued after a resume), one line."""
        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        (run_dir / "batch_plan.json").write_text(json.dumps(self.plan.to_dict(), indent=2))
        logger = None
        if cfg.mlflow.enabled:
            from trainer.mlflow_logger import MlflowLogger  # mlflow loads only when logging is on

            logger = MlflowLogger(cfg.mlflow, cfg.mlflow.experiment or cfg.recipe or cfg.model.name,
                                  cfg.resolved_run_name(), self.progress.mlflow_run_id,
                                  run_dir / "mlflow_unsent.json")
            logger.log_params(flat_params(cfg, self.plan))
            logger.set_tags({**source_tags(self.resumed_from), "world_size": self.world, "device": self.device.type,
                             "torch": torch.__version__, "deepspeed": deepspeed.__version__, "recipe": cfg.recipe})
            logger.log_artifact(run_dir / "config.yaml")
            logger.log_artifact(run_dir / "ds_config.json")
            logger.log_artifact(run_dir / "batch_plan.json")
        plan, start = self.plan, f"resuming from {self.resumed_from}" if self.resumed_from else "fresh start"
        print(f"[trainer] {cfg.resolved_run_name()}: world {self.world} x micro {plan.micro_batch} x accum "
              f"{self.accum} = {plan.global_batch} at lr {plan.lr:g} ({plan.policy} policy); "
              f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps; {start}", flush=True)
        return logger

    def _log_event(self, metrics: dict[str, float], step: int) -> None:
        """A health event at `step`, or just after the previous event's step: after a rollback the same step
        can fail again, and metrics keep one value per key and step (MLflow and metrics.jsonl alike)."""
        self._event_step = max(step, self._event_step + 1)
        self._log(metrics, self._event_step)

    def _log(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self.progress.step if step is None else step
        if self.logger:
            self.logger.log_metrics(metrics, step)
        if self.metrics_file:
            self.metrics_file.write(step, metrics)

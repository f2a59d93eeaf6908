"""The training loop: one rank's view, one explicit loop, no callbacks.

    # 2 ranks on one machine (CPU: gloo; GPUs: nccl); the same command again resumes
    torchrun --nproc_per_node 2 -m trainer.train --recipe digits_demo --set data.path=data/digits16
    # explicit choices
    torchrun ... -m trainer.train --recipe ms_resnet104_imagenet --set data.path=/data/imagenet \
        engine.activation_checkpointing=2 --run-name msr104-try2 [--resume CKPT_DIR | --no-resume]

`train(cfg, report)` is the library entry point (the Ray launcher calls it inside each worker); it runs
in an existing process group or creates one from the torchrun environment (RANK, WORLD_SIZE, ...).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import random
import resource
import socket
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from analysis.gradlog import BlockGradNorms
from dataloaders import build_loader
from models import create_model
from trainer.checkpoint import (
    best_checkpoint,
    complete_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from trainer.config import TrainConfig, apply_overrides, load_config, save_config, to_dict
from trainer.deepspeed_config import deepspeed_config
from trainer.evaluate import autocast, evaluate, model_input
from trainer.export import export
from trainer.progress import MetricsFile, eval_line, step_line
from trainer.recipes import get_recipe
from trainer.wrap import wrap

Report = Callable[[dict[str, float], str], None]


@dataclass
class Progress:
    """What the loop needs to continue exactly where it stopped (saved in every checkpoint)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_top1: float | None = None
    mlflow_run_id: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str) -> tuple[int, int, torch.device]:
    if not dist.is_initialized() and "RANK" not in os.environ:
        # A plain `python -m trainer.train`: a world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if on_gpu else "gloo"))
    device = torch.device("cpu")
    if on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _resume_point(cfg: TrainConfig, root: Path) -> Path | None:
    if cfg.checkpoint.resume:
        path = Path(cfg.checkpoint.resume)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume={path} is not a complete checkpoint (no meta.json)")
        return path
    return find_resume_checkpoint(root) if cfg.checkpoint.auto_resume else None


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _source_tags(resume: Path | None) -> dict[str, str]:
    """MLflow's own tags for where a run came from (the UI shows them in the runs table)."""
    entry = os.environ.get("DEEPSPIKE_ENTRY_POINT") or " ".join(["python -m trainer.train", *sys.argv[1:]])
    return {"mlflow.source.git.commit": _git_commit(), "mlflow.source.name": entry[:500],
            "mlflow.source.type": "JOB", "mlflow.user": getpass.getuser(),
            "resumed_from": str(resume) if resume else ""}


def _flat_params(cfg: TrainConfig, world: int, accum: int) -> dict[str, Any]:
    """~50 headline hyper-parameters as flat MLflow params; the full config goes in as an artifact."""
    flat: dict[str, Any] = {}
    for section in ("model", "data", "optim", "engine"):
        for k, v in to_dict(getattr(cfg, section)).items():
            flat[f"{section}.{k}"] = json.dumps(v) if isinstance(v, dict | list) else v
    flat.update({"recipe": cfg.recipe, "checkpoint.every_steps": cfg.checkpoint.every_steps,
                 "derived.grad_accumulation": accum, "derived.world_size_at_start": world})
    return flat


class _Window:
    """Training loss / accuracy / time accumulated between two log lines, summed over ranks. Sums stay
    on the device so that a step never waits for the GPU just to be logged."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
        self.steps, self.seconds = 0, 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        valid = y >= 0
        n = valid.sum()
        self.sums += torch.stack([loss.double() * n, ((logits.argmax(1) == y) & valid).sum(), n]).double()

    def metrics(self, global_batch: int) -> dict[str, float]:
        sums = self.sums.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(sums)
        loss, correct, n = sums.tolist()
        step_s = self.seconds / max(self.steps, 1)
        return {"train/loss": loss / n, "train/top1": correct / n, "perf/step_s": step_s,
                "perf/images_per_s": global_batch / step_s if step_s else 0.0}


def train(cfg: TrainConfig, report: Report | None = None) -> dict[str, Any]:
    rank, world, device = init_distributed(cfg.engine.backend)
    on_gpu = device.type == "cuda"
    run_dir = cfg.resolved_run_dir()
    root = run_dir / "checkpoints"
    resume = _resume_point(cfg, root)
    if resume is None and not cfg.checkpoint.auto_resume and complete_checkpoints(root):
        # Starting over must not interleave step directories with the old run's: a later automatic
        # resume would pick whichever is newest. The old ones are kept aside, not deleted.
        if rank == 0:
            root.rename(root.with_name(f"checkpoints.replaced-{int(time.time())}"))
        dist.barrier()
    ds_config = deepspeed_config(cfg, world, on_gpu)
    accum = ds_config["gradient_accumulation_steps"]

    seed_all(cfg.engine.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T, **cfg.model.kwargs)
    train_loader = build_loader(cfg.data, "train", rank, world)
    val_loader = build_loader(cfg.data, "val", rank, world)
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch has {len(train_loader)} micro-batches per rank, fewer than the "
                         f"{accum} one optimizer step needs; lower optim.global_batch or use more data")
    total_steps = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    engine = wrap(model, cfg, ds_config, total_steps, steps_per_epoch, on_gpu)
    seed_all(cfg.engine.seed + 1 + rank)  # a distinct stream per rank (dropout); checkpointed per rank

    prog = Progress()
    if resume is not None:
        meta, rank_state = load_checkpoint(engine, resume, cfg.engine.zero_stage)
        prog = Progress(meta["step"], meta["epoch"], meta["epoch_step"], meta["best_top1"],
                        meta["mlflow_run_id"])
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            train_loader.load_state_dict(rank_state["loader"])
        else:
            # Another world size: the epoch's sample order depends only on (seed, epoch) and each global
            # batch is the next global_batch samples of it whatever the world size, so the same position
            # is `epoch_step` optimizer steps into the epoch. RNG streams restart from a fresh seed.
            seed_all(cfg.engine.seed + 1 + rank + 7919 * prog.step)
            position = train_loader.state_dict()
            position.update(epoch=prog.epoch, batches_yielded=prog.epoch_step * accum)
            train_loader.load_state_dict(position)
    else:
        train_loader.set_epoch(prog.epoch)

    logger = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        if cfg.mlflow.enabled:
            from trainer.mlflow_logger import MlflowLogger  # mlflow loads only when logging is on

            logger = MlflowLogger(cfg.mlflow, cfg.mlflow.experiment or cfg.recipe or cfg.model.name,
                                  cfg.resolved_run_name(), prog.mlflow_run_id, run_dir / "mlflow_unsent.json")
            logger.log_params(_flat_params(cfg, world, accum))
            logger.set_tags({**_source_tags(resume), "world_size": world, "device": device.type,
                             "torch": torch.__version__, "deepspeed": deepspeed.__version__, "recipe": cfg.recipe})
            logger.log_artifact(run_dir / "config.yaml")
            logger.log_artifact(run_dir / "ds_config.json")
        print(f"[trainer] {cfg.resolved_run_name()}: world {world} x micro {cfg.data.batch_size} x accum "
              f"{accum} = {cfg.optim.global_batch}; {steps_per_epoch} steps/epoch, {total_steps} steps; "
              + (f"resuming from {resume}" if resume else "fresh start"), flush=True)

    last_val: dict[str, float] = {}
    evaluated_at = -1
    last_train: dict[str, float] = {}
    saved_step = prog.step if resume is not None else -1

    def checkpoint(val_here: float | None) -> Path:
        nonlocal saved_step
        prog.mlflow_run_id = logger.run_id if logger else prog.mlflow_run_id
        meta = {"format": 1, "step": prog.step, "epoch": prog.epoch, "epoch_step": prog.epoch_step,
                "best_top1": prog.best_top1, "best_metric_here": val_here,
                "mlflow_run_id": prog.mlflow_run_id,
                "world_size": world, "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
                "grad_accumulation": accum, "metrics": {**last_train, **last_val}, "config": to_dict(cfg),
                "saved_at": time.time()}
        step_dir = save_checkpoint(engine, root, prog.step, meta, {"rng": rng_state(),
                                   "loader": train_loader.state_dict()}, cfg.checkpoint.keep_last,
                                   cfg.checkpoint.keep_best)
        saved_step = prog.step
        if report is not None:
            report({"step": prog.step, "epoch": prog.epoch, **last_train, **last_val}, str(step_dir))
        return step_dir

    metrics_file = MetricsFile(run_dir / "metrics.jsonl") if rank == 0 else None

    def log(metrics: dict[str, float]) -> None:
        if logger:
            logger.log_metrics(metrics, prog.step)
        if metrics_file:
            metrics_file.write(prog.step, metrics)

    def run_eval() -> float:
        nonlocal last_val, evaluated_at
        evaluated_at = prog.step
        last_val = evaluate(engine.module, val_loader, device, cfg.engine.precision)
        prog.best_top1 = max(prog.best_top1 or 0.0, last_val["val/top1"])
        log({**last_val, "val/best_top1": prog.best_top1})
        if rank == 0:
            bar.write(eval_line(prog.step, total_steps, steps_per_epoch, last_val, prog.best_top1))
        return last_val["val/top1"]

    bar = tqdm(total=total_steps, initial=prog.step, disable=None if rank == 0 else True, desc="train",
               dynamic_ncols=True)
    end = min(total_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else total_steps
    window = _Window(device)
    grad_norms = BlockGradNorms(engine)  # hooks only inside `with`, on the last micro-batch of logging steps
    engine.train()
    while prog.step < end:
        micro = 0
        t0 = time.perf_counter()
        for x, y in train_loader:  # starts mid-epoch after a resume
            x, y = model_input(x, device, cfg.engine.precision), y.to(device, non_blocking=True)
            next_step = prog.step + 1
            probe = micro == accum - 1 and (next_step % cfg.log_every == 0 or next_step == end)
            with grad_norms if probe else nullcontext():
                with autocast(device, cfg.engine.precision):
                    logits = engine(x)
                # Label -1 marks a sample the loader could not decode (logged and counted there).
                loss = (F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing,
                                        ignore_index=-1) if (y >= 0).any() else logits.float().sum() * 0.0)
                engine.backward(loss)
            engine.step()  # DeepSpeed applies the optimizer on the last micro-batch of each step only
            window.add(loss.detach(), logits.detach(), y)
            micro += 1
            if micro < accum:
                continue
            micro = 0
            prog.step += 1
            prog.epoch_step += 1
            window.steps += 1
            window.seconds += time.perf_counter() - t0
            bar.update(1)
            if prog.step % cfg.log_every == 0 or prog.step == end:
                last_train = {**window.metrics(cfg.optim.global_batch), "optim/lr": engine.get_lr()[0],
                              "memory/peak_gib": peak_memory_gib(device), "progress/epoch": prog.epoch,
                              "progress/images_seen": prog.step * cfg.optim.global_batch}
                # DeepSpeed divides each micro-batch loss by `accum` (and multiplies by the fp16 loss scale).
                grad_scale = 1.0 / accum
                if cfg.engine.precision == "fp16":
                    last_train["amp/skipped_steps"] = engine.skipped_steps
                    last_train["amp/loss_scale"] = getattr(engine.optimizer, "cur_scale", float("nan"))
                    grad_scale *= getattr(engine.optimizer, "cur_scale", 1.0)
                last_train.update(grad_norms.metrics(loss_scale=grad_scale))
                last_train.update(train_loader.metrics())
                window = _Window(device)
                log(last_train)
                if rank == 0:
                    eta = (end - prog.step) * last_train["perf/step_s"]
                    bar.write(step_line(prog.step, total_steps, steps_per_epoch, last_train, eta))
            if prog.epoch_step == steps_per_epoch or prog.step == end:
                break  # micro-batches left over at the end of an epoch (fewer than one step) are skipped
            if cfg.checkpoint.every_steps and prog.step % cfg.checkpoint.every_steps == 0:
                checkpoint(None)
            t0 = time.perf_counter()
        else:
            raise RuntimeError(f"the training loader ended after {prog.epoch_step} of {steps_per_epoch} "
                               f"steps of epoch {prog.epoch}; its len() promised more batches")
        if prog.epoch_step == steps_per_epoch:
            prog.epoch += 1
            prog.epoch_step = 0
            train_loader.set_epoch(prog.epoch)
            evaluated = prog.epoch % cfg.eval_every_epochs == 0 or prog.step == total_steps
            checkpoint(run_eval() if evaluated else None)
    bar.close()
    if prog.step == total_steps and evaluated_at != prog.step:
        checkpoint(run_eval())
    elif saved_step != prog.step:
        checkpoint(None)

    final = root / f"step_{saved_step:08d}"
    result = {"step": prog.step, "epoch": prog.epoch, "checkpoint": str(final), "run_dir": str(run_dir),
              "resumed_from": str(resume) if resume else None, "best_top1": prog.best_top1, **last_train,
              **last_val}
    if rank == 0:
        if prog.step >= total_steps and logger and cfg.mlflow.log_model:
            _log_models(logger, run_dir, root, final, val_loader)
        if logger:
            logger.close()
            result["mlflow_run_id"] = logger.run_id
            if links := logger.links():
                print(f"[trainer] MLflow run: {links['run']}\n[trainer] MLflow runs table: {links['runs']}",
                      flush=True)
    dist.barrier()
    return result


def _log_models(logger, run_dir: Path, root: Path, final: Path, val_loader) -> None:
    """The final and the best checkpoint as MLflow logged models, with one validation image as the input
    example; `model.pt` (the final weights) also stays in the run directory for `trainer.evaluate`."""
    x, _ = next(iter(val_loader))
    example = run_dir / "input_example.npy"
    np.save(example, model_input(x[:1], torch.device("cpu"), "fp32").float().numpy())
    best = best_checkpoint(root) or final
    for name, step_dir, file in (("final", final, "model.pt"), ("best", best, "model_best.pt")):
        logger.log_model(name, export(step_dir, run_dir / file), example, run_dir / "config.yaml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="a recipe name (python -m trainer.train --list)")
    src.add_argument("--config", help="a config YAML/JSON, e.g. a run directory's config.yaml")
    src.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.lr=0.05")
    p.add_argument("--run-name")
    p.add_argument("--resume", metavar="CKPT_DIR", help="resume from this checkpoint")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run has checkpoints")
    args = p.parse_args(argv)
    if args.list:
        from trainer.recipes import list_recipes

        print("\n".join(list_recipes()))
        return 0
    cfg = get_recipe(args.recipe) if args.recipe else load_config(args.config)
    apply_overrides(cfg, args.set)
    if args.run_name:
        cfg.run_name = args.run_name
    if args.resume:
        cfg.checkpoint.resume = args.resume
    if args.no_resume:
        cfg.checkpoint.auto_resume = False
        cfg.checkpoint.resume = None
    result = train(cfg)
    if dist.get_rank() == 0:
        print("result " + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()  # os._exit below would swallow it
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # DeepSpeed processes sometimes abort in interpreter teardown (stack notes §2).
        os._exit(code)

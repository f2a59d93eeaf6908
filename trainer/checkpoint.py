"""Step-numbered checkpoints that survive crashes, and resuming from them.

Layout under `<run_dir>/checkpoints/`:

    step_00001200/                  one complete checkpoint
        mp_rank_00_model_states.pt  DeepSpeed: fp32 weights, lr scheduler, (ZeRO 0) optimizer
        *_optim_states.pt           DeepSpeed ZeRO >= 1: one optimizer shard per rank
        trainer_rank00000.pt ...    ours, per rank: RNG states, data-loader position
        meta.json                   ours, global: `CheckpointMeta` (progress, MLflow run id, world size,
                                    precision, metrics, config)
    latest                          name of the newest step directory (DeepSpeed's pointer format)

A checkpoint is written into `.tmp-step_XXXXXXXX/` and renamed to `step_XXXXXXXX/` only once every
rank has finished writing; the `latest` pointer is replaced last. A crash at any point therefore
leaves the previous checkpoint complete and discoverable; stale `.tmp-*` directories are ignored and
removed by the next save. A write that fails (a full disk) fails the save on every rank at once and
removes the `.tmp-*` directory (`CheckpointWriteError`).

`CheckpointManager` is the one place that knows what a checkpoint holds and when one is written: it
holds the engine (model, optimizer, scheduler), the training data loader and the loop state it saves,
with every rank's RNG streams; it decides when a step is saved (`due`), prunes to keep-last/keep-best,
finds the resume point and the global batch the run started with. `CheckpointMeta` is the one reader of
`meta.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import safe_set_full_optimizer_state

from trainer.checkpoint_engine import trainer_checkpoint_engine
from trainer.config import CheckpointConfig
from trainer.distributed import rank_seed, rng_state, seed_all, set_rng_state
from trainer.health import ranks_flagged
from trainer.loop_state import LoopState
from trainer.safe_load import safe_load
from trainer.set_aside import set_aside

STEP_RE = re.compile(r"^step_(\d{8})$")
META = "meta.json"
LATEST = "latest"
FORMAT = 1
"""meta.json's layout version; raise it when a key changes meaning."""


@dataclass
class CheckpointMeta:
    """meta.json: one per checkpoint, written by rank 0 once every rank's shard is on disk. Stored flat
    (format 1): the loop state's keys beside the others."""

    progress: LoopState
    world_size: int
    zero_stage: int
    precision: str
    grad_accumulation: int
    config: dict[str, Any]
    global_batch: int
    """Images per optimizer step when this was saved, which a resume keeps (trainer/batch_setting.py)."""
    best_metric_here: float | None = None
    """The validation top-1 measured at this step, if any: what `keep_best` ranks checkpoints by."""
    metrics: dict[str, float] = field(default_factory=dict)
    saved_at: float = field(default_factory=time.time)
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        flat = dataclasses.asdict(self)
        return {"format": flat.pop("format"), **flat.pop("progress"), **flat}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        if d.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {d.get('format')!r}; this code reads format {FORMAT}")
        names = {f.name for f in dataclasses.fields(LoopState)}
        missing = names - d.keys()
        if missing:
            raise ValueError(f"meta.json lacks the loop state's {sorted(missing)}")
        return cls(progress=LoopState(**{k: d[k] for k in names}), **{k: v for k, v in d.items() if k not in names})

    @classmethod
    def read(cls, step_dir: str | Path) -> CheckpointMeta:
        return cls.from_dict(json.loads((Path(step_dir) / META).read_text()))


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"trainer_rank{rank:05d}.pt"


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    """meta.json as the flat dict it is stored as, checked by `CheckpointMeta` (for tools and tests)."""
    return CheckpointMeta.read(step_dir).to_dict()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if STEP_RE.match(d.name) and (d / META).is_file()]
    return sorted(found, key=lambda d: int(STEP_RE.match(d.name).group(1)))


def find_resume_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint. The `latest` pointer normally names it; a crash between the
    rename and the pointer update leaves a newer complete directory, which wins."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def best_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest validation top-1 saved with it (the newest on a tie)."""
    scored = [(m, d) for d in complete_checkpoints(root) if (m := CheckpointMeta.read(d).best_metric_here) is not None]
    return max(scored, key=lambda md: (md[0], md[1].name))[1] if scored else None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Step directories under `root`: when to save, what (the tracked engine, loader and loop state, with
    every rank's RNG streams), which to keep, and where a run resumes."""

    def __init__(self, cfg: CheckpointConfig, root: Path, zero_stage: int):
        self.cfg, self.root, self.zero_stage = cfg, root, zero_stage
        self.saved_step = -1
        self.resume_point = self._resume_point()
        if self.resume_point is None and not cfg.auto_resume:
            self.set_aside()

    def _resume_point(self) -> Path | None:
        if self.cfg.resume:
            path = Path(self.cfg.resume)
            if not (path / META).is_file():
                raise FileNotFoundError(f"checkpoint.resume={path} is not a complete checkpoint (no meta.json)")
            return path
        return self.newest() if self.cfg.auto_resume else None

    def started_global_batch(self) -> int | None:
        """The global batch of the run being resumed (which it keeps), or None for a fresh start."""
        return CheckpointMeta.read(self.resume_point).global_batch if self.resume_point else None

    def track(self, engine, loader, state: LoopState, run_facts: dict[str, Any]) -> None:
        """What every save writes and every restore sets. `run_facts`: the `CheckpointMeta` fields that
        stay the same through the run (world_size, zero_stage, precision, grad_accumulation, config,
        global_batch)."""
        self.engine, self.loader, self.state, self.run_facts = engine, loader, state, run_facts

    def newest(self) -> Path | None:
        return find_resume_checkpoint(self.root)

    def best(self) -> Path | None:
        return best_checkpoint(self.root)

    def step_dir(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def due(self, step: int, *, epoch_end: bool = False, last_step: bool = False) -> bool:
        """Whether `step` is saved: every epoch end, every `checkpoint.every_steps` steps, and the last step
        of an invocation unless it was just saved."""
        if last_step:
            return self.saved_step != step
        every = self.cfg.every_steps
        return epoch_end or bool(every and step % every == 0)

    def set_aside(self) -> None:
        """Collective. Starting over must not interleave step directories with an earlier run's: a later
        automatic resume would pick whichever is newest. The old ones are kept aside, not deleted."""
        if dist.get_rank() == 0 and complete_checkpoints(self.root):
            set_aside(self.root)
        dist.barrier()

    def save(self, metrics: dict[str, float], val_top1: float | None = None) -> Path:
        """Collective: every rank calls it. `val_top1`: this step's validation top-1, if measured (what
        keep_best ranks by). Returns the final step directory."""
        meta = CheckpointMeta(dataclasses.replace(self.state), best_metric_here=val_top1, metrics=metrics,
                              **self.run_facts)
        step_dir = save_checkpoint(self.engine, self.root, self.state.step, meta.to_dict(),
                                   {"rng": rng_state(), "loader": self.loader.state_dict()}, self.cfg.keep_last,
                                   self.cfg.keep_best)
        self.saved_step = self.state.step
        return step_dir

    def restore(self, step_dir: Path, seed: int, accum: int, global_batch: int) -> CheckpointMeta:
        """Collective. Engine, RNG streams, loader position and loop state (in place) as they were at
        `step_dir`'s step.

        Another data.batch_size (or world size) with the same optim.global_batch maps exactly: step s of an
        epoch reads samples [s * global_batch, (s + 1) * global_batch) of the epoch's order whatever the
        micro-batch, so the loader continues `epoch_step * accum` of its micro-batches in. Another global
        batch would change what a step and the schedule mean, and is refused."""
        loader = self.loader
        saved = CheckpointMeta.read(step_dir)
        saved_global = saved.config["optim"]["global_batch"]
        if saved_global != global_batch:
            raise ValueError(f"{step_dir} was trained with optim.global_batch={saved_global}, this run has "
                             f"{global_batch}: steps, epochs and the lr schedule would not line up. Resume with "
                             f"optim.global_batch={saved_global} (data.batch_size may change)")
        if saved.grad_accumulation != accum and loader.access == "stream" and saved.world_size == dist.get_world_size():
            raise ValueError(f"{step_dir} was trained with data.batch_size={saved.config['data']['batch_size']}; "
                             "data.access=stream pads each rank's epoch to whole micro-batches, so another one "
                             "changes the steps per epoch. Resume with the saved data.batch_size")
        rank_state = load_checkpoint(self.engine, step_dir, self.zero_stage)
        progress = saved.progress
        if rank_state is not None and saved.grad_accumulation == accum:
            set_rng_state(rank_state["rng"])
            loader.load_state_dict(rank_state["loader"])
        elif rank_state is not None:
            # The same ranks with another micro-batch: the RNG streams continue, the position is mapped.
            set_rng_state(rank_state["rng"])
            loader.seek(progress.epoch, progress.epoch_step * accum)
        else:
            # Another world size: each global batch is the next global-batch samples of the epoch's order
            # whatever the world size, so the same position lies `epoch_step` optimizer steps into the
            # epoch. The per-rank RNG streams cannot be continued and restart from a fresh seed.
            seed_all(rank_seed(seed, dist.get_rank(), progress.step))
            loader.seek(progress.epoch, progress.epoch_step * accum)
        vars(self.state).update(vars(progress))  # in place: the loop holds on to it
        self.saved_step = progress.step
        return saved


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (raised on every rank); the previous one is untouched."""


def save_checkpoint(engine, root: Path, step: int, meta: dict[str, Any], rank_state: dict[str, Any],
                    keep_last: int, keep_best: bool) -> Path:
    """Collective: every rank calls it. Returns the final step directory.

    A write that fails on any rank (full disk, ...) fails the save on every rank with `CheckpointWriteError`:
    the half-written `.tmp-` directory is removed and the newest complete checkpoint stays as it was."""
    rank = dist.get_rank()
    tmp_tag = f".tmp-{step_dir_name(step)}"
    tmp, final = root / tmp_tag, root / step_dir_name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    writer = trainer_checkpoint_engine(engine)
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    failure = writer.take_failure()
    if failure is None:
        try:
            torch.save(rank_state, rank_file(tmp, rank))
        except (OSError, RuntimeError) as e:
            failure = f"{rank_file(tmp, rank)}: {type(e).__name__}: {e}"
    _raise_if_failed(engine, root, tmp, step, failure)
    failure = None
    if rank == 0:
        try:
            _write_text_atomic(tmp / META, json.dumps(meta, indent=2, default=str))
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. a resumed run that stops where it started)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text_atomic(root / LATEST, final.name)
            _prune(root, keep_last, keep_best)
        except OSError as e:
            failure = f"{type(e).__name__}: {e}"
    _raise_if_failed(engine, root, tmp, step, failure)  # also the barrier that ends the save
    return final


def _raise_if_failed(engine, root: Path, tmp: Path, step: int, failure: str | None) -> None:
    """Collective: raise `CheckpointWriteError` on every rank if any rank's `failure` is set."""
    device = next(engine.module.parameters()).device  # the training device: NCCL reduces CUDA tensors only
    ranks = ranks_flagged(torch.tensor([float(failure is not None)], device=device))[0]
    if not ranks:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # never mistaken for a checkpoint, and its space is freed
    newest = find_resume_checkpoint(root)
    # torch reports a short write vaguely ("unexpected pos ..."); the free space says what it usually is.
    free = shutil.disk_usage(root).free / 2**30
    raise CheckpointWriteError(f"checkpoint of step {step} failed on rank(s) {ranks}"
                               + (f" ({failure})" if failure else "")
                               + f"; {free:.2f} GiB free under {root} (a full disk or a file-size quota?); "
                               f"the newest complete checkpoint is {newest or 'none'}, intact and resumable")


def _prune(root: Path, keep_last: int, keep_best: bool) -> None:
    done = complete_checkpoints(root)
    keep = set(done[-max(keep_last, 1):])
    if keep_best and (best := best_checkpoint(root)) is not None:
        keep.add(best)
    for d in done:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(engine, step_dir: Path, zero_stage: int) -> dict[str, Any] | None:
    """Restore the engine from `step_dir`; returns this rank's trainer state, or None.

    The trainer state (RNG, data position) is per rank, so it is returned only when the world size is
    unchanged. ZeRO-0 checkpoints hold the full optimizer state and load at any world size. ZeRO >= 1
    shards the optimizer state by rank and DeepSpeed refuses a different world size (its universal
    checkpoint converter only knows Adam's state), so the SGD momentum is reassembled from the saved
    shards here and placed into the new partitions.
    """
    step_dir = Path(step_dir)
    meta = CheckpointMeta.read(step_dir)
    if meta.zero_stage != zero_stage:
        raise ValueError(f"{step_dir} was written with ZeRO stage {meta.zero_stage}; resume with "
                         f"engine.zero_stage={meta.zero_stage}")
    same_world = meta.world_size == dist.get_world_size()
    full_optimizer = same_world or zero_stage == 0
    trainer_checkpoint_engine(engine)
    path, _ = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                     load_optimizer_states=full_optimizer)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {step_dir}")
    if not full_optimizer:
        _reshard_sgd_momentum(engine, step_dir, meta.world_size)
    return safe_load(rank_file(step_dir, dist.get_rank())) if same_world else None


def _saved_full_momentum(step_dir: Path, saved_world: int) -> dict[str, torch.Tensor]:
    """Per-parameter momentum assembled from the fragments each rank's ZeRO shard records."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for r in range(saved_world):
        files = list(step_dir.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        if len(files) != 1:
            raise FileNotFoundError(f"{step_dir}: expected one optimizer shard for rank {r}, found {files}")
        sd = safe_load(files[0])["optimizer_state_dict"]
        state = sd["base_optimizer_state"]["state"]
        for group, mapping in enumerate(sd["param_slice_mappings"]):
            if "momentum_buffer" not in state.get(group, {}):
                return {}  # saved before the first optimizer step: there is no momentum yet
            flat = state[group]["momentum_buffer"]
            for name, frag in mapping.items():
                piece = flat.narrow(0, frag.start, frag.numel)
                pieces.setdefault(name, []).append(piece)
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def _reshard_sgd_momentum(engine, step_dir: Path, saved_world: int) -> None:
    full = _saved_full_momentum(step_dir, saved_world)
    if not full:
        return
    zero = engine.optimizer
    inner = zero.optimizer  # torch SGD over this rank's flat fp32 partitions
    for group in inner.param_groups:
        for flat in group["params"]:
            inner.state[flat]["momentum_buffer"] = torch.zeros_like(flat)
    # DeepSpeed links each parameter to its slice of the optimizer state lazily at the first step;
    # link now so the public setter below can write the slices.
    zero._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        if name not in full:
            raise KeyError(f"{step_dir}: no saved momentum for parameter {name}")
        safe_set_full_optimizer_state(p, full[name].view_as(p).to(p.device), "momentum_buffer")

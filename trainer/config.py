"""Typed training configuration: nested dataclasses, `section.key=value` overrides, YAML/JSON round trip.

Named setups live in `trainer.recipes` as plain functions returning a `TrainConfig`; the command line
only overrides fields (`--set optim.lr=0.05`). The resolved config is written to `<run_dir>/config.yaml`
and logged to MLflow, so every run can be re-created from its own directory.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dataloaders.config import DataConfig


@dataclass
class ModelConfig:
    name: str = "ms_resnet20"
    num_classes: int = 10
    """0: as many as the converted train split's classes (the trainer reads its manifest)."""
    T: int = 6
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra `create_model` arguments (widths, dropout, decay, v_th, lens, in_channels, ...)."""


@dataclass
class OptimConfig:
    global_batch: int = 256
    """Images per optimizer step summed over all ranks. Fixed by the recipe: when the world size changes,
    gradient accumulation changes instead, so the learning-rate schedule means the same thing."""
    lr: float = 0.1
    """Peak learning rate at `global_batch` (the recipe does any linear scaling)."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    epochs: int = 125
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    """'cosine' (to 0 over the run, stepped every optimizer step) or 'constant'."""
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 disables it."""
    max_steps: int = 0
    """If > 0, the run (and its schedule) is this many optimizer steps instead of `epochs` epochs."""


@dataclass
class EngineConfig:
    precision: str = "bf16"
    """'bf16' (fp32 master weights + bf16 autocast), 'fp16' (DeepSpeed dynamic loss scaling, GPU only)
    or 'fp32'."""
    zero_stage: int = 0
    activation_checkpointing: int = 0
    """Checkpoint every k-th residual block (or segment) over the whole T sequence; 0 disables it."""
    checkpoint_segment: int = 1
    """Consecutive blocks checkpointed as one unit: its input is kept and backward recomputes the whole
    unit. 1 = each block on its own; longer segments keep fewer inputs at the same recompute cost."""
    sync_bn: bool = True
    compile: bool = False
    deepspeed_config: str = ""
    """Path to a DeepSpeed JSON to use verbatim instead of the generated one (batch sizes are checked)."""
    seed: int = 0
    backend: str = ""
    """torch.distributed backend; '' picks nccl with CUDA and gloo otherwise."""


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every N optimizer steps (and always at the end of an epoch); 0 saves at epoch ends only."""
    keep_last: int = 2
    keep_best: bool = True
    resume: str | None = None
    """A checkpoint (step directory) to resume from; overrides the automatic choice."""
    auto_resume: bool = True
    """Resume from the newest complete checkpoint in the run directory when there is one."""


@dataclass
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else MLflow's default store (sqlite `mlflow.db` in the working dir)."""
    experiment: str | None = None
    """None: the recipe name."""
    system_metrics: bool = True
    log_model: bool = True
    flush_timeout_s: float = 60.0
    """How long the end of training waits for an unreachable server before spilling to the run dir."""


@dataclass
class TrainConfig:
    recipe: str = ""
    run_name: str = ""
    """'' derives a readable name from the recipe, model, T, precision and ZeRO stage."""
    run_dir: str = ""
    """'' means runs/<run_name>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    log_every: int = 20
    """Optimizer steps between structured log lines and MLflow training metrics."""
    eval_every_epochs: int = 1
    stop_at_step: int = 0
    """If > 0, end this invocation once the global step reaches it (the schedule is unchanged), e.g.
    to fit a time-limited job slot; re-running the command resumes."""

    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        base = self.recipe or self.model.name
        return f"{base}-T{self.model.T}-{self.engine.precision}-z{self.engine.zero_stage}"

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.resolved_run_name()


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) that YAML, JSON and MLflow accept."""

    def plain(v):
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a parsed value against a field's type hint (int -> float and list -> tuple are allowed)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arm in typing.get_args(hint):
            if arm is not type(None):
                try:
                    return _coerce(value, arm, key)
                except TypeError:
                    pass
        raise TypeError(f"{key}: {value!r} does not match {hint}")
    if hint is Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{key}: expected a list, got {value!r}")
        return origin(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and value is not None and not isinstance(value, str):
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a dict; unknown keys are an error, missing keys default."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; "
                       f"valid under {prefix or 'top level'}: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings in place (values parsed as YAML: 0.05, true, [8, 16, 32]).

    Keys below a dict field (model.kwargs.widths) are created; any other unknown key is an error.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        value = yaml.safe_load(raw) if raw.strip() else ""
        *path, last = key.strip().split(".")
        node: Any = cfg
        for i, part in enumerate(path):
            if isinstance(node, dict):
                node = node.setdefault(part, {})
            elif dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
                node = getattr(node, part)
            else:
                raise KeyError(f"override {key!r}: no section {'.'.join(path[:i + 1])!r}")
        if isinstance(node, dict):
            node[last] = value
            continue
        fields = {f.name for f in dataclasses.fields(node)}
        if last not in fields:
            raise KeyError(f"override {key!r}: unknown key {last!r}; valid: {sorted(fields)}")
        hint = typing.get_type_hints(type(node))[last]
        if dataclasses.is_dataclass(hint):
            raise KeyError(f"override {key!r} names a section; set one of its keys instead")
        setattr(node, last, _coerce(value, hint, key))
        if hasattr(node, "__post_init__"):
            node.__post_init__()  # the section's own validation
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    path = Path(path)
    data = to_dict(cfg)
    text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_config(path: str | Path) -> TrainConfig:
    text = Path(path).read_text()
    data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    return from_dict(TrainConfig, data)

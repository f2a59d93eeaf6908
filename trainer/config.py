"""Typed training configuration: nested dataclasses, `section.key=value` overrides, YAML/JSON round trip.

Named setups live in `trainer.recipes` as plain functions returning a `TrainConfig`; the command line
only overrides fields (`--set optim.lr=0.05`). The resolved config is written to `<run_dir>/config.yaml`
and logged to MLflow, so every run can be re-created from its own directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
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

    def build(self):
        """The single-device network this config names (fresh weights from torch's current seed)."""
        from models import create_model  # torch loads only when a model is wanted, not for a config

        return create_model(self.name, num_classes=self.num_classes, T=self.T, **self.kwargs)


@dataclass
class OptimConfig:
    global_batch: int = 256
    """The recipe's images per optimizer step summed over all ranks, at which `lr` is given. How the run's
    actual global batch follows from the world size: `batch_policy` (trainer/batch_setting.py)."""
    lr: float = 0.1
    """Peak learning rate at `global_batch`; the "scale" policy scales it linearly with the global batch."""
    batch_policy: str = "scale"
    """'scale': keep data.batch_size per rank, reach `global_batch` by gradient accumulation where the ranks
    can, else let the global batch grow with the world and scale lr linearly (with `scale_warmup_epochs`).
    'fixed': `global_batch` and `lr` at any world size (the micro batch shrinks if it must)."""
    scale_warmup_epochs: float = 5.0
    """Least warm-up when the "scale" policy grows the global batch past `global_batch` (Goyal et al. 2017)."""
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
    activation_checkpointing_segment: int = 1
    """Consecutive blocks checkpointed as one unit: its input is kept and backward recomputes the whole
    unit. 1 = each block on its own; longer segments keep fewer inputs at the same recompute cost."""
    sync_bn: bool = True
    """BatchNorm statistics over all ranks (the authors' SyncBN), with more than one rank only: torch's
    nn.SyncBatchNorm on CUDA, `wrap.CpuSyncBatchNorm` on CPU. tdBN layers are plain BatchNorm2d, so both
    conversions reach them."""
    compile: bool = False
    deepspeed_config: str = ""
    """Path to a DeepSpeed JSON to use verbatim instead of the generated one (batch sizes are checked)."""
    seed: int = 0
    backend: str = ""
    """torch.distributed backend; '' picks 'cpu:gloo,cuda:nccl' with CUDA (CPU tensors need a backend too)
    and gloo otherwise."""
    device: str = "auto"
    """'auto' (this rank's GPU where torch finds GPUs, else the CPU), 'cpu', 'cuda' (stop at start-up when this
    rank's GPU is missing: the launchers set it for GPU workers) or 'cuda:K' (that GPU; what Ray Train assigned)."""
    channels_last: bool = False
    """Run the convolutions channels_last (NHWC): conv weights and each input batch laid out so on the training
    device, the [T, N, C, H, W] activations as [T*N, H, W, C] buffers (models/layout.py, docs/model.md §12).
    Values are the same up to the conv kernels' summation order. On the CPU (oneDNN) it is as fast or faster
    (channels_last vs contiguous img/s, bench.models' ds_channels_last rows, quiet 2-core machine: bf16 0.99x on
    MS-ResNet-18 @ 64 px and 1.09x on CIFAR MS-ResNet-56, fp32 1.07x / 1.16x), but off by default: resuming a
    checkpoint and multi-rank runs have not been tested with it. CUDA: cuDNN's bf16/fp16 tensor-core convs are
    NHWC kernels, so channels_last is the usual win there, but no GPU has timed it here: measure (bench.models
    rows on a GPU, or bench/gpu_check) before turning it on for GPU runs."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its convolution algorithms on the first steps and keep the fastest (training shapes are
    fixed); false for runs that must repeat bit for bit."""
    nonfinite: str = "rollback"
    """A NaN/inf loss or gradient on any rank (all ranks act alike): 'rollback' reloads the newest checkpoint
    (always finite), skips the training batches from there to the failing step and continues; 'skip' drops
    that optimizer step (no update) and counts it; 'stop' exits with an error at once."""
    max_rollbacks: int = 3
    """rollback: after this many rollbacks in one run the next non-finite step stops it with an error."""

    def __post_init__(self):
        if self.nonfinite not in ("rollback", "skip", "stop"):
            raise ValueError(f"engine.nonfinite={self.nonfinite!r}; expected 'rollback', 'skip' or 'stop'")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"engine.device={self.device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:K'")
        if self.max_rollbacks < 0:
            raise ValueError(f"engine.max_rollbacks={self.max_rollbacks} must be >= 0")


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


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NULL = ("null", "none", "~")
_EXAMPLES = {int: "1000", float: "1e-4", bool: "true", str: "some-text", list: "[8, 16, 32]",
             tuple: "[8, 16, 32]", dict: "{depth: 20}"}


def parse_value(raw: str) -> Any:
    """A command-line value as people type it: numbers in any notation (1e-4, 5E3, .5, -2), true/false,
    null, [lists] and {dicts} (YAML flow syntax), anything else a string.

    YAML alone reads `1e-4` as a string (YAML 1.1 wants `1.0e-4`), so strings that look like numbers
    are turned into numbers afterwards, inside lists and dicts too."""
    text = raw.strip()
    if not text:
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return _numbers(value)


def _numbers(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and not re.search(r"[.eE]", value) else number
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    t = origin or hint
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping"}.get(t, getattr(t, "__name__", str(t)))


def _example(hint: Any) -> str:
    arms = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return _EXAMPLES.get(typing.get_origin(arms[0]) or arms[0], "...")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a parsed value against a field's type hint (int -> float, an integral float -> int and
    list -> tuple are allowed). A wrong type names the field, the expected type and an example."""
    try:
        return _convert(value, hint)
    except TypeError:
        raise TypeError(f"{key}: expected {_type_name(hint)}, got {value!r} "
                        f"(e.g. --set {key}={_example(hint)})") from None


def _convert(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arm in typing.get_args(hint):
            if arm is not type(None):
                try:
                    return _convert(value, arm)
                except TypeError:
                    pass
        raise TypeError
    if hint is Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise TypeError
        return origin(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise TypeError
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e6 steps
    if hint is str and value is not None and not isinstance(value, str):
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError
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


def config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config (`optim.lr`, `model.kwargs`, ...)."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        keys += config_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


def _unknown(cfg: TrainConfig, key: str, what: str) -> KeyError:
    known = config_keys(cfg)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    # `weight_decay=1e-4` without its section, or a typo in the last part only
    close = close or [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    if close:
        return KeyError(f"override {key!r}: {what}; did you mean {close[0]!r}?")
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    valid = [k for k in known if k.startswith(section)] or sorted({k.split(".")[0] for k in known})
    return KeyError(f"override {key!r}: {what}; valid: {valid}")


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings in place; values as `parse_value` reads them, except that a
    string field takes the text as typed (`run_name=007` stays '007').

    Keys below a dict field (model.kwargs.widths) are created; any other unknown key is an error that
    names the closest known key.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=0.05)")
        *path, last = key.split(".")
        node: Any = cfg
        for i, part in enumerate(path):
            if isinstance(node, dict):
                node = node.setdefault(part, {})
            elif dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
                node = getattr(node, part)
            else:
                raise _unknown(cfg, key, f"no section {'.'.join(path[:i + 1])!r}")
        if isinstance(node, dict):
            node[last] = parse_value(raw)
            continue
        fields = {f.name for f in dataclasses.fields(node)}
        if last not in fields:
            raise _unknown(cfg, key, f"unknown key {last!r}")
        hint = typing.get_type_hints(type(node))[last]
        if dataclasses.is_dataclass(hint):
            raise KeyError(f"override {key!r} names a section; set one of its keys instead, e.g. "
                           f"{config_keys(getattr(node, last), key + '.')[0]}=...")
        value = parse_value(raw)
        if raw.strip().lower() in _NULL and type(None) in typing.get_args(hint):
            value = None  # null, None or ~ for an optional field, whatever its other type
        elif _is_text(hint):
            value = raw.strip()
        setattr(node, last, _coerce(value, hint, key))
        if hasattr(node, "__post_init__"):
            node.__post_init__()  # the section's own validation
    return cfg


def _is_text(hint: Any) -> bool:
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and str in typing.get_args(hint))


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

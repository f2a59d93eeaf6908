"""Consolidated fp32 weights from a training checkpoint, loadable into the plain single-device model.

    python -m trainer.export runs/NAME/checkpoints/step_00001200 --out model.pt
    python -m trainer.export runs/NAME --out model.pt        # the run's newest complete checkpoint

bf16 and fp32 runs keep fp32 weights in the engine, so DeepSpeed's model file holds the master
weights at every ZeRO stage. fp16 runs keep fp32 masters only in the optimizer state; for ZeRO >= 1
they are reassembled from the shards with DeepSpeed's zero_to_fp32 (for fp16 ZeRO-0 the fp16 weights
are exported).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint import CheckpointMeta, find_resume_checkpoint
from trainer.config import ModelConfig, from_dict
from trainer.safe_load import safe_load, weights_only_loads


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    meta = CheckpointMeta.read(step_dir)
    if meta.precision == "fp16" and meta.zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():  # it calls torch.load(weights_only=False) itself
            sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    else:
        model_file = step_dir / "mp_rank_00_model_states.pt"
        sd = safe_load(model_file)["module"]
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def export(checkpoint: str | Path, out: str | Path) -> Path:
    path = Path(checkpoint)
    if not (path / "meta.json").is_file():
        found = find_resume_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint step directory nor a run directory "
                                    "with a complete checkpoint")
        path = found
    meta = CheckpointMeta.read(path)
    blob = {"state_dict": consolidated_state_dict(path), "model": meta.config["model"],
            "step": meta.progress.step, "epoch": meta.progress.epoch, "metrics": meta.metrics, "source": str(path)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(out)
    return out


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """The single-device model rebuilt from an `export` file, with its weights, and the file's contents.
    The file holds only tensors and plain values; anything else is refused (`trainer.safe_load`)."""
    blob = safe_load(path)
    model = from_dict(ModelConfig, blob["model"]).build()
    model.load_state_dict(blob["state_dict"])
    return model, blob


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(export(args.checkpoint, args.out))


if __name__ == "__main__":
    main()

"""The GPU check of issue 5, through the trainer's engine step (not a CPU test; never run by CI).

    python -m bench.gpu_check [--steps 10] [--json out.json]

Rows: MS-ResNet-18 at 224 px, T=6, batch 64, bf16 and fp16, without and with activation checkpointing
(every block); MS-ResNet-104 at 224 px, T=6, batch 32, bf16, with its recipe's checkpointing. Each row
builds the recipe's config, the DeepSpeed engine via `trainer.wrap` (SyncBN skipped at world size 1,
checkpointing, DeepSpeed fp16 loss scaling) and runs the trainer's step (autocast forward, loss,
engine.backward, engine.step) on in-memory batches, so the figures are the model's and the engine's,
not a JPEG decoder's. Prints images/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

ROWS = [  # recipe, precision, activation checkpointing (every k-th block; 0 = off), batch
    ("ms_resnet18_imagenet", "bf16", 0, 64), ("ms_resnet18_imagenet", "bf16", 1, 64),
    ("ms_resnet18_imagenet", "fp16", 0, 64), ("ms_resnet18_imagenet", "fp16", 1, 64),
    ("ms_resnet104_imagenet", "bf16", 1, 32),
]


def run_row(recipe: str, precision: str, every: int, batch: int, steps: int) -> dict:
    from models import create_model
    from trainer.config import apply_overrides
    from trainer.deepspeed_config import deepspeed_config
    from trainer.evaluate import autocast, model_input
    from trainer.recipes import get_recipe
    from trainer.wrap import wrap

    cfg = get_recipe(recipe)
    apply_overrides(cfg, [f"engine.precision={precision}", f"engine.activation_checkpointing={every}",
                          f"data.batch_size={batch}", f"optim.global_batch={batch}"])
    device = torch.device("cuda")
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T, **cfg.model.kwargs)
    engine = wrap(model, cfg, deepspeed_config(cfg, 1, True), steps + 3, steps + 3, on_gpu=True)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(device, precision):
            logits = engine(model_input(x, device, precision))
        loss = F.cross_entropy(logits.float(), y)
        engine.backward(loss)
        engine.step()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"model": cfg.model.name, "precision": precision, "ckpt_every": every, "batch": batch,
            "T": cfg.model.T, "images_per_s": batch * steps / dt,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  deepspeed {deepspeed.__version__}")
    print(f"{'model':<14}{'prec':<6}{'ckpt':>5}{'batch':>6}{'img/s':>10}{'peak GiB':>10}")
    rows = []
    for r in ROWS:
        head = f"{r[0].removesuffix('_imagenet'):<14}{r[1]:<6}{r[2]:>5}{r[3]:>6}"
        try:
            row = run_row(*r, steps=args.steps)
            print(f"{head}{row['images_per_s']:>10.1f}{row['peak_gib']:>10.2f}", flush=True)
        except torch.OutOfMemoryError as e:
            row = {"recipe": r[0], "precision": r[1], "ckpt_every": r[2], "batch": r[3], "error": str(e)[:99]}
            print(f"{head}  OOM")
        torch.cuda.empty_cache()
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""The GPU check of issues 5 and 9, through the trainer's engine step (not a CPU test; never run by CI).

    python -m bench.gpu_check [--steps 10] [--json out.json]
    python -m bench.gpu_check --dry-run     # the LIF checks on CPU at a small shape (no GPU needed)

LIF op (issue 9), first: torch.ops.deepspike.lif on CUDA (the Triton kernels) against the PyTorch reference
on the same GPU input, bit for bit, for fp32/bf16/fp16/fp64 and odd shapes; then forward + backward ms on the
first LIF input of MS-ResNet-18 at 224 px, T=6, batch 64, against the reference and SpikingJelly's LIFNode
(its fused kernels lack a rectangular surrogate, see bench.lif).

Rows: MS-ResNet-18 at 224 px, T=6, batch 64 (and 128 for the images/s goal), bf16 and fp16, without and
with activation checkpointing (every block); MS-ResNet-104 at 224 px, T=6, batch 32, bf16, with its
recipe's checkpointing. Each row builds the recipe's config, the DeepSpeed engine via `trainer.wrap`
(SyncBN skipped at world size 1, checkpointing, DeepSpeed fp16 loss scaling) and runs the trainer's step
(autocast forward, loss, engine.backward, engine.step) on in-memory batches, so the figures are the model's
and the engine's, not a JPEG decoder's. Prints images/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

ROWS = [  # recipe, precision, activation checkpointing (every k-th block; 0 = off), batch
    ("ms_resnet18_imagenet", "bf16", 0, 64), ("ms_resnet18_imagenet", "bf16", 0, 128),
    ("ms_resnet18_imagenet", "bf16", 1, 64),
    ("ms_resnet18_imagenet", "fp16", 0, 64), ("ms_resnet18_imagenet", "fp16", 1, 64),
    ("ms_resnet104_imagenet", "bf16", 1, 32),
]


def run_row(recipe: str, precision: str, every: int, batch: int, steps: int) -> dict:
    from models import create_model
    from trainer.batch_plan import batch_plan
    from trainer.config import apply_overrides
    from trainer.deepspeed_config import deepspeed_config
    from trainer.precision import autocast, model_input, weights_dtype
    from trainer.recipes import get_recipe
    from trainer.wrap import wrap

    cfg = get_recipe(recipe)
    apply_overrides(cfg, [f"engine.precision={precision}", f"engine.activation_checkpointing={every}",
                          f"data.batch_size={batch}", f"optim.global_batch={batch}"])
    device = torch.device("cuda")
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, T=cfg.model.T, **cfg.model.kwargs)
    plan = batch_plan(cfg.optim, cfg.data.batch_size, 1)
    engine = wrap(model, cfg, deepspeed_config(cfg, plan, True), plan, steps + 3, steps + 3, on_gpu=True)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(device, precision):
            logits = engine(model_input(x, device, weights_dtype(engine.module), time_first=False))
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


IMAGES_PER_S_GOAL = 1000  # MS-ResNet-18, 224 px, T=6, bf16, one H200
EXACT_SHAPES = [(1, 7), (2, 3, 5), (6, 2, 3, 5, 7), (6, 4, 1031), (6, 64, 64, 56, 56)]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()]))


def lif_exactness(device: torch.device, shapes) -> list[dict]:
    """The op on `device` against the reference on the same input: spikes, code and input gradient."""
    from models.neuron import lif_sequence_reference
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for shape in shapes:
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(shape, generator=g) * 0.6 + 0.3).to(device, dtype)
            grad = torch.randn(shape, generator=g).to(device, dtype)
            ok = True
            for constants in ((0.25, 0.5, 0.5), (0.3, 0.45, 0.35)):
                xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
                spikes, code = torch.ops.deepspike.lif(xo, *constants)
                spikes.backward(grad)
                ref = lif_sequence_reference(xr, *constants)
                ok &= _bitwise_equal(spikes, ref) and torch.equal(code, ref.grad_fn.saved_tensors[0])
                ref.backward(grad)
                ok &= _bitwise_equal(xo.grad, xr.grad)
            rows.append({"dtype": str(dtype), "shape": list(shape), "exact": bool(ok)})
    return rows


def lif_section(device: torch.device, shape) -> dict:
    from bench import lif
    exact = lif_exactness(device, EXACT_SHAPES[:-1] + [shape])
    bad = [r for r in exact if not r["exact"]]
    print(f"LIF op on {device} vs reference, bit for bit: {len(exact) - len(bad)}/{len(exact)} exact"
          + "".join(f"\n  MISMATCH {r['dtype']} {r['shape']}" for r in bad), flush=True)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        timings[str(dtype)] = lif.time_lif(shape, dtype, device)
        print("\n".join(lif.report(shape, dtype, timings[str(dtype)])), flush=True)
    try:
        from spikingjelly.activation_based.functional import neuron_implementation
        print(f"   SpikingJelly's LIF implementation on {device}: {neuron_implementation('lif', device)}")
    except (ImportError, ValueError, RuntimeError) as e:
        print(f"   SpikingJelly's LIF implementation on {device}: unknown ({e})")
    return {"exact": exact, "timings_ms": timings}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("--dry-run", action="store_true", help="the LIF checks on CPU at a small shape, then stop")
    args = p.parse_args()
    if args.dry_run:
        lif_section(torch.device("cpu"), (6, 2, 16, 14, 14))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU")
    from bench.lif import first_lif_input_shape
    lif = lif_section(torch.device("cuda"), first_lif_input_shape("ms_resnet18", 1000, 6, 64, 224))
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
    best = max((r["images_per_s"] for r in rows if r.get("model") == "ms_resnet18" and r["precision"] == "bf16"
                and "images_per_s" in r), default=0.0)
    print(f"goal: MS-ResNet-18 224 px T=6 bf16 >= {IMAGES_PER_S_GOAL} img/s: best {best:.0f} "
          f"{'PASS' if best >= IMAGES_PER_S_GOAL else 'MISS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lif": lif, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

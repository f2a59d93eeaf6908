"""Stage `nccl` of bench/gpu_check.sh: the trainer's own process-group start-up (`init_distributed` with
engine.device=cuda: 'cpu:gloo,cuda:nccl') in a world of one, collectives on a CUDA and on a CPU tensor (each
reaches its own backend), and `trainer.evaluate.evaluate` on the device with its sums kept there.

    python -m bench.gpu_check.nccl --json out.json [--cpu-dry-run]

--cpu-dry-run: the same calls on the CPU over gloo.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--cpu-dry-run", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    from dataloaders.loader import InMemory
    from models import create_model
    from trainer.distributed import init_distributed
    from trainer.evaluate import evaluate

    rank, world, device = init_distributed("", "cpu" if a.cpu_dry_run else "cuda")
    result = {"device": str(device), "world": world, "backend": str(dist.get_backend())}
    # Float64 on the device is what evaluation reduces; int64 on the CPU is what the loaders' counters are.
    on_device = torch.arange(4, dtype=torch.float64, device=device)
    on_cpu = torch.arange(4, dtype=torch.int64)
    dist.all_reduce(on_device)
    dist.all_reduce(on_cpu)
    result["all_reduce"] = {"device": on_device.tolist(), "cpu": on_cpu.tolist()}
    torch.manual_seed(0)
    model = create_model("ms_resnet18", num_classes=10, T=2).to(device)
    images = [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).float() / 255 for _ in range(2)]
    batches = InMemory([(x, torch.randint(0, 10, (4,))) for x in images])
    metrics = evaluate(model, batches, device, "bf16")
    result["evaluate"] = {k: v for k, v in metrics.items() if k.startswith("val/")}
    ok = (on_device.tolist() == [0.0, 1.0, 2.0, 3.0] and on_cpu.tolist() == [0, 1, 2, 3] and world == 1
          and metrics["val/samples"] == 8 and all(math.isfinite(v) for v in result["evaluate"].values()))
    result["ok"] = ok
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(f"[nccl] {json.dumps(result)}", flush=True)
    dist.destroy_process_group()
    if not ok:
        raise SystemExit("[nccl] a collective or the evaluation gave a wrong result")


if __name__ == "__main__":
    main()

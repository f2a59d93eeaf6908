"""Cost of `BlockGradNorms` on a training step (forward, backward, SGD step), measured on real batches.

    python -m bench.gradlog_overhead --model ms_resnet110 --T 4 --batch-size 32 --size 32 [--device cuda]

Plain and logged steps alternate so that drifting machine load hits both alike; the median of each is
compared. A logged step also reads the metrics (one device sync), i.e. the worst case of logging at
every step; logging every N steps costs 1/N of that.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from analysis.loading import real_batches
from models import create_model
from models.grad_norms import BlockGradNorms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gradlog_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ms_resnet56")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> float:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, T=args.T).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = (t.to(device) for t in real_batches("digits", args.size, args.batch_size, 1)[0])
    grad_norms = BlockGradNorms(model)

    def step(logged: bool) -> float:
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if logged:
            with grad_norms:
                F.cross_entropy(model(x), y).backward()
            grad_norms.metrics()
        else:
            F.cross_entropy(model(x), y).backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    for logged in (False, True):  # warm-up
        step(logged)
    plain, logged = [], []
    for _ in range(args.steps):
        plain.append(step(False))
        logged.append(step(True))
    t_plain, t_logged = statistics.median(plain), statistics.median(logged)
    overhead = 100 * (t_logged - t_plain) / t_plain
    print(f"{args.model} T={args.T} batch={args.batch_size} {args.size}px on {device}: plain step "
          f"{1000 * t_plain:.1f} ms, logged step {1000 * t_logged:.1f} ms (median of {args.steps}): "
          f"overhead {overhead:+.2f}% when logging every step")
    return overhead


if __name__ == "__main__":
    main()

"""The training command line: one rank's run of `trainer.Trainer`.

    # 2 ranks on one machine (CPU: gloo; GPUs: nccl); the same command again resumes
    torchrun --nproc_per_node 2 -m trainer.train --recipe digits_demo --set data.path=data/digits16
    # explicit choices
    torchrun ... -m trainer.train --recipe ms_resnet104_imagenet --set data.path=/data/imagenet \
        engine.activation_checkpointing=2 --run-name msr104-try2 [--resume CKPT_DIR | --no-resume]

`train(cfg, report)` is the library entry point (the Ray launcher calls it inside each worker): it builds a
`trainer.Trainer` and runs it, in an existing process group or one made from the torchrun environment
(RANK, WORLD_SIZE, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

import torch.distributed as dist

from trainer.config import TrainConfig, apply_overrides, load_config
from trainer.distributed import DeviceError
from trainer.health import NonFiniteError
from trainer.recipes import get_recipe
from trainer.trainer import Report, Trainer


def train(cfg: TrainConfig, report: Report | None = None) -> dict[str, Any]:
    return Trainer(cfg, report).fit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="a recipe name (python -m trainer.train --list)")
    src.add_argument("--config", help="a config YAML/JSON, e.g. a run directory's config.yaml")
    src.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. optim.lr=0.05 (repeatable)")
    p.add_argument("--run-name")
    p.add_argument("--resume", metavar="CKPT_DIR", help="resume from this checkpoint")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run has checkpoints")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except NonFiniteError as e:  # the run's own verdict, not a bug: one line, no traceback
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[trainer] stopped: {e}", file=sys.stderr)
    except DeviceError as e:  # the GPU this rank asked for is missing: one line naming what it found
        print(f"[trainer] stopped: {e}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()  # os._exit below would swallow it
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # DeepSpeed processes sometimes abort in interpreter teardown (docs/stack.md §2).
        os._exit(code)

"""MS-ResNet on ImageNet with Ray Train, from the repository root of a machine that reaches the cluster:

    ray job submit -- python launch/imagenet.py --nodes 4
    ray job submit --working-dir . -- python launch/imagenet.py --nodes 4 --recipe ms_resnet18_imagenet \\
        --data /mnt/cluster_storage/data/imagenet-wds --run-name msr18-a --set optim.epochs=90
    ray job submit -- python launch/imagenet.py --nodes 1 --recipe ms_resnet18_folder --data /data/flowers-wds
    python launch/imagenet.py --nodes 1 ...      # no cluster running: starts a local one
    python launch/imagenet.py --nodes 4 --gpus-per-node 8 --dry-run   # the batch plan only, no cluster

Resubmitting with the same --run-name resumes the run. Flags: --help; how they map onto Ray Train:
launch/common.py.
"""

import sys
from pathlib import Path

if not __package__:  # run as a file: the checkout need not be pip-installed on the cluster
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common  # noqa: E402

RECIPE = "ms_resnet104_imagenet"
DATASETS = ("imagenet", "folder")


def main(argv: list[str] | None = None) -> None:
    common.main(RECIPE, DATASETS, argv)


if __name__ == "__main__":
    main()

"""MS-ResNet on CIFAR10-DVS event frames with Ray Train, from the repository root:

    ray job submit -- python launch/cifar10dvs.py --nodes 2 --data /mnt/cluster_storage/data/cifar10dvs-wds
    ray job submit -- python launch/cifar10dvs.py --nodes 2 --run-name dvs-a --set optim.epochs=100

Resubmitting with the same --run-name resumes the run. Flags: --help; how they map onto Ray Train:
launch/common.py.
"""

import sys
from pathlib import Path

if not __package__:  # run as a file: the checkout need not be pip-installed on the cluster
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common  # noqa: E402

RECIPE = "ms_resnet20_cifar10dvs"
DATASETS = ("cifar10dvs",)


def main(argv: list[str] | None = None) -> None:
    common.main(RECIPE, DATASETS, argv)


if __name__ == "__main__":
    main()

"""MS-ResNet on CIFAR-10 or CIFAR-100 (or the small digits set) with Ray Train, from the repository root:

    ray job submit -- python launch/cifar10.py --nodes 2 --data /mnt/cluster_storage/data/cifar10-wds
    ray job submit -- python launch/cifar10.py --nodes 2 --recipe ms_resnet110_cifar10 --run-name msr110-a
    ray job submit -- python launch/cifar10.py --nodes 2 --recipe digits_demo --data data/digits16  # demo

Resubmitting with the same --run-name resumes the run. Flags: --help; how they map onto Ray Train:
launch/common.py.
"""

import sys
from pathlib import Path

if not __package__:  # run as a file: the checkout need not be pip-installed on the cluster
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common  # noqa: E402

RECIPE = "ms_resnet20_cifar10"
# The digits recipes are CIFAR-sized 10-class images: the quick stand-in for tests and the demo.
DATASETS = ("cifar10", "cifar100", "digits")


def main(argv: list[str] | None = None) -> None:
    common.main(RECIPE, DATASETS, argv)


if __name__ == "__main__":
    main()

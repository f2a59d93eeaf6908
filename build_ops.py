"""Build deepspike's compiled ops in place: models/_lif_cpu.abi3.so (the CPU kernels of torch.ops.deepspike.lif).

    python build_ops.py        # from the checkout root, with the project's venv; make test / make demo run it

The library is built once by the install (Makefile, cluster/Dockerfile), never JIT-compiled at run time, so
Ray workers and DeepSpeed ranks load the same in-tree file. It uses only libtorch and the stable CPython ABI
(abi3), so one build serves every Python version of the venv's torch.
"""

import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    os.chdir(ROOT)
    setup(
        name="deepspike-ops",
        ext_modules=[CppExtension(
            "models._lif_cpu", ["models/csrc/lif_cpu.cpp"], py_limited_api=True,
            # -ffp-contract=off keeps the kernel bit-identical to the PyTorch reference (see the source).
            # -fno-trapping-math lets the compiler vectorise the selects (results are unchanged: it only drops
            # the promise to raise FP exceptions where the source would). -fopenmp: at::parallel_for is
            # inlined from ATen's OpenMP header.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"],
            extra_link_args=["-fopenmp"])],
        cmdclass={"build_ext": BuildExtension},
        script_args=["build_ext", "--inplace", "--build-temp", "build/ops", *sys.argv[1:]],
    )

"""Build deepspike's compiled ops into the running interpreter's site-packages: the extension modules
`deepspike_ops` (the CPU kernels of torch.ops.deepspike.lif, from models/csrc/lif_cpu.cpp) and
`deepspike_jpeg` (decoding a crop's window of a JPEG with libjpeg-turbo, from dataloaders/csrc/jpeg_window.c;
data.window_decode).

    python models/csrc/build.py        # with the project's venv; make test / make demo run it
    python models/csrc/build.py --build-lib DIR   # into DIR instead (put DIR first on PYTHONPATH): arguments
                                                  # go on to build_ext after the defaults, and later ones win

The library is built once by the install (Makefile, cluster/Dockerfile), never JIT-compiled at run time.
It goes into site-packages rather than the source tree because Ray ships a job's working directory
without the files .gitignore lists (a built .so among them): workers and DeepSpeed ranks import `models`
from wherever the code came from and the kernels from the environment they run in. They use only libtorch
(libjpeg for the second) and the stable CPython ABI (abi3), so one build serves every Python version of the
venv's torch.
"""

import os
import sys
import sysconfig

from setuptools import Extension, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    os.chdir(ROOT)
    script_args = ["build_ext", "--build-lib", sysconfig.get_paths()["platlib"], "--build-temp", "build/ops",
                   *sys.argv[1:]]
    setup(
        name="deepspike-ops",
        ext_modules=[CppExtension(
            "deepspike_ops", ["models/csrc/lif_cpu.cpp"], py_limited_api=True,
            # -ffp-contract=off keeps the kernel bit-identical to the PyTorch reference (see the source).
            # -fno-trapping-math lets the compiler vectorise the selects (results are unchanged: it only drops
            # the promise to raise FP exceptions where the source would). -fopenmp: at::parallel_for is
            # inlined from ATen's OpenMP header.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"],
            extra_link_args=["-fopenmp"])],
        cmdclass={"build_ext": BuildExtension}, script_args=script_args)
    # Plain C, outside BuildExtension (which compiles every source as C++ against libtorch).
    setup(name="deepspike-jpeg", script_args=script_args,
          ext_modules=[Extension("deepspike_jpeg", ["dataloaders/csrc/jpeg_window.c"], py_limited_api=True,
                                 libraries=["jpeg"], extra_compile_args=["-O2"])])

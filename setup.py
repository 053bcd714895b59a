"""Optional build of the CUDA extension (app.engine.kestrel_cuda); the package itself is pure Python.

The extension is added only when PyTorch with CUDA and nvcc are importable at build time, i.e. with
`pip install -e . --no-build-isolation` on a CUDA machine. Anywhere else (CI, CPU machines, isolated
builds) nothing is compiled, and a failed compile only prints a warning: the engine then runs on
the pure-PyTorch path (or compiles just in time with KESTREL_JIT=1).
"""

from __future__ import annotations

import os
import sys
from glob import glob

from setuptools import setup


def cuda_extension() -> dict:
    if os.environ.get("KESTREL_NO_CUDA_EXT") == "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # noqa: BLE001 - no torch in the build environment: build nothing
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    sources = sorted(glob("app/engine/csrc/*.cu") + glob("app/engine/csrc/*.cpp"))
    if not sources:
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A compile error leaves the package installable without the extension."""

        def build_extension(self, ext):  # type: ignore[no-untyped-def]
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                print(f"warning: the Kestrel CUDA extension was not built ({e}); "
                      "the pure-PyTorch path will be used", file=sys.stderr)

    ext = CUDAExtension(
        "app.engine.kestrel_cuda", sources,
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                                     "-diag-suppress=3306"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extension())

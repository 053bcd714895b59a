"""Finding or building the CUDA extension (app/engine/csrc) and saying why it is unavailable.

Order: a prebuilt module (`app.engine.kestrel_cuda`, made by setup.py during `pip install` when torch
has CUDA and nvcc is present), else a JIT build with torch.utils.cpp_extension.load, but only when
KESTREL_JIT=1, so that ordinary CPU runs and tests never start a compiler.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

EXT_NAME = "kestrel_cuda"
CSRC = Path(__file__).resolve().parent / "csrc"
# No --use_fast_math: the dequantization must round exactly like the reference. No -std: torch
# picks the C++ standard its headers need.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-diag-suppress=3306"]
CXX_FLAGS = ["-O3"]


def sources() -> list[str]:
    """Every .cu/.cpp file of the extension, in a stable order."""
    return sorted(str(p) for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))


def build_dir() -> str:
    path = os.environ.get("KESTREL_BUILD_DIR") or os.path.join(tempfile.gettempdir(), "kestrel-cuda-build")
    os.makedirs(path, exist_ok=True)
    return path


def jit_build(verbose: bool = False) -> ModuleType:
    """Compile (or reuse a cached build of) the extension with ninja; raises on failure."""
    from torch.utils.cpp_extension import load

    return load(name=EXT_NAME, sources=sources(), extra_cuda_cflags=NVCC_FLAGS, extra_cflags=CXX_FLAGS,
                build_directory=build_dir(), verbose=verbose)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    for line in text:
        if "error" in line.lower():
            return line.strip()[:300]
    return (text[-1].strip() if text else type(err).__name__)[:300]


_STATE: tuple[ModuleType | None, str] | None = None


def load_extension() -> tuple[ModuleType | None, str]:
    """(module or None, one sentence on why not). Cached: the build is attempted once per process."""
    global _STATE
    if _STATE is None:
        _STATE = _locate()
    return _STATE


def _locate() -> tuple[ModuleType | None, str]:
    import torch

    if torch.version.cuda is None:
        return None, f"this PyTorch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return None, "no NVIDIA GPU is usable by PyTorch here"
    try:
        return importlib.import_module(f"app.engine.{EXT_NAME}"), "prebuilt extension"
    except ImportError:
        pass
    if os.environ.get("KESTREL_JIT") != "1":
        return None, ("the extension is not built; reinstall with `pip install -e .` on a machine with nvcc, "
                      "or set KESTREL_JIT=1 to compile it on first use")
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, "no nvcc (CUDA toolkit) was found to compile the extension; install it or set CUDA_HOME"
    try:
        return jit_build(verbose=os.environ.get("KESTREL_JIT_VERBOSE") == "1"), "built just in time"
    except Exception as e:  # noqa: BLE001 - any compiler/linker failure becomes the reason string
        return None, f"the extension build failed: {_first_line(e)}"

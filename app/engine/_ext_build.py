"""Finding or building the CUDA extension (app/engine/csrc) and saying why it is unavailable.

Order: a prebuilt module (`app.engine.kestrel_cuda`, made by setup.py during `pip install` when torch
has CUDA and nvcc is present), else a JIT build with torch.utils.cpp_extension.load, but only when
KESTREL_JIT=1, so that ordinary CPU runs and tests never start a compiler.

The top of this module imports only the standard library: setup.py loads it by file path (inside pip's
isolated build, where neither torch nor the `app` package may be importable) for the same flags, arch
list and CUDA-toolkit lookup the runtime and tests/test_cuda_build.py use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

EXT_NAME = "kestrel_cuda"
CSRC = Path(__file__).resolve().parent / "csrc"
# No --use_fast_math: the dequantization must round exactly like the reference. No -std: torch
# picks the C++ standard its headers need.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-diag-suppress=3306"]
CXX_FLAGS = ["-O3"]
# Ampere (A100, RTX 30), Ada (RTX 40, L4), Hopper; PTX of sm_90 lets newer GPUs JIT the kernels.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
# Written by setup.py next to the module when it did not build the extension for a CUDA torch (no
# nvcc, CUDA major version mismatch, compile error): the runtime quotes it instead of guessing.
STATUS_FILE = Path(__file__).resolve().parent / f"{EXT_NAME}.build-status.txt"
# What csrc/bindings.cpp defines (tests/test_doctor.py keeps the two equal). A module built from older
# sources lacks some; it is then not used (the engine would fail at the first call of a missing one).
FUNCTIONS = ("exl2_gemv", "exl2_dequant", "set_gemv_blocks_per_sm", "rms_norm", "silu_mul", "rope",
             "attention_decode", "attention_decode_cached", "rope_cache_decode")
# Entry points the engine uses only when present (the backend checks with hasattr), so a build that
# predates them is still current enough: the half2 gemv (opt-in, csrc/exl2_gemv_half2.cu), the
# quantized-cache decode step (csrc/kv_quant.cu; without it a quantized cache decodes eagerly) and the
# one-launch gemv of q/k/v and gate/up (without it, one launch per matrix).
OPTIONAL_FUNCTIONS = ("exl2_gemv_half2", "kv_quant_decode", "exl2_gemv_many")


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder (bin/nvcc and include/cuda_runtime_api.h), or None.

    CUDA_HOME / CUDA_PATH first, then the folder above `nvcc` on PATH, then /usr/local/cuda. torch's
    own guess takes the folder above `nvcc` even when that nvcc is a wrapper script (e.g. /usr/local/bin),
    which then lacks the headers and libraries; so a candidate must hold the headers too.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")) and \
                shutil.which("nvcc", path=os.path.join(home, "bin")):
            return home
    return None


def nvcc_release(nvcc: str) -> str | None:
    """'13.0' from `nvcc --version`, or None when it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def built_module_path() -> str | None:
    """Where the compiled extension lies (found without importing it, so without torch), or None."""
    try:
        spec = importlib.util.find_spec(f"app.engine.{EXT_NAME}")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec and spec.origin else None


def missing_functions(mod: ModuleType) -> list[str]:
    """The FUNCTIONS a loaded extension module lacks (it was built from older sources)."""
    return [name for name in FUNCTIONS if not hasattr(mod, name)]


def _import_error(e: BaseException) -> str:
    """An import failure's first line (e.g. the undefined symbol), at most 300 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def import_state() -> str:
    """One line for `--self-test`: is the compiled extension there, does it import here, and does it
    have every function of its sources. Needs no GPU: importing only links torch's CUDA libraries."""
    path = built_module_path()
    if not path:
        return build_state()
    try:
        import torch  # noqa: F401 - the module links against torch's libraries

        mod = importlib.import_module(f"app.engine.{EXT_NAME}")
    except Exception as e:  # noqa: BLE001 - ImportError, OSError of a missing library: the reason is the line
        return f"present ({path}), does not import: {_import_error(e)}"
    missing = missing_functions(mod)
    if missing:
        return f"present ({path}), imports, but is older than its sources: lacks {', '.join(missing)}"
    return f"present ({path}), imports with all {len(FUNCTIONS)} functions"


def install_note() -> str | None:
    """Why setup.py did not build the extension (its status file), or None."""
    try:
        return STATUS_FILE.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def build_state() -> str:
    """One line for `kestrel doctor`: is the extension compiled, and if not, why."""
    path = built_module_path()
    if path:
        return f"built ({path})"
    note = install_note()
    if note:
        return f"not built: {note}"
    return "not built (pip install builds it where a CUDA build of torch and nvcc are present)"


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
        mod = importlib.import_module(f"app.engine.{EXT_NAME}")
    except ImportError as e:
        load_error = _import_error(e) if built_module_path() else ""
    else:
        missing = missing_functions(mod)
        if not missing:
            return mod, "prebuilt extension"
        load_error = f"it was built from older sources: lacks {', '.join(missing)}"
    if os.environ.get("KESTREL_JIT") != "1":
        if load_error:     # e.g. built against another torch: undefined symbols
            return None, (f"the built extension does not load ({load_error}); "
                          "reinstall Kestrel with `pip install -e .` to rebuild it")
        note = install_note()
        return None, ((f"the extension was not built at install: {note}" if note else
                       "the extension is not built") +
                      "; reinstall with `pip install -e .` on a machine with nvcc, "
                      "or set KESTREL_JIT=1 to compile it on first use")
    home = find_cuda_home()
    if home is None:
        return None, "no nvcc (CUDA toolkit) was found to compile the extension; install it or set CUDA_HOME"
    os.environ.setdefault("CUDA_HOME", home)    # before torch.utils.cpp_extension guesses its own
    try:
        return jit_build(verbose=os.environ.get("KESTREL_JIT_VERBOSE") == "1"), "built just in time"
    except Exception as e:  # noqa: BLE001 - any compiler/linker failure becomes the reason string
        return None, f"the extension build failed: {_first_line(e)}"

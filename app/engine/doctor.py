"""What this machine can run: GPU, driver, CUDA, torch, our extension, flash-attn."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform

from . import _ext_build


def report() -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("python", platform.python_version()), ("platform", platform.platform())]
    try:
        import torch
    except ImportError:
        return rows + [("torch", "not installed (pip install torch)")]
    rows.append(("torch", torch.__version__))
    rows.append(("torch CUDA build", torch.version.cuda or "none (CPU-only build of torch)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}"))
    else:
        nvml_gpus = _nvml_gpus()     # a GPU torch cannot use (CPU torch, old driver) is still named
        rows.append(("GPU", f"none usable by torch (NVML sees: {', '.join(nvml_gpus)})" if nvml_gpus
                     else "none usable by torch"))
    rows.append(("NVIDIA driver", _driver()))
    rows.append(("CUDA toolkit", _toolkit()))
    rows.append(("kernels compiled", _ext_build.build_state()))
    try:
        from .cuda_backend import extension_status
        ok, why = extension_status()
        rows.append(("Kestrel kernels", "built and loaded" if ok else f"not available: {why}"))
    except ImportError:
        rows.append(("Kestrel kernels", "not available: this build has no CUDA backend"))
    rows.append(("flash-attn", _flash_attn()))
    return rows


def _driver() -> str:
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            drv = pynvml.nvmlSystemGetDriverVersion()
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            return f"{drv} (supports CUDA up to {cuda // 1000}.{cuda % 1000 // 10})"
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - no driver is a normal state
        return f"not found ({type(e).__name__})"


def _nvml_gpus() -> list[str]:
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return [str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
                    for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver: nothing to name
        return []


def _toolkit() -> str:
    """nvcc is only needed to build the kernels (pip install); running them needs just the driver."""
    home = _ext_build.find_cuda_home()
    if home is None:
        return "no nvcc found (only needed to build Kestrel's kernels)"
    nvcc = os.path.join(home, "bin", "nvcc")
    return f"nvcc {_ext_build.nvcc_release(nvcc) or '(does not run)'} at {home}"


def _flash_attn() -> str:
    if importlib.util.find_spec("flash_attn") is None:
        return "not installed (optional)"
    try:
        return f"installed ({importlib.metadata.version('flash-attn')})"
    except importlib.metadata.PackageNotFoundError:
        return "installed"

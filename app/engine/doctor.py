"""What this machine can run: GPU, driver, CUDA, torch, our extension, flash-attn."""

from __future__ import annotations

import importlib.util
import platform


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
        rows.append(("GPU", "none usable by torch"))
    rows.append(("NVIDIA driver", _driver()))
    try:
        from .cuda_backend import extension_status
        ok, why = extension_status()
        rows.append(("Kestrel kernels", "built and loaded" if ok else f"not available: {why}"))
    except ImportError:
        rows.append(("Kestrel kernels", "not available: this build has no CUDA backend"))
    fa = importlib.util.find_spec("flash_attn")
    rows.append(("flash-attn", "installed" if fa else "not installed (optional)"))
    return rows


def _driver() -> str:
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            drv = pynvml.nvmlSystemGetDriverVersion()
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            return f"{drv} (CUDA {cuda // 1000}.{cuda % 1000 // 10})"
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - no driver is a normal state
        return f"not found ({type(e).__name__})"

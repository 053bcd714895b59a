"""GPU memory readings through NVML (package nvidia-ml-py), and preset cards for planning without one.

No NVIDIA driver is a normal state (laptops, CI, AMD machines): `read_gpus()` then returns [] and
`unavailable_reason()` says why in plain words. Nothing here raises for a missing GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    driver_version: str
    cuda_version: str      # highest CUDA version the driver supports, e.g. "12.4"


@dataclass(frozen=True)
class GpuPreset:
    """A typical card, for planning on a machine without one (or for someone else's machine)."""

    name: str
    total_bytes: int

    @property
    def free_bytes(self) -> int:
        """What an idle card typically has free: total minus PRESET_RESERVED_BYTES (driver, display)."""
        return max(0, self.total_bytes - PRESET_RESERVED_BYTES)


# Approximate: an idle card driving a desktop shows ~0.3-0.8 GiB used before any app starts.
PRESET_RESERVED_BYTES = GIB // 2

GPU_PRESETS: tuple[GpuPreset, ...] = (
    GpuPreset("4 GB (RTX 3050 Laptop, RTX A500)", 4 * GIB),
    GpuPreset("8 GB (RTX 4060, RTX 3070)", 8 * GIB),
    GpuPreset("12 GB (RTX 3060, RTX 4070)", 12 * GIB),
    GpuPreset("16 GB (RTX 4060 Ti 16 GB, RTX 4080)", 16 * GIB),
    GpuPreset("24 GB (RTX 3090, RTX 4090)", 24 * GIB),
    GpuPreset("32 GB (RTX 5090)", 32 * GIB),
    GpuPreset("48 GB (RTX A6000, RTX 6000 Ada)", 48 * GIB),
    GpuPreset("80 GB (A100 80 GB, H100)", 80 * GIB),
)

_reason_lock = threading.Lock()
_last_reason: str | None = "GPUs have not been read yet"


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def cuda_version_string(code: int) -> str:
    """NVML's CUDA driver version integer (e.g. 12040) as "12.4"."""
    return f"{code // 1000}.{(code % 1000) // 10}"


def _set_reason(reason: str | None) -> None:
    global _last_reason
    with _reason_lock:
        _last_reason = reason


def unavailable_reason() -> str | None:
    """Why the last `read_gpus()` returned no GPUs (None when it found some)."""
    with _reason_lock:
        return _last_reason


def read_gpus() -> list[GpuReading]:
    """Read every NVIDIA GPU's memory now; [] when there is no driver/NVML (see `unavailable_reason`)."""
    try:
        import pynvml
    except ImportError:
        _set_reason("the nvidia-ml-py package is not installed, so GPUs cannot be read")
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        _set_reason("no NVIDIA driver found (the NVML library is missing); planning uses preset cards")
        return []
    except pynvml.NVMLError_DriverNotLoaded:
        _set_reason("the NVIDIA driver is installed but not loaded; reboot or reinstall the driver")
        return []
    except (pynvml.NVMLError, OSError) as e:
        _set_reason(f"the NVIDIA driver could not be queried ({e})")
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            cuda = cuda_version_string(int(pynvml.nvmlSystemGetCudaDriverVersion()))
        except pynvml.NVMLError:
            cuda = "unknown"
        gpus = []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuReading(index, _text(pynvml.nvmlDeviceGetName(handle)), int(mem.total),
                                   int(mem.used), int(mem.free), driver, cuda))
    except pynvml.NVMLError as e:
        _set_reason(f"the NVIDIA driver could not report GPU memory ({e})")
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    _set_reason(None if gpus else "the NVIDIA driver reports no GPUs")
    return gpus

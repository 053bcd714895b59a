"""VRAM planner (no Qt): GPU readings, the memory estimate, its inverses and fit verdicts.

Imports only app.engine.config / app.engine.cache (the latter, and with it torch, on first estimate).
"""

from .errors import PlannerError
from .estimate import (
    DEFAULT_OVERHEADS,
    Estimate,
    ModelSpec,
    Overheads,
    best_branch,
    cache_modes,
    estimate,
    max_context,
    spec_from_config_file,
    spec_from_files,
    spec_from_folder,
    spec_from_params,
    with_bpw,
)
from .gpu import GPU_PRESETS, GpuPreset, GpuReading, read_gpus, unavailable_reason
from .verdict import DOES_NOT_FIT, FITS, FITS_WITH_CHANGES, Suggestion, Verdict, format_bytes, verdict
from .weights import ParamCounts, folder_tensor_bytes, param_counts, read_safetensors_header

__all__ = [
    "DEFAULT_OVERHEADS", "DOES_NOT_FIT", "FITS", "FITS_WITH_CHANGES", "GPU_PRESETS", "Estimate", "GpuPreset",
    "GpuReading", "ModelSpec", "Overheads", "ParamCounts", "PlannerError", "Suggestion", "Verdict", "best_branch",
    "cache_modes", "estimate", "folder_tensor_bytes", "format_bytes", "max_context", "param_counts",
    "read_gpus", "read_safetensors_header", "spec_from_config_file", "spec_from_files", "spec_from_folder",
    "spec_from_params", "unavailable_reason", "verdict", "with_bpw",
]

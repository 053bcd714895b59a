"""Kestrel's inference engine (no Qt). Public API: see docs/ARCHITECTURE.md.

Heavy modules (torch) load on first use, so `import app.engine` stays cheap for the GUI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .errors import KestrelError

if TYPE_CHECKING:
    from .loader import load_model
    from .samplers import SAMPLERS
    from .session import Engine
    from .types import Chunk, GenerationSettings, ModelInfo

_LAZY = {
    "load_model": ("loader", "load_model"),
    "Engine": ("session", "Engine"),
    "SAMPLERS": ("samplers", "SAMPLERS"),
    "Chunk": ("types", "Chunk"),
    "GenerationSettings": ("types", "GenerationSettings"),
    "ModelInfo": ("types", "ModelInfo"),
}

__all__ = ["errors", "KestrelError", "load_model", "Engine", "SAMPLERS", "Chunk", "GenerationSettings",
           "ModelInfo"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(name)

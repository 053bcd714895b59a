"""The UI's thin adapter onto the other packages, kept in one place so the rest of app/ui stays
free of torch imports (startup time) and of their internals.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
GIB = 1024 ** 3


def sampler_specs() -> list[Any]:
    """SamplerSpec objects in application order. May import torch (app.engine.samplers does), so the
    window calls it off the GUI thread after it is shown."""
    from app.engine.samplers import SAMPLERS

    return list(SAMPLERS.values())


def vram_text() -> str:
    """Status-bar text for GPU memory, from app.planner's NVML reading."""
    try:
        from app.planner.gpu import read_gpus
    except ImportError:
        return "no NVIDIA GPU"
    try:
        gpus = read_gpus()
    except Exception:  # noqa: BLE001 - a status reading must never break the window
        log.exception("reading GPU memory failed")
        return "VRAM: unknown"
    if not gpus:
        return "no NVIDIA GPU"
    g = gpus[0]
    return f"VRAM {g.used_bytes / GIB:.1f} / {g.total_bytes / GIB:.1f} GiB"


def generation_settings(samplers: dict[str, Any], max_new_tokens: int, seed: int | None = None,
                        context_overflow: str = "stop") -> Any:
    from app.engine.types import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, samplers=dict(samplers), seed=seed,
                              context_overflow=context_overflow)


def dropped_notice(count: int) -> str:
    """What the chat view says when the overflow policy left messages out of a reply's prompt."""
    noun = "message" if count == 1 else "messages"
    return (f"The chat is longer than the model's context: the {count} oldest {noun} were left out of "
            "this reply (the system prompt was kept). Change this under “When the chat is full”.")

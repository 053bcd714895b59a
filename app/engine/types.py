"""Plain data passed between the engine and its callers (CLI, GUI, server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationSettings:
    """One request's knobs. `samplers` maps SAMPLERS names to values; missing ones use defaults."""

    max_new_tokens: int = 512
    samplers: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    context_overflow: str = "stop"  # chats only: "stop" | "drop_oldest" (app/engine/overflow.py)


@dataclass
class Chunk:
    """A piece of streamed output with running counts and timings."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str | None = None  # None while streaming; then "stop" | "length" | "cancelled"
    dropped_messages: tuple[int, ...] = ()  # chats: indices of messages left out to fit the context

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    architecture: str
    parameters: int
    bits_per_weight: float | None  # None for fp16/bf16 folders
    head_bits: int | None
    backend: str
    device: str
    max_seq_len: int
    cache_mode: str = "fp16"

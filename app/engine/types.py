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
    loras: dict[str, float] = field(default_factory=dict)  # loaded LoRA adapter name -> scale
    # constrained output (app/engine/constrained.py): at most one of the three
    json_schema: dict | None = None
    regex: str | None = None
    json_object: bool = False
    logprobs: int | None = None  # None: off; N >= 0: each token's logprob plus the top N alternatives
    # Speculative decoding (app/engine/speculative.py): "draft", "ngram" (prompt lookup, no second
    # model) or "off"; draft_tokens proposed per step. None = the engine's default (Engine.load options).
    speculative: str | None = None
    draft_tokens: int | None = None
    context_overflow: str = "stop"  # chats only: "stop" | "drop_oldest" (app/engine/overflow.py)


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model (before samplers) and the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


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
    logprobs: list[TokenLogprob] | None = None  # only when GenerationSettings.logprobs is set
    draft_proposed: int = 0  # speculative decoding: drafted tokens checked by the model so far
    draft_accepted: int = 0  # ... and how many of them it accepted
    dropped_messages: tuple[int, ...] = ()  # chats: indices of messages left out to fit the context

    @property
    def draft_acceptance(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

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
    draft_model: str | None = None  # folder of the attached speculative draft model
    cache_mode: str = "fp16"

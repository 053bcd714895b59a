"""Plain records the store hands out. Frozen, so a GUI thread can keep them without locking."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Timings:
    """Measurements of one generated reply; every field is optional (imported chats may lack them)."""

    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    tokens_per_second: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Timings:
        data = data or {}
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    created: float            # unix seconds
    updated: float            # unix seconds; list order (most recent first)
    system_prompt: str = ""
    model_path: str | None = None   # a local model folder, or the model's id on `endpoint_id`
    sampler_settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    endpoint_id: int | None = None  # the remote endpoint the chat used (None: a local model)


@dataclass(frozen=True)
class Endpoint:
    """A remote OpenAI-compatible server. Its API key is in the OS keyring (app.remote.keys), not here."""

    id: int
    name: str
    base_url: str
    created: float


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    position: int             # 1, 2, 3 ... in conversation order; gaps are allowed after deletes
    parent_id: int | None     # the message this one answers / follows (None for the first)
    role: str
    content: str
    created: float
    model: str | None = None
    sampler_settings: dict[str, Any] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    finish_reason: str | None = None
    streaming: bool = False   # True while a reply is being written, or if the writer died mid-reply


@dataclass(frozen=True)
class SearchHit:
    conversation: Conversation
    message_id: int | None    # the best matching message, None when only the title matched
    snippet: str              # a short plain-text excerpt around the match ("" for title matches)

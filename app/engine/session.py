"""Engine: a loaded model with its tokenizer, chat template and generator — the public face of the
engine for the CLI, the GUI and the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Iterator

import torch

from .chat_template import ChatTemplate
from .generator import Generator
from .loader import Progress, load_model
from .model import Transformer
from .overflow import fit_messages
from .tokenizer import Tokenizer
from .types import Chunk, GenerationSettings, ModelInfo


def check_rope_overrides(scale: float | None, alpha: float | None) -> None:
    from .errors import GenerationError

    for name, value in (("rope scale", scale), ("rope alpha", alpha)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1024):
            raise GenerationError(f"{name} must be a positive number up to 1024, not {value!r}",
                                  hint="Leave it empty to use what the model's config.json asks for.")


def _tag_dropped(stream: Iterator[Chunk], dropped: tuple[int, ...]) -> Iterator[Chunk]:
    with contextlib.closing(stream):  # type: ignore[type-var]
        for chunk in stream:
            yield dataclasses.replace(chunk, dropped_messages=dropped)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, template: ChatTemplate,
                 generator: Generator) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.generator = generator

    @classmethod
    def load(cls, path: str, device: str | None = "auto", *, max_seq_len: int | None = None,
             cache_mode: str = "fp16", backend: str | None = None, progress: Progress | None = None,
             rope_scale: float | None = None, rope_alpha: float | None = None,
             cache_slots: int | None = None) -> Engine:
        """rope_scale / rope_alpha: user overrides on top of config.json's RoPE (see rope.py);
        cache_slots: conversations whose KV caches stay resident (see Generator)."""
        check_rope_overrides(rope_scale, rope_alpha)
        tokenizer = Tokenizer.from_folder(path)
        template = ChatTemplate.from_folder(path, tokenizer)
        model = load_model(path, device, backend=backend, progress=progress)
        if rope_scale or rope_alpha:
            model.set_rope_overrides(rope_scale, rope_alpha)
        generator = Generator(model, tokenizer, max_seq_len, cache_mode)
        if cache_slots is not None:
            generator.set_cache_slots(cache_slots)
        return cls(model, tokenizer, template, generator)

    @property
    def info(self) -> ModelInfo:
        c = self.model.config
        q = c.quant
        return ModelInfo(
            name=os.path.basename(os.path.normpath(self.model.path)),
            path=self.model.path,
            architecture=c.architecture,
            parameters=self.model.parameter_count(),
            bits_per_weight=q.bits if q else None,
            head_bits=q.head_bits if q else None,
            backend=self.model.backend.name,
            device=str(self.model.device),
            max_seq_len=self.generator.max_seq_len,
            cache_mode=self.generator.cache_mode,
        )

    # --- chat ----------------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, special=True)

    def count_chat_tokens(self, messages: list[dict]) -> int:
        return len(self.chat_prompt_ids(messages))

    def _with_template_stops(self, settings: GenerationSettings) -> GenerationSettings:
        extra = [s for s in self.template.stop_strings() if s not in settings.stop_strings]
        if not extra:
            return settings
        return dataclasses.replace(settings, samplers=dict(settings.samplers),
                                   stop_strings=list(settings.stop_strings) + extra)

    def fit_chat(self, messages: list[dict], max_new_tokens: int, overflow: str = "stop") -> tuple[list[dict], list[int]]:
        """(messages that fit the context, indices left out) under the overflow policy (overflow.py)."""
        return fit_messages(messages, self.count_chat_tokens, self.generator.max_seq_len, max_new_tokens,
                            overflow)

    def stream_chat(self, messages: list[dict], settings: GenerationSettings | None = None,
                    overflow: str | None = None) -> Iterator[Chunk]:
        """Stream a reply. overflow ("stop" | "drop_oldest"; default settings.context_overflow) decides
        what happens when the chat exceeds the context; every chunk's dropped_messages lists the
        indices of `messages` that were left out (empty when all fit)."""
        settings = self._with_template_stops(settings or GenerationSettings())
        kept, dropped = self.fit_chat(messages, settings.max_new_tokens, overflow or settings.context_overflow)
        stream = self.generator.stream(self.chat_prompt_ids(kept), settings)
        if not dropped:
            return stream
        return _tag_dropped(stream, tuple(dropped))

    def stream_text(self, prompt: str, settings: GenerationSettings | None = None) -> Iterator[Chunk]:
        ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos_token, special=True)
        return self.generator.stream(ids, settings or GenerationSettings())

    def cancel(self) -> None:
        self.generator.cancel()

    def unload(self) -> None:
        """Drop every reference to weights and cache so memory returns to the system."""
        self.generator.cancel()
        self.generator.release_caches()
        self.model = None  # type: ignore[assignment]
        self.generator.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

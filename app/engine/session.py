"""Engine: a loaded model with its tokenizer, chat template and generator — the public face of the
engine for the CLI, the GUI and the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Callable, Iterator

import torch

from .batching import BatchJob, Scheduler
from .chat_template import ChatTemplate
from .errors import GenerationError
from .generator import Generator
from .loader import Progress, load_model
from .lora import LoraInfo
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
        self.pool_tokens: int | None = None  # paged cache size for many requests (None: 4 contexts)
        self._scheduler: Scheduler | None = None

    @classmethod
    def load(cls, path: str, device: str | None = "auto", *, max_seq_len: int | None = None,
             cache_mode: str = "fp16", backend: str | None = None, progress: Progress | None = None,
             draft: str | None = None, speculative: str | None = None,
             draft_tokens: int | None = None, rope_scale: float | None = None, rope_alpha: float | None = None,
             cache_slots: int | None = None) -> Engine:
        """rope_scale / rope_alpha: user overrides on top of config.json's RoPE (see rope.py);
        cache_slots: conversations whose KV caches stay resident (see Generator)."""
        if speculative == "draft" and not draft:
            raise GenerationError("speculative decoding with a draft model needs a draft model folder",
                                  hint="Give one with --draft DIR, or use --speculative ngram.")
        check_rope_overrides(rope_scale, rope_alpha)
        tokenizer = Tokenizer.from_folder(path)
        template = ChatTemplate.from_folder(path, tokenizer)
        model = load_model(path, device, backend=backend, progress=progress)
        if rope_scale or rope_alpha:
            model.set_rope_overrides(rope_scale, rope_alpha)
        generator = Generator(model, tokenizer, max_seq_len, cache_mode)
        if cache_slots is not None:
            generator.set_cache_slots(cache_slots)
        engine = cls(model, tokenizer, template, generator)
        engine.set_speculative(speculative, draft_tokens)
        if draft:
            engine.set_draft(draft, backend=backend)
        return engine

    def set_speculative(self, mode: str | None, draft_tokens: int | None = None) -> None:
        """Default speculative decoding for requests that do not choose: "draft", "ngram", "off", or
        None (the draft model when one is attached)."""
        from .speculative import DEFAULT_DRAFT_TOKENS, check

        check(mode, draft_tokens)
        self.generator.speculation.mode = mode
        self.generator.speculation.draft_tokens = int(draft_tokens or DEFAULT_DRAFT_TOKENS)

    def set_draft(self, path: str | None, *, backend: str | None = None, progress: Progress | None = None) -> None:
        """Attach a draft model for speculative decoding (None detaches it). It must share the
        tokenizer; requests then use it unless their settings say speculative="ngram" or "off"."""
        from .speculative import load_draft

        self.generator.speculation.draft = None
        gc.collect()
        if path:
            self.generator.speculation.draft = load_draft(path, self.generator, backend=backend,
                                                          progress=progress)

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
            draft_model=d.path if (d := self.generator.speculation.draft) is not None else None,
            cache_mode=self.generator.cache_mode,
        )

    # --- chat ----------------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True, tools=tools)
        return self.tokenizer.encode(text, special=True)

    def count_chat_tokens(self, messages: list[dict]) -> int:
        return len(self.chat_prompt_ids(messages))

    def _with_template_stops(self, settings: GenerationSettings) -> GenerationSettings:
        extra = [s for s in self.template.stop_strings() if s not in settings.stop_strings]
        if not extra:
            return settings
        return dataclasses.replace(settings, samplers=dict(settings.samplers),
                                   stop_strings=list(settings.stop_strings) + extra)

    def fit_chat(self, messages: list[dict], max_new_tokens: int, overflow: str = "stop",
                 tools: list[dict] | None = None) -> tuple[list[dict], list[int]]:
        """(messages that fit the context, indices left out) under the overflow policy (overflow.py)."""
        return fit_messages(messages, lambda m: len(self.chat_prompt_ids(m, tools)), self.generator.max_seq_len,
                            max_new_tokens, overflow)

    def stream_chat(self, messages: list[dict], settings: GenerationSettings | None = None,
                    overflow: str | None = None, tools: list[dict] | None = None) -> Iterator[Chunk]:
        """Stream a reply. overflow ("stop" | "drop_oldest"; default settings.context_overflow) decides
        what happens when the chat exceeds the context; every chunk's dropped_messages lists the
        indices of `messages` that were left out (empty when all fit)."""
        settings = self._with_template_stops(settings or GenerationSettings())
        kept, dropped = self.fit_chat(messages, settings.max_new_tokens, overflow or settings.context_overflow,
                                      tools)
        stream = self.generator.stream(self.chat_prompt_ids(kept, tools), settings)
        if not dropped:
            return stream
        return _tag_dropped(stream, tuple(dropped))

    def stream_text(self, prompt: str, settings: GenerationSettings | None = None) -> Iterator[Chunk]:
        ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos_token, special=True)
        return self.generator.stream(ids, settings or GenerationSettings())

    def cancel(self) -> None:
        self.generator.cancel()

    # --- LoRA adapters (applied per request: GenerationSettings.loras = {name: scale}) ----------

    def load_lora(self, path: str, name: str | None = None) -> LoraInfo:
        """Load a PEFT adapter folder beside the model (name: the folder's name unless given)."""
        return self.generator.loras.load(path, name)

    def unload_lora(self, name: str) -> bool:
        return self.generator.loras.unload(name)

    def loras(self) -> list[LoraInfo]:
        return self.generator.loras.infos()

    # --- many requests at once (the server) ----------------------------------------------------

    @property
    def scheduler(self) -> Scheduler:
        """The continuous-batching scheduler, made on first use (its paged cache is allocated then)."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self.model, self.tokenizer, self.generator.max_seq_len,
                                        pool_tokens=self.pool_tokens)
        return self._scheduler

    def submit_chat(self, messages: list[dict], settings: GenerationSettings | None = None,
                    emit: Callable[[object], None] | None = None) -> BatchJob:
        settings = self._with_template_stops(settings or GenerationSettings())
        return self.scheduler.submit(self.chat_prompt_ids(messages), settings, emit)

    def stop_serving(self) -> None:
        """Cancel the scheduler's requests, end its thread and free its pool (a later submit makes a
        new one)."""
        if self._scheduler is not None:
            self._scheduler.close(cancel=True)
            self._scheduler = None

    def submit_text(self, prompt: str | list[int], settings: GenerationSettings | None = None,
                    emit: Callable[[object], None] | None = None) -> BatchJob:
        """A raw completion: text (encoded as stream_text does) or token ids."""
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos_token, special=True)
        return self.scheduler.submit(prompt, settings, emit)

    def unload(self) -> None:
        """Drop every reference to weights and cache so memory returns to the system."""
        self.generator.cancel()
        if self._scheduler is not None:
            self._scheduler.close()  # running requests finish first
            self._scheduler = None
        self.generator.loras.clear()
        self.generator.release_caches()
        self.generator.speculation.draft = None
        self.model = None  # type: ignore[assignment]
        self.generator.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

"""The one generator: prefill + incremental decode over a KV cache, streamed as text chunks.

Used alike by the CLI, the GUI and the server. Prompt caching: the cache remembers which token ids
it holds, and a new request reuses the longest common prefix, so turn N+1 of a chat only prefills
the new tokens. Long prompts are prefilled in chunks; cancel() is honoured between chunks and
between decode steps.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator

import torch

from . import speculative
from .cache import KVCache
from .cache_slots import DEFAULT_CACHE_SLOTS, CacheSlot, choose_slot, common_prefix, slot_fits
from .constrained import Constraint
from .errors import GenerationError, OutOfMemoryError
from .graphs import DecodeGraph, graphs_enabled
from .logprobs import token_logprob
from .lora import LoraRegistry
from .model import Transformer
from .samplers import BannedStringGuard, SamplerContext, SamplerState, sample, validate_settings
from .tokenizer import StopStringMatcher, Tokenizer
from .types import Chunk, GenerationSettings, TokenLogprob

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 2048
MAX_BANNED_STRING_ROLLBACKS = 512  # per request; past this the banned strings cannot be avoided


def sampler_state(tokenizer: Tokenizer, samplers: dict) -> SamplerState:
    """Per-request sampler state; DRY's breakers and XTC's protected ids come from the tokenizer."""
    return SamplerState.create(samplers, lambda text: tokenizer.encode(text, special=False),
                               tokenizer.eos_ids)


def keep_held_logits(saved: dict[int, torch.Tensor], held_from: int | None) -> None:
    """Banned strings: only positions whose text is still held can be rolled back to."""
    for index in [k for k in saved if held_from is None or k < held_from]:
        del saved[index]


class ReplyText:
    """The text side of one reply, shared by the Generator and the batching scheduler: streaming
    detokenization, banned strings (text held back; on a match, roll back and ban the token that
    began it) and stop strings. Callers own the tokens, the cache and the sampling."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: list[str] | tuple[str, ...],
                 banned_strings: list[str] | tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopStringMatcher(list(stop_strings))
        self.guard = BannedStringGuard(banned_strings)
        self.saved: dict[int, torch.Tensor] = {}  # logits by completion index, while the guard holds text
        self.bans: dict[int, set[int]] = {}  # completion index -> ids banned there by rollbacks
        self.rollbacks = 0

    def before_sampling(self, index: int, logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
        """Ban what rollbacks banned at this index; keep the logits while text is held back. Returns
        the logits to sample from: cut to the tokenizer's vocabulary, as a model's head may be padded
        past it and those ids cannot be detokenized."""
        logits = logits[..., :self._tokenizer.vocab_size]
        state.banned_now = frozenset(self.bans.get(index, ()))
        if self.guard.banned:
            self.saved[index] = logits
        return logits

    def feed(self, token: int, index: int) -> tuple[str, bool, int | None]:
        """(text to stream, whether a stop string ended it, completion index to roll back to or None)."""
        text, back = self.guard.feed(self.decoder.feed(token), index)
        if back is not None:
            self.rollbacks += 1
            if self.rollbacks > MAX_BANNED_STRING_ROLLBACKS:
                raise GenerationError(f"the reply kept running into banned strings ({self.rollbacks} rollbacks)",
                                      hint="Remove some banned strings or loosen the filters.")
            return "", False, back
        keep_held_logits(self.saved, self.guard.held_from)
        text, stopped = self.stops.feed(text)
        return text, stopped, None

    def rewind(self, generated: list[int], back: int) -> torch.Tensor:
        """Drop the tokens from completion index `back` on (in place), ban the one that began the banned
        string there, replay the decoder; returns the logits to sample at `back` again."""
        self.bans.setdefault(back, set()).add(generated[back])
        for later in [k for k in self.bans if k > back]:
            del self.bans[later]
        del generated[back:]
        self.decoder = self._tokenizer.stream_decoder()
        for token in generated:
            self.decoder.feed(token)
        return self.saved[back]

    def finish(self) -> tuple[str, bool]:
        """(the text still held back, whether the reply ended on a stop string)."""
        tail, stopped = self.stops.feed(self.guard.flush() + self.decoder.flush())
        if not stopped:
            tail += self.stops.flush()
        return tail, stopped


def check_request(prompt_ids: list[int], settings: GenerationSettings, max_seq_len: int) -> tuple[dict, int]:
    """(validated samplers, tokens that may be generated): what every request is checked for before
    any work, by the Generator and the batching scheduler alike."""
    samplers = validate_settings(settings.samplers)
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    budget = max_seq_len - len(prompt_ids)
    if budget <= 0:
        raise GenerationError(
            f"the prompt has {len(prompt_ids)} tokens, the context holds {max_seq_len}",
            hint="Shorten the conversation or load the model with a longer context.")
    return samplers, max(0, min(settings.max_new_tokens, budget))


class Generator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int | None = None,
                 cache_mode: str = "fp16", prefill_chunk: int = DEFAULT_CHUNK) -> None:
        self.model = model
        self.tokenizer = tokenizer
        default = 4096 if model.device.type == "cpu" else 8192
        self.max_seq_len = int(max_seq_len or min(model.config.max_position_embeddings, default))
        self.cache_mode = cache_mode
        self.prefill_chunk = prefill_chunk
        self._cache: KVCache | None = None  # the active slot's cache and ids (see cache_slots.py)
        self._cached_ids: list[int] = []
        self.cache_slots = DEFAULT_CACHE_SLOTS
        self._slots: list[CacheSlot] = []
        self._active: CacheSlot | None = None
        self._requests = 0
        self.last_prefill_tokens = 0  # tokens the last request computed (the rest came from the cache)
        self.on_prefill_chunk: Callable[[int, int], None] | None = None  # (tokens done, total) per chunk
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._graphs: dict[int, DecodeGraph] = {}  # by rows: 1 for decoding, k + 1 to check k drafts
        self._graph_key: tuple = ()  # what the graphs were captured on (see _graph_for)
        self._graph_failed = False
        self.loras = LoraRegistry(model)
        self._lora_key: tuple = ()  # the adapter set the cached prefix was computed under
        self.speculation = speculative.Options()  # draft model and default mode for speculative decoding

    # --- control -------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the running generation to stop; safe from any thread."""
        self._cancel.set()

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            try:
                self._cache = self.model.allocate_cache(self.max_seq_len, mode=self.cache_mode)
            except torch.cuda.OutOfMemoryError as e:
                raise OutOfMemoryError(
                    f"the KV cache for {self.max_seq_len} tokens does not fit in GPU memory",
                    hint="Load the model with a smaller context or a quantized (Q4) cache.") from e
        return self._cache

    def _use_loras(self, selection: dict[str, float]) -> None:
        """Apply a request's adapters; KV computed under another adapter set is not reused."""
        key = self.loras.activate(selection)
        if key != self._lora_key:
            self._cached_ids = []
            self._lora_key = key

    def reset_cache(self) -> None:
        """Forget every cached prefix (all slots); memory stays allocated."""
        self._cached_ids = []
        if self._cache is not None:
            self._cache.reset()
        for slot in self._slots:
            slot.ids = []
            if slot.cache is not None:
                slot.cache.reset()

    def set_cache_slots(self, n: int) -> None:
        """Keep up to n conversations' caches resident (n >= 1); extra slots are freed."""
        if int(n) < 1:
            raise GenerationError(f"cache slots must be at least 1, not {n}")
        self.cache_slots = int(n)
        self._sync_active()
        self._slots.sort(key=lambda s: -s.used)
        del self._slots[self.cache_slots:]
        if self._active is not None and self._active not in self._slots:
            self._active, self._cache, self._cached_ids = None, None, []

    def release_caches(self) -> None:
        """Drop every slot's memory (unload)."""
        self._slots, self._active, self._cache, self._cached_ids = [], None, None, []

    def _sync_active(self) -> None:
        if self._active is not None:
            self._active.cache, self._active.ids = self._cache, self._cached_ids

    def _select_slot(self, ids: list[int]) -> None:
        """Make the slot best suited to `ids` the active one (cache_slots.choose_slot)."""
        self._sync_active()
        if self._active is None and self._cache is not None and not self._slots:
            self._slots.append(CacheSlot(self._cache, self._cached_ids))  # a cache made before any request
        index, _ = choose_slot(self._slots, ids, self.cache_slots)
        if index is None and self._slots:
            try:
                if not slot_fits(self.model, self.max_seq_len, self.cache_mode):
                    raise torch.cuda.OutOfMemoryError("no room for another cache slot")
                self._slots.append(CacheSlot(self.model.allocate_cache(self.max_seq_len, mode=self.cache_mode)))
                index = len(self._slots) - 1
            except torch.cuda.OutOfMemoryError:  # no room for another conversation now: reuse the oldest
                index, _ = choose_slot(self._slots, ids, len(self._slots))
        if index is None:
            self._slots.append(CacheSlot())
            index = len(self._slots) - 1
        slot = self._slots[index]
        self._requests += 1
        slot.used = self._requests
        self._active, self._cache, self._cached_ids = slot, slot.cache, slot.ids

    # --- core ----------------------------------------------------------------------------------

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Bring the cache to hold `ids`, reusing the cached prefix; return last-position logits."""
        self._select_slot(ids)
        cache = self.cache
        keep = common_prefix(self._cached_ids, ids)
        if keep == len(ids):
            keep -= 1  # recompute the last token to get its logits
        cache.truncate(keep)
        self._cached_ids = self._cached_ids[:keep]
        self.last_prefill_tokens = 0
        logits = None
        pos = keep
        while pos < len(ids):
            if self._cancel.is_set():
                return None  # type: ignore[return-value]
            # The last prompt token always goes through the decode step, alone: its logits and K/V are
            # then the same whether the prompt was prefilled now or found cached (a regenerate
            # recomputes only that token), so one seed gives one reply. A batched prefill rounds
            # differently from the one-token step, which parted greedy replies at near-ties.
            end = len(ids) if pos == len(ids) - 1 else min(pos + self.prefill_chunk, len(ids) - 1)
            if end - pos == 1:  # one token (the last, a draft catching up, a regenerate): the decode step, graphed
                logits = self._decode_one(ids[pos], pos)
            else:
                logits = self.model.forward(torch.tensor([ids[pos:end]], device=self.model.device), cache, pos,
                                            last_only=True)[0, -1]
            self._cached_ids.extend(ids[pos:end])
            self.last_prefill_tokens += end - pos
            pos = end
            if self.on_prefill_chunk is not None:
                self.on_prefill_chunk(pos, len(ids))
        assert logits is not None
        return logits

    def stream(self, prompt_ids: list[int], settings: GenerationSettings | None = None) -> Iterator[Chunk]:
        """Generate from token ids, yielding text chunks; the last chunk carries finish_reason."""
        settings = settings or GenerationSettings()
        samplers, max_new = check_request(prompt_ids, settings, self.max_seq_len)
        constraint = Constraint.from_settings(self.tokenizer, settings)  # bad schema: error before any work
        with self._lock:
            self._cancel.clear()
            self._use_loras(settings.loras)
            try:
                yield from self._run(list(prompt_ids), settings, samplers, max_new, constraint)
            finally:
                if constraint is not None:
                    constraint.close()

    def _run(self, ids: list[int], settings: GenerationSettings, samplers: dict, max_new: int,
             constraint: Constraint | None = None) -> Iterator[Chunk]:
        gen = None
        if settings.seed is not None:
            # drawn where the logits are, so sampling never copies a vocab-sized row to the host
            gen = torch.Generator(device=self.model.device).manual_seed(int(settings.seed))
        reply = ReplyText(self.tokenizer, settings.stop_strings, samplers["banned_strings"])
        eos = self.tokenizer.eos_ids if settings.stop_on_eos else frozenset()
        n_prompt = len(ids)
        t0 = time.perf_counter()
        try:
            logits = self._prefill(ids)
        except torch.cuda.OutOfMemoryError as e:
            raise OutOfMemoryError("the GPU ran out of memory while reading the prompt",
                                   hint="Use a smaller context, a lower-bpw model or a Q4 cache.") from e
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        generated: list[int] = []
        history = torch.tensor(ids, dtype=torch.int64)
        reason = None
        state = sampler_state(self.tokenizer, samplers)
        logprobs: list[tuple[int, TokenLogprob]] = []  # (completion index, TokenLogprob) not yet in a chunk
        # speculation proposes tokens the grammar has not seen: constrained requests decode plainly
        spec = speculative.start(self, settings, samplers, n_prompt, state) if constraint is None else None

        def chunk(text: str, new: list[int], finish: str | None) -> Chunk:
            lps = None
            if settings.logprobs is not None:
                lps = [entry for _, entry in logprobs]
                logprobs.clear()
            return Chunk(text, new, n_prompt, len(generated), t_prefill, time.perf_counter() - t1, finish, lps,
                         **speculative.counts(spec))

        if logits is None:
            yield chunk("", [], "cancelled")
            return
        while True:
            if len(generated) >= max_new:
                reason = "length"
                break
            if self._cancel.is_set():
                reason = "cancelled"
                break
            ctx = SamplerContext(history=history, generated_start=n_prompt, settings=samplers,
                                 eos_ids=self.tokenizer.eos_ids, state=state)
            index = len(generated)
            logits = reply.before_sampling(index, logits, state)
            if spec:
                token = spec.pick(logits, samplers, ctx, gen)
            elif constraint:
                token = constraint.pick(logits, functools.partial(sample, settings=samplers, ctx=ctx, generator=gen))
            else:
                token = sample(logits, samplers, ctx, gen)
            if token in eos:
                reason = "stop"
                break
            if settings.logprobs is not None:
                logprobs.append((index, token_logprob(self.tokenizer, logits, token, settings.logprobs)))
            if constraint is not None:
                constraint.advance(token)
            generated.append(token)
            history = torch.cat([history, torch.tensor([token])])
            text, stopped, back = reply.feed(token, index)
            if back is not None:
                if constraint is not None:
                    constraint.rollback(len(generated) - back)
                logprobs[:] = [(i, e) for i, e in logprobs if i < back]
                logits = self._rewind_completion(n_prompt, generated, back, reply)
                history = torch.tensor(ids[:n_prompt] + generated, dtype=torch.int64)
                if spec:
                    spec.reset()
                continue
            if stopped:
                yield chunk(text, [token], "stop")
                return
            if text:
                yield chunk(text, [token], None)
            if constraint is not None and constraint.is_complete:
                reason = "stop"  # the grammar is complete: nothing but EOS may follow
                break
            if len(generated) >= max_new or self._cancel.is_set():
                continue
            if spec:  # drafted tokens verified in one pass (app/engine/speculative.py)
                logits = spec.advance(history, max_new - len(generated))
                continue
            pos = len(self._cached_ids)
            try:
                logits = self._decode_one(token, pos)
            except torch.cuda.OutOfMemoryError as e:
                raise OutOfMemoryError("the GPU ran out of memory mid-reply",
                                       hint="Use a smaller context, a lower-bpw model or a Q4 cache.") from e
            self._cached_ids.append(token)
        tail, stopped = reply.finish()
        yield chunk(tail, [], "stop" if stopped else reason)

    @property
    def _graph(self) -> DecodeGraph | None:
        """The one-token decode graph, if captured."""
        return self._graphs.get(1)

    def _graph_for(self, rows: int) -> DecodeGraph | None:
        """The decode step over `rows` tokens as a CUDA graph, captured on first use; None where graphs
        cannot run. A graph bakes in the cache tensors, the RoPE tables and the active adapters'
        matrices: any change drops them all."""
        cache = self.cache
        enabled = not self._graph_failed and graphs_enabled(self.model, cache)
        if enabled:
            self.model.prepare_decode(cache.max_seq_len)  # RoPE tables of their final size, before the key
        key = (id(cache), id(self.model._cos), self._lora_key)
        if key != self._graph_key:
            self._graphs = {}
            self._graph_key = key
        g = self._graphs.get(rows)
        if g is None and enabled and (rows == 1 or cache.mode == "fp16"):
            try:
                g = self._graphs[rows] = DecodeGraph(self.model, cache, rows)
            except RuntimeError as e:  # an op that cannot be captured: run eagerly from now on
                self._graph_failed = True
                log.warning("CUDA graph capture failed, decoding without it: %s", str(e).splitlines()[0])
        return g

    def _decode_one(self, token: int, pos: int) -> torch.Tensor:
        """Logits after feeding one token at `pos`: a CUDA-graph replay where possible."""
        return self._decode_many([token], pos)[0]

    def _decode_many(self, ids: list[int], pos: int) -> torch.Tensor:
        """Logits (len(ids), vocab) after feeding ids at pos, pos + 1, ... (one token, or a token and
        the speculative drafts to check): a graph replay per row count where possible, else one
        forward pass."""
        g = self._graph_for(len(ids))
        if g is not None and g.ready(pos):
            return g.step_many(ids, pos)
        return self.model.forward(torch.tensor([ids], device=self.model.device), self.cache, pos)[0]

    def _rewind_completion(self, n_prompt: int, generated: list[int], back: int, reply: ReplyText) -> torch.Tensor:
        """Banned string: roll the reply back to completion index `back` (ReplyText.rewind) and the cache
        with it; returns the logits to sample there again."""
        logits = reply.rewind(generated, back)
        self.cache.truncate(n_prompt + back)
        self._cached_ids = self._cached_ids[:n_prompt + back]
        return logits

    def generate(self, prompt_ids: list[int], settings: GenerationSettings | None = None) -> tuple[str, Chunk]:
        """Run to completion; return the whole text and the final chunk (counts, timings, reason)."""
        parts = []
        last = None
        for c in self.stream(prompt_ids, settings):
            parts.append(c.text)
            last = c
        assert last is not None
        return "".join(parts), last

    # --- scoring -------------------------------------------------------------------------------

    @torch.inference_mode()
    def perplexity(self, rows: list[list[int]], loras: dict[str, float] | None = None) -> float:
        """exp(mean negative log-likelihood) over all predicted tokens, each row scored on its own."""
        total_nll, total_tokens = 0.0, 0
        self._use_loras(loras or {})
        for row in rows:
            cache = self.cache
            cache.reset()
            self._cached_ids = []
            ids = torch.tensor([row], device=self.model.device)
            logits = []
            for pos in range(0, len(row), self.prefill_chunk):
                logits.append(self.model.forward(ids[:, pos: pos + self.prefill_chunk], cache, pos)[0])
            lg = torch.cat(logits)[:-1]
            logp = torch.log_softmax(lg.float(), dim=-1)
            target = ids[0, 1:]
            total_nll -= logp.gather(1, target[:, None]).sum().item()
            total_tokens += len(row) - 1
            cache.reset()
        return float(torch.exp(torch.tensor(total_nll / total_tokens)))

"""Continuous batching: one engine thread runs many requests at once over a paged KV cache.

Why: the Generator serves one sequence; a server with several clients would make each wait for all
earlier ones. Here every step (1) drops cancelled jobs, (2) admits waiting jobs while the pool has
room for their whole budget (prompt + max_new_tokens, so a running job never runs out of pages),
(3) runs ONE forward holding a token for every decoding job plus at most `prefill_chunk` prompt tokens
of jobs still reading their prompt (so a long prompt never stalls the others for more than a chunk),
then (4) samples each row with its own job's settings and state (`sample_for_job`) and streams its
text. Results go to per-job callbacks that never block, so a slow or vanished client stalls nobody.

The forward reuses the model's own weights and `model.backend` ops: linears run once over all rows
(every token of every row in one (1, N, hidden) tensor); attention runs per kind of row: decoding rows
together over their pages gathered into a padded (B, S, Hkv, D) tensor with a length mask, prompt
chunks one by one through `backend.attention` over their gathered prefix.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .errors import GenerationError, OutOfMemoryError
from .generator import ReplyText, check_request, sampler_state
from .model import Transformer
from .paged_cache import DEFAULT_PAGE_SIZE, PagedKVCache, PagedSequence
from .rope import apply_rope
from .samplers import SamplerContext, SamplerState, sample
from .tokenizer import Tokenizer
from .types import Chunk, GenerationSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
DEFAULT_PREFILL_CHUNK = 512
DEFAULT_POOL_SEQUENCES = 4  # default pool: this many full-context sequences
END = object()  # last item a job emits


@dataclass
class BatchJob:
    """One request inside the scheduler. Fields below `emit` belong to the engine thread."""

    id: int
    prompt: list[int]
    settings: GenerationSettings
    samplers: dict
    max_new: int
    emit: Callable[[object], None]  # gets Chunks, then an exception or nothing, then END; never blocks
    eos_ids: frozenset[int] = frozenset()
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    ended_at: float | None = None
    finish_reason: str | None = None
    # engine-thread state
    seq: PagedSequence | None = None
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled token whose K/V the next forward computes
    history: torch.Tensor | None = None
    state: SamplerState | None = None
    rng: torch.Generator | None = None
    reply: ReplyText | None = None
    prefill_done_at: float | None = None
    cached_tokens: int = 0  # prompt tokens found in shared pages (not computed again)
    _wake: Callable[[], None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop this job; takes effect at the start of the next step. Safe from any thread."""
        self.cancelled.set()
        if self._wake is not None:
            self._wake()

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.eos_ids if self.settings.stop_on_eos else frozenset()

    @property
    def prefilling(self) -> bool:
        return self.seq is not None and self.prefill_done_at is None


def sample_for_job(job: BatchJob, logits: torch.Tensor) -> int:
    """The one place a row of logits becomes a job's next token (hooks for constraints, logprobs and
    adapters go here)."""
    ctx = SamplerContext(history=job.history, generated_start=len(job.prompt), settings=job.samplers,
                         eos_ids=job.eos_ids, state=job.state)
    return sample(logits, job.samplers, ctx, job.rng)


class JobStream:
    """Blocking iteration over a job's chunks (for the CLI, tests and benchmarks); leaving the loop
    early cancels the job."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.job: BatchJob | None = None

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while True:
                item = self.queue.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self.job is not None:
                self.job.cancel()


# --- the batched forward --------------------------------------------------------------------------

@dataclass
class Row:
    """One row of a step: `ids` written at positions start.. of `seq` (1 id for a decoding job)."""

    seq: PagedSequence
    ids: list[int]
    start: int


def _linear_fn(model: Transformer) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """Transformer._linear when the model has it (adapters apply there), else the backend's linear."""
    fn = getattr(model, "_linear", None)
    return fn if fn is not None else model.backend.linear  # type: ignore[return-value]


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, D) one query per row; k, v (B, S, Hkv, D) padded; mask (B, S) True where a key counts.
    Grouped by KV head as TorchBackend._decode_attention (no KV copy for GQA) -> (B, H * D)."""
    b, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, hkv, h // hkv, d)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * (d ** -0.5)  # (B, Hkv, G, S)
    scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).reshape(b, h * d)


@torch.inference_mode()
def forward_rows(model: Transformer, cache: PagedKVCache, rows: list[Row]) -> torch.Tensor:
    """Run all rows through the model at once, writing their K/V into the pool; return float32
    logits (len(rows), vocab) of each row's last token."""
    c, be = model.config, model.backend
    linear = _linear_fn(model)
    dev, p = model.device, cache.page_size
    lengths = [len(r.ids) for r in rows]
    n = sum(lengths)
    ids = torch.tensor([t for r in rows for t in r.ids], dtype=torch.int64)
    positions = torch.cat([torch.arange(r.start, r.start + len(r.ids)) for r in rows])
    tables = [torch.tensor(r.seq.pages, dtype=torch.int64) for r in rows]
    write = torch.cat([t[pos // p] * p + pos % p for t, pos in
                       zip(tables, torch.split(positions, lengths), strict=True)]).to(dev)
    cos, sin = model._rope(0, int(positions.max()) + 1)
    cos, sin = cos[positions.to(cos.device)], sin[positions.to(sin.device)]

    decode = [i for i, r in enumerate(rows) if len(r.ids) == 1]
    prompt = [i for i, r in enumerate(rows) if len(r.ids) > 1]
    offsets = [0, *itertools.accumulate(lengths)]
    if decode:  # padded key table of the decoding rows: positions 0..start, masked past each length
        span = max(rows[i].start for i in decode) + 1
        kpos = torch.arange(span)
        table = torch.stack([tables[i][torch.clamp(kpos, max=rows[i].start) // p] * p + kpos % p for i in decode])
        qpos = torch.tensor([rows[i].start for i in decode])[:, None]
        mask = kpos[None, :] <= qpos
        if c.sliding_window is not None:
            mask &= kpos[None, :] > qpos - c.sliding_window
        table, mask = table.to(dev), mask.to(dev)
        drows = torch.tensor([offsets[i] for i in decode], device=dev)
    prompt_slots = [cache.slots(rows[i].seq, 0, rows[i].start + lengths[i]) for i in prompt]

    x = model.embed[ids.to(model.embed.device)].to(model.dtype)[None]  # (1, N, hidden)
    for li, layer in enumerate(model.layers):
        h = be.rms_norm(x, layer.input_norm, c.rms_norm_eps)
        q = linear(h, layer.q_proj).view(1, n, c.num_heads, c.head_dim)
        k = linear(h, layer.k_proj).view(1, n, c.num_kv_heads, c.head_dim)
        v = linear(h, layer.v_proj).view(1, n, c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None:
            q = be.rms_norm(q, layer.q_norm, c.rms_norm_eps)
            k = be.rms_norm(k, layer.k_norm, c.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(li, write, k[0], v[0])
        out = torch.empty(1, n, c.num_heads * c.head_dim, dtype=q.dtype, device=q.device)
        if decode:
            kg, vg = cache.gather(li, table)
            out[0, drows] = paged_decode_attention(q[0, drows], kg, vg, mask).to(out.dtype)
        for i, slots in zip(prompt, prompt_slots, strict=True):
            a, b = offsets[i], offsets[i + 1]
            kk, vv = cache.gather(li, slots)
            out[:, a:b] = be.attention(q[:, a:b], kk[None], vv[None], rows[i].start, c.sliding_window)
        x = x + linear(out, layer.o_proj)
        h = be.rms_norm(x, layer.post_norm, c.rms_norm_eps)
        x = x + linear(be.mlp_act(linear(h, layer.gate_proj), linear(h, layer.up_proj)), layer.down_proj)
    last = torch.tensor([o - 1 for o in offsets[1:]], device=dev)
    x = be.rms_norm(x[:, last], model.norm, c.rms_norm_eps)
    return linear(x, model.head).float()[0]


# --- the scheduler --------------------------------------------------------------------------------

class Scheduler:
    """Owns the model while serving: one engine thread, many jobs. Submit from any thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int, *,
                 pool_tokens: int | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                 max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        model.set_rope_length(max_seq_len)
        tokens = pool_tokens or DEFAULT_POOL_SEQUENCES * max_seq_len
        try:
            self.cache = PagedKVCache(model.config, tokens, model.device, model.dtype, page_size)
        except torch.cuda.OutOfMemoryError as e:
            raise OutOfMemoryError(f"a paged KV cache of {tokens} tokens does not fit in GPU memory",
                                   hint="Give the server a smaller cache or context.") from e
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._inbox: list[BatchJob] = []
        self._waiting: list[BatchJob] = []
        self._running: list[BatchJob] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # forwards run (for tests and benchmarks)

    # --- any thread ----------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], settings: GenerationSettings | None = None,
               emit: Callable[[object], None] | None = None) -> BatchJob:
        """Queue a generation; checks what would fail later now, so errors reach the caller."""
        settings = settings or GenerationSettings()
        samplers, max_new = check_request(prompt_ids, settings, self.max_seq_len)
        if self.cache.pages_for(len(prompt_ids) + max_new) > self.cache.num_pages:
            raise GenerationError(
                f"the request needs {len(prompt_ids) + max_new} tokens of cache, the server's pool holds "
                f"{self.cache.capacity_tokens}", hint="Ask for fewer tokens or give the server a larger cache.")
        job = BatchJob(next(self._ids), list(prompt_ids), settings, samplers, max_new,
                       emit or (lambda item: None), self.tokenizer.eos_ids)
        job._wake = self._wake
        with self._cond:
            if self._closing:
                raise GenerationError("the model is being unloaded", hint="Load a model and try again.")
            self._inbox.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kestrel-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return job

    def stream(self, prompt_ids: list[int], settings: GenerationSettings | None = None) -> Iterator[Chunk]:
        """Submit and iterate the job's chunks (blocking); stopping early cancels it."""
        out = JobStream()
        out.job = self.submit(prompt_ids, settings, out.queue.put)
        return iter(out)

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._inbox) + len(self._waiting) + len(self._running)

    def close(self, cancel: bool = False) -> None:
        """Refuse new jobs, let running ones finish (or cancel them), stop the engine thread."""
        with self._cond:
            self._closing = True
            jobs = self._inbox + self._waiting + self._running
            self._cond.notify()
        if cancel:
            for job in jobs:
                job.cancelled.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._waiting or self._running or self._closing):
                    self._cond.wait()
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                if self._closing and not (self._waiting or self._running):
                    return
            try:
                self._step()
            except BaseException as e:  # noqa: BLE001 - every job in the step gets the error
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    e = OutOfMemoryError("the GPU ran out of memory while serving several requests",
                                         hint="Give the server a smaller cache or fewer concurrent requests.")
                elif not isinstance(e, Exception):
                    log.warning("batch step ended by %s", type(e).__name__)
                else:
                    log.exception("batch step failed")
                with self._cond:
                    failed = list(self._running)
                for job in failed:
                    self._end(job, "error", error=e)

    def _step(self) -> None:
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            job.started_at = job.prefill_done_at = time.monotonic()
            self._emit(job, Chunk("", [], len(job.prompt), 0, 0.0, 0.0, "cancelled"))
            self._end(job, "cancelled")
        for job in [j for j in self._running if j.cancelled.is_set()]:
            self._finish(job, "cancelled")
        self._admit()
        rows, jobs, budget = [], [], self.prefill_chunk
        for job in self._running:
            if job.pending is not None:
                rows.append(Row(job.seq, [job.pending], job.seq.length))
                jobs.append(job)
        for job in self._running:
            if job.prefilling and budget > 0:
                start = job.seq.length
                ids = job.prompt[start:start + budget]
                budget -= len(ids)
                rows.append(Row(job.seq, ids, start))
                jobs.append(job)
        if not rows:
            return
        logits = forward_rows(self.model, self.cache, rows)
        self.steps += 1
        for row, job, row_logits in zip(rows, jobs, logits, strict=True):
            self.cache.commit(job.seq, row.ids)
            if job.pending is not None:
                job.pending = None
            elif job.seq.length < len(job.prompt):
                continue  # more prompt to read
            else:
                job.prefill_done_at = time.monotonic()
            try:
                self._advance(job, row_logits)
            except Exception as e:  # noqa: BLE001 - this job's own error (samplers, banned strings)
                self._end(job, "error", error=e)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            job = self._waiting[0]
            total = len(job.prompt) + job.max_new
            if not self.cache.can_allocate(job.prompt, total):
                return  # first come, first served: wait for pages to come back
            self._waiting.pop(0)
            job.seq = self.cache.allocate(job.prompt, total)
            job.cached_tokens = job.seq.reused
            job.started_at = time.monotonic()
            job.history = torch.tensor(job.prompt, dtype=torch.int64)
            job.state = sampler_state(self.tokenizer, job.samplers)
            if job.settings.seed is not None:
                job.rng = torch.Generator().manual_seed(int(job.settings.seed))
            job.reply = ReplyText(self.tokenizer, job.settings.stop_strings, job.samplers["banned_strings"])
            with self._cond:
                self._running.append(job)

    def _chunk(self, job: BatchJob, text: str, new: list[int], finish: str | None) -> Chunk:
        t0 = job.started_at or job.submitted_at
        t1 = job.prefill_done_at or time.monotonic()
        return Chunk(text, new, len(job.prompt), len(job.generated), t1 - t0, time.monotonic() - t1, finish)

    def _advance(self, job: BatchJob, logits: torch.Tensor) -> None:
        """Sample the job's next token from `logits` and stream it (the Generator's loop, one step)."""
        while True:
            if len(job.generated) >= job.max_new:
                self._finish(job, "length")
                return
            index = len(job.generated)
            logits = job.reply.before_sampling(index, logits, job.state)
            token = sample_for_job(job, logits)
            if token in job.stop_ids:
                self._finish(job, "stop")
                return
            job.generated.append(token)
            job.history = torch.cat([job.history, torch.tensor([token])])
            text, stopped, back = job.reply.feed(token, index)
            if back is not None:
                logits = self._rewind(job, back)
                continue
            if stopped:
                self._emit(job, self._chunk(job, text, [token], "stop"))
                self._end(job, "stop")
                return
            if text:
                self._emit(job, self._chunk(job, text, [token], None))
            if len(job.generated) >= job.max_new:
                self._finish(job, "length")
                return
            job.pending = token
            return

    def _rewind(self, job: BatchJob, back: int) -> torch.Tensor:
        """Banned string: as Generator._rewind_completion, over the job's pages."""
        logits = job.reply.rewind(job.generated, back)
        self.cache.truncate(job.seq, len(job.prompt) + back)
        job.history = torch.tensor(job.prompt + job.generated, dtype=torch.int64)
        return logits

    def _finish(self, job: BatchJob, reason: str) -> None:
        """End a job the way the Generator ends a reply: release held text, then the last chunk."""
        tail, stopped = job.reply.finish()
        if job.prefill_done_at is None:
            job.prefill_done_at = time.monotonic()
        reason = "stop" if stopped else reason
        self._emit(job, self._chunk(job, tail, [], reason))
        self._end(job, reason)

    def _end(self, job: BatchJob, reason: str, error: BaseException | None = None) -> None:
        job.finish_reason = reason
        job.ended_at = time.monotonic()
        with self._cond:
            if job in self._running:
                self._running.remove(job)
        if job.seq is not None:
            self.cache.free(job.seq)
            job.seq = None
        if job.reply is not None:
            job.reply.saved.clear()
        if error is not None:
            self._emit(job, error)
        self._emit(job, END)

    @staticmethod
    def _emit(job: BatchJob, item: object) -> None:
        try:
            job.emit(item)
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the others
            log.exception("job %s: its consumer failed; cancelling it", job.id)
            job.cancelled.set()

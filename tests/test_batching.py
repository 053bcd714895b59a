"""Paged KV cache and continuous batching on the real SmolLM2 fixtures (fp16 and EXL2) on CPU.

The reference for every batched job is the same request run alone through the Generator.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from app.engine import load_model
from app.engine.batching import BatchJob, Scheduler
from app.engine.config import ModelConfig
from app.engine.generator import Generator
from app.engine.paged_cache import PagedKVCache
from app.engine.tokenizer import Tokenizer
from app.engine.types import Chunk, GenerationSettings

GREEDY = {"temperature": 0}
SHARED = ("You are a careful assistant who answers questions about the world and its history. Answer in one short sentence, and never use lists or "
          "headings in the reply. Question: ")
PROMPTS = [SHARED + "What is the capital of France?", "Once upon a time, in a land far away,",
           SHARED + "Why is the sky blue?", "def fibonacci(n):"]
NEW = 10


# --- the pool on its own --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def config(smollm2_fp16_dir: str) -> ModelConfig:
    return ModelConfig.from_folder(smollm2_fp16_dir)


def pool(config: ModelConfig, pages: int = 8) -> PagedKVCache:
    return PagedKVCache(config, pages * 4, "cpu", torch.float32, page_size=4)


def test_full_prompt_pages_are_shared_with_a_refcount(config: ModelConfig) -> None:
    cache = pool(config)
    a = cache.allocate(list(range(10)), 12)
    assert len(a.pages) == 3 and a.reused == 0 and cache.free_pages == 5
    cache.commit(a, list(range(10)))
    b = cache.allocate(list(range(9)) + [99], 12)  # same first two pages, different third
    assert b.pages[:2] == a.pages[:2] and b.pages[2] != a.pages[2] and b.reused == 8
    assert [cache.refcount[p] for p in a.pages] == [2, 2, 1] and cache.free_pages == 4
    c = cache.allocate([0, 1, 2, 3, 4, 5, 6, 7], 9)  # the whole prompt is cached: its last page is recomputed
    assert c.reused == 4 and c.pages[0] == a.pages[0] and c.pages[1] != a.pages[1]
    for seq in (a, b, c):
        cache.free(seq)
    assert cache.free_pages == cache.num_pages and all(r == 0 for r in cache.refcount)


def test_freed_prefix_stays_reusable_and_is_evicted_least_recent_first(config: ModelConfig) -> None:
    cache = pool(config)
    old, new = [100 + i for i in range(8)], [200 + i for i in range(8)]
    for ids in (old, new):  # `old` is freed first, so it is the first to go
        seq = cache.allocate(ids + [1], 9)
        cache.commit(seq, ids + [1])
        cache.free(seq)
    again = cache.allocate(new + [2], 9)
    assert again.reused == 8  # a finished conversation's prefix is found again
    cache.free(again)
    # 8 pages: 4 are blank, 4 hold the two prefixes; 6 fresh pages evict the two least recent
    big = cache.allocate([7] * 21, 24)
    assert big.reused == 0
    cache.free(big)
    assert cache.allocate(old + [3], 9).reused == 0  # evicted
    assert cache.allocate(new + [3], 9).reused == 8  # recently used: kept


def test_written_values_come_back_and_truncation_copies_a_shared_page(config: ModelConfig) -> None:
    cache = pool(config)
    ids = list(range(8))
    a = cache.allocate(ids + [8], 12)
    slots = cache.slots(a, 0, 9)
    k = torch.randn(9, config.num_kv_heads, config.head_dim)
    cache.write(3, slots, k, -k)
    cache.commit(a, ids + [8])
    kk, vv = cache.gather(3, slots)
    assert torch.equal(kk, k) and torch.equal(vv, -k)
    b = cache.allocate(ids + [9], 12)
    assert b.pages[:2] == a.pages[:2]
    cache.truncate(b, 6)  # into b's second page, which a shares: b gets a private copy
    assert b.length == 6 and b.pages[0] == a.pages[0] and b.pages[1] != a.pages[1]
    assert torch.equal(cache.gather(3, cache.slots(b, 0, 6))[0], k[:6])
    assert torch.equal(cache.gather(3, cache.slots(a, 0, 9))[0], k)  # a is untouched


# --- the scheduler on the real model --------------------------------------------------------------

def collect(chunks: list[Chunk]) -> tuple[str, str | None]:
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


class Recorder:
    """An emit callback that keeps what a job sent, with arrival times (the server's queue stand-in)."""

    def __init__(self, probe=None) -> None:
        self.items: list[tuple[float, object]] = []
        self.done = threading.Event()
        self.probe = probe  # read when the job ends
        self.probed = None

    def __call__(self, item: object) -> None:
        if isinstance(item, BaseException):
            raise AssertionError(f"job failed: {item!r}")
        if isinstance(item, Chunk):
            self.items.append((time.monotonic(), item))
        else:
            self.probed = self.probe() if self.probe else None
            self.done.set()

    @property
    def chunks(self) -> list[Chunk]:
        return [c for _, c in self.items]  # type: ignore[misc]

    def wait(self) -> tuple[str, str | None]:
        assert self.done.wait(600), "the job did not end"
        return collect(self.chunks)


def build(folder: str):
    model, tok = load_model(folder, "cpu"), Tokenizer.from_folder(folder)
    ids = [tok.encode(p, add_bos=tok.add_bos_token) for p in PROMPTS]
    gen = Generator(model, tok, max_seq_len=512)
    settings = GenerationSettings(max_new_tokens=NEW, samplers=GREEDY, stop_on_eos=False)
    alone = [gen.generate(i, settings)[0] for i in ids]
    sched = Scheduler(model, tok, 512, page_size=16, prefill_chunk=32)
    return gen, sched, ids, alone, settings


@pytest.fixture(scope="module")
def fp16(smollm2_fp16_dir: str):
    built = build(smollm2_fp16_dir)
    yield built
    built[1].close(cancel=True)


@pytest.fixture(scope="module", params=["fp16", "exl2"])
def setup(request):
    """The fp16 fixture and the mixed-width EXL2 fixture (dequantized on CPU)."""
    if request.param == "fp16":
        yield request.getfixturevalue("fp16")
        return
    built = build(request.getfixturevalue("smollm2_exl2_mixed"))
    yield built
    built[1].close(cancel=True)


def test_greedy_batch_equals_each_request_alone(setup) -> None:
    _, sched, ids, alone, settings = setup
    assert len(ids[0]) > 32 and len(ids[2]) > 32  # the shared prompts take more than one prefill chunk
    recs = [Recorder() for _ in ids]
    steps = sched.steps
    jobs = [sched.submit(i, settings, r) for i, r in zip(ids, recs, strict=True)]
    assert [r.wait() for r in recs] == [(a, "length") for a in alone]
    assert sched.steps - steps < 4 * NEW  # they ran together, not one after another
    assert all(j.finish_reason == "length" and len(j.generated) == NEW for j in jobs)
    # again: the shared instruction's full pages (and each prompt's own) come from the pool now
    again = [list(sched.stream(i, settings)) for i in ids]
    assert [collect(c) for c in again] == [(a, "length") for a in alone]
    assert sched.cache.free_pages == sched.cache.num_pages


def test_prefix_pages_are_shared_between_running_jobs(setup) -> None:
    _, sched, ids, alone, settings = setup
    first = Recorder()
    sched.submit(ids[0], settings, first)
    first.wait()
    second = Recorder()
    job = sched.submit(ids[2], settings, second)  # same instruction, other question
    assert second.wait() == (alone[2], "length")
    common = next(i for i, (a, b) in enumerate(zip(ids[0], ids[2], strict=False)) if a != b)
    assert common >= 16 and job.cached_tokens >= common // 16 * 16  # the instruction's full pages


def test_long_prompt_is_read_in_chunks_between_decode_steps(fp16) -> None:
    _, sched, ids, alone, settings = fp16
    runner = Recorder()
    sched.submit(ids[1], GenerationSettings(max_new_tokens=40, samplers=GREEDY, stop_on_eos=False), runner)
    while not runner.items:
        time.sleep(0.01)
    long_ids = ids[3] + ids[0] * 4  # ~150 tokens: five chunks of 32
    reader = Recorder()
    job = sched.submit(long_ids, GenerationSettings(max_new_tokens=2, samplers=GREEDY), reader)
    runner.wait()
    reader.wait()
    during = [t for t, _ in runner.items if job.started_at < t < job.prefill_done_at]
    assert len(during) >= 3  # the decoding job kept streaming while the long prompt was read


def test_cancel_ends_only_that_job_within_one_step(fp16) -> None:
    _, sched, ids, alone, settings = fp16
    keep, stop = Recorder(), Recorder(lambda: sched.steps)
    sched.submit(ids[0], settings, keep)
    victim: BatchJob = sched.submit(ids[1], GenerationSettings(max_new_tokens=400, samplers=GREEDY,
                                                                stop_on_eos=False), stop)
    while len(stop.items) < 2:
        time.sleep(0.005)
    steps = sched.steps
    victim.cancel()
    text, reason = stop.wait()
    assert reason == "cancelled" and stop.probed - steps <= 1
    assert keep.wait() == (alone[0], "length")


def test_each_job_samples_with_its_own_settings(fp16) -> None:
    gen, sched, ids, alone, _ = fp16
    seeded = GenerationSettings(max_new_tokens=8, samplers={"temperature": 1.2, "top_k": 40}, seed=11,
                                stop_on_eos=False)
    stopped = GenerationSettings(max_new_tokens=NEW, samplers=GREEDY, stop_on_eos=False,
                                 stop_strings=[alone[3].strip()[4:8]])
    refs = [gen.generate(ids[1], seeded)[0], gen.generate(ids[3], stopped)]
    recs = [Recorder(), Recorder(), Recorder()]
    sched.submit(ids[1], seeded, recs[0])
    sched.submit(ids[3], stopped, recs[1])
    sched.submit(ids[0], GenerationSettings(max_new_tokens=NEW, samplers=GREEDY, stop_on_eos=False), recs[2])
    assert recs[0].wait() == (refs[0], "length")
    assert recs[1].wait() == (refs[1][0], "stop") and refs[1][1].finish_reason == "stop"
    assert recs[2].wait() == (alone[0], "length")


def test_requests_the_pool_cannot_hold_are_refused(fp16) -> None:
    _, sched, ids, _, _ = fp16
    small = Scheduler(sched.model, sched.tokenizer, 512, pool_tokens=64, page_size=16)
    with pytest.raises(Exception, match="pool holds 64"):
        small.submit(ids[0], GenerationSettings(max_new_tokens=100))
    with pytest.raises(Exception, match="context"):
        small.submit(list(range(600)), GenerationSettings(max_new_tokens=1))

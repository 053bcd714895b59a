"""Long chats on the real fp16 SmolLM2: prompt caching across turns and conversations (LRU slots),
cancel during a chunked prefill, context overflow policies, RoPE overrides at load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.engine.errors import ContextFullError, GenerationError
from app.engine.overflow import fit_messages, turn_starts
from app.engine.session import Engine
from app.engine.types import GenerationSettings

GREEDY = GenerationSettings(max_new_tokens=6, samplers={"temperature": 0})


@pytest.fixture(scope="module")
def engine(smollm2_fp16_dir) -> Engine:
    return Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=512)


def reply(engine: Engine, messages: list[dict], settings: GenerationSettings = GREEDY) -> tuple[str, object]:
    parts, last = [], None
    for chunk in engine.stream_chat(messages, settings):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


def chat(system: str, *turns: str) -> list[dict]:
    out = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return out


# --- prompt caching across turns ---------------------------------------------------------------


def test_turn_n_plus_1_prefills_only_the_new_tokens(engine) -> None:
    g = engine.generator
    g.reset_cache()
    messages = chat("You are terse. " + "Answer with one word, never explain, never apologise. " * 8,
                    "Name a colour.")
    for turn in range(3):
        answer, _ = reply(engine, messages)
        if turn:
            history = engine.count_chat_tokens(messages[:-1])
            new = engine.count_chat_tokens(messages) - history
            assert g.last_prefill_tokens <= new + 8, (turn, g.last_prefill_tokens, new, history)
            assert g.last_prefill_tokens < history / 2
        messages = messages + [{"role": "assistant", "content": answer},
                               {"role": "user", "content": f"And another one, number {turn + 2}?"}]


def test_regenerate_and_edit_reuse_the_longest_prefix(engine) -> None:
    g = engine.generator
    g.reset_cache()
    messages = chat("You are terse.", "What is 2+2?", "4.", "And 3+3?", "6.", "And 5+5?")
    reply(engine, messages)
    total = engine.count_chat_tokens(messages)
    assert g.last_prefill_tokens == total  # nothing cached yet
    reply(engine, messages)  # regenerate: the whole prompt is cached
    assert g.last_prefill_tokens == 1  # only the last token is recomputed, for its logits
    edited = messages[:3] + [{"role": "user", "content": "And 7+7?"}]  # edit the second question
    reply(engine, edited)
    kept = engine.count_chat_tokens(messages[:3]) - 1
    assert g.last_prefill_tokens <= engine.count_chat_tokens(edited) - kept
    assert g.last_prefill_tokens < engine.count_chat_tokens(edited) / 2


def test_switching_conversations_keeps_both_prefixes(engine) -> None:
    g = engine.generator
    a = chat("You are a pirate. Answer like one, always, in every reply you give to anybody.", "Hello there!")
    b = chat("You are a careful accountant who double-checks every number twice.", "What is VAT?")
    try:
        for slots, a_again_prefill in ((2, "cached"), (1, "recomputed")):
            g.set_cache_slots(slots)
            g.reset_cache()
            reply(engine, a)
            reply(engine, b)
            assert g.last_prefill_tokens >= engine.count_chat_tokens(b) - 8  # at most the template's start is shared
            reply(engine, a)  # back to A
            if a_again_prefill == "cached":
                assert g.last_prefill_tokens == 1
            else:  # one slot: B evicted A, so its history is read again (the test can fail)
                assert g.last_prefill_tokens > engine.count_chat_tokens(a) / 2
    finally:
        g.set_cache_slots(2)


def test_slot_choice_and_lru_eviction() -> None:
    from app.engine.cache_slots import CacheSlot, choose_slot

    slots = [CacheSlot(None, [1, 2, 3, 4, 5, 6], used=1), CacheSlot(None, [1, 2, 9, 9], used=2)]
    assert choose_slot(slots, [1, 2, 3, 4, 5, 6, 7, 8], 2) == (0, 6)   # next turn of chat 0
    assert choose_slot(slots, [1, 2, 9, 9, 7], 2) == (1, 4)            # next turn of chat 1
    assert choose_slot(slots, [1, 2, 3, 4, 0], 2) == (0, 4)            # edit late in chat 0
    assert choose_slot(slots, [1, 2, 7, 7], 3) == (None, 0)            # a new chat: a fresh slot
    assert choose_slot(slots, [1, 2, 7, 7], 2) == (0, 2)               # full: the least recently used


def test_set_cache_slots_rejects_zero(engine) -> None:
    with pytest.raises(GenerationError, match="at least 1"):
        engine.generator.set_cache_slots(0)


# --- chunked prefill and cancel ----------------------------------------------------------------


def test_cancel_during_a_long_prefill_takes_effect_within_one_chunk(smollm2_fp16_dir, reference_dir) -> None:
    engine = Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=512)
    g = engine.generator
    g.prefill_chunk = 32
    ids = np.load(reference_dir / "ppl_ids.npy")[0, :300].tolist()
    seen: list[int] = []

    def after_chunk(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 1:
            g.cancel()  # as the GUI's Stop button does, from any thread

    g.on_prefill_chunk = after_chunk
    chunks = list(g.stream(ids, GenerationSettings(max_new_tokens=5)))
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].generated_tokens == 0
    assert seen == [32] and g.last_prefill_tokens == 32  # stopped after one chunk of 300 tokens
    g.on_prefill_chunk = None
    _, last = g.generate(ids, GenerationSettings(max_new_tokens=1, samplers={"temperature": 0}))
    assert last.finish_reason == "length" and g.last_prefill_tokens == 300 - 32  # the rest, reusing 32


# --- context overflow --------------------------------------------------------------------------


def long_chat(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question {i}: " + "tell me about birds " * 6},
                     {"role": "assistant", "content": f"Answer {i}: " + "birds fly and sing " * 6}]
    return messages + [{"role": "user", "content": "Summarise, please."}]


def test_overflow_stop_is_a_clear_error(engine) -> None:
    messages = long_chat(12)
    assert engine.count_chat_tokens(messages) > 512
    with pytest.raises(ContextFullError, match="chat is full") as info:
        reply(engine, messages, GenerationSettings(max_new_tokens=8))
    assert "drop oldest turns" in str(info.value) and "new chat" in str(info.value)


def test_overflow_drop_oldest_keeps_the_system_prompt_and_reports_what_was_dropped(engine) -> None:
    messages = long_chat(12)
    settings = GenerationSettings(max_new_tokens=8, samplers={"temperature": 0}, context_overflow="drop_oldest")
    chunks = list(engine.stream_chat(messages, settings))
    dropped = chunks[0].dropped_messages
    assert dropped and chunks[-1].dropped_messages == dropped
    assert dropped == tuple(range(1, 1 + len(dropped)))  # the oldest, in order, never the system prompt
    assert len(dropped) % 2 == 0  # whole turns: each user message with its reply
    kept = [m for i, m in enumerate(messages) if i not in set(dropped)]
    assert kept[0]["role"] == "system" and kept[-1] == messages[-1]
    assert engine.count_chat_tokens(kept) + 8 <= 512
    one_fewer = [m for i, m in enumerate(messages) if i not in set(dropped[:-2])]
    assert engine.count_chat_tokens(one_fewer) + 8 > 512  # no more was dropped than needed
    assert chunks[-1].prompt_tokens == engine.count_chat_tokens(kept)
    assert list(engine.stream_chat(messages[:3], settings))[-1].dropped_messages == ()  # fits: nothing dropped


def test_overflow_when_even_the_last_turn_is_too_long(engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 600}]
    with pytest.raises(ContextFullError, match="latest message does not fit"):
        list(engine.stream_chat(messages, GenerationSettings(context_overflow="drop_oldest")))
    with pytest.raises(GenerationError, match="unknown context overflow policy"):
        list(engine.stream_chat(messages, GenerationSettings(), overflow="truncate"))


def test_fit_messages_rule_on_counts() -> None:
    messages = [{"role": "system", "content": "s"}] + [
        {"role": r, "content": str(i)} for i in range(6) for r in ("user", "assistant")] + [
        {"role": "user", "content": "last"}]
    assert turn_starts(messages) == [1, 3, 5, 7, 9, 11, 13]

    def count(ms: list[dict]) -> int:
        return 10 * len(ms)

    assert fit_messages(messages, count, 200, 10, "drop_oldest") == (messages, [])
    kept, dropped = fit_messages(messages, count, 100, 10, "drop_oldest")  # 90 tokens for the prompt
    assert dropped == [1, 2, 3, 4, 5, 6] and kept == [messages[0]] + messages[7:] and count(kept) <= 90
    with pytest.raises(ContextFullError):
        fit_messages(messages, count, 100, 10, "stop")


# --- RoPE overrides ----------------------------------------------------------------------------


def test_rope_overrides_change_the_tables_as_defined(smollm2_fp16_dir) -> None:
    base = Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=256)
    cfg = base.model.config
    d, theta = cfg.head_dim, cfg.rope_theta
    exponents = torch.arange(0, d, 2, dtype=torch.float32) / d
    assert torch.allclose(base.model._inv_freq, 1.0 / theta ** exponents)

    scaled = Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=256, rope_scale=4.0)
    assert torch.allclose(scaled.model._inv_freq, base.model._inv_freq / 4.0)
    cos_s, _ = scaled.model._rope(0, 64)
    cos_b, _ = base.model._rope(0, 256)
    assert torch.allclose(cos_s[40], cos_b[10], atol=1e-3)  # position 40 at scale 4 is position 10

    alpha = Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=256, rope_alpha=2.5)
    new_theta = theta * 2.5 ** (d / (d - 2))
    assert torch.allclose(alpha.model._inv_freq, 1.0 / new_theta ** exponents)
    assert alpha.model._inv_freq[0] == base.model._inv_freq[0]  # the fastest pair is unchanged
    assert alpha.model._inv_freq[-1] < base.model._inv_freq[-1] / 2.4  # slow pairs stretch ~alpha
    text, _ = reply(alpha, chat("Be brief.", "Say hi."))
    assert text.strip()
    for bad in (0, -1.0, math.inf):
        with pytest.raises(GenerationError, match="rope scale"):
            Engine.load(smollm2_fp16_dir, "cpu", rope_scale=bad)


"""The generator on the real fp16 SmolLM2: streaming, stop, seed, cancel, prompt caching."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from app.engine import load_model
from app.engine.generator import Generator
from app.engine.tokenizer import Tokenizer
from app.engine.types import GenerationSettings

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def gen(smollm2_fp16_dir) -> Generator:
    return Generator(load_model(smollm2_fp16_dir, "cpu"), Tokenizer.from_folder(smollm2_fp16_dir), max_seq_len=512)


@pytest.fixture(scope="module")
def prompt(reference_dir) -> list[int]:
    return np.load(reference_dir / "prompt_ids.npy")[0].tolist()


def test_stream_pieces_add_up(gen, prompt) -> None:
    chunks = list(gen.stream(prompt, GenerationSettings(max_new_tokens=20, samplers=GREEDY)))
    assert "".join(c.text for c in chunks) == "The capital of France is Paris."
    assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].prompt_tokens == len(prompt)
    assert chunks[-1].generated_tokens == 7
    assert chunks[-1].decode_seconds > 0 and chunks[-1].tokens_per_second > 0


def test_max_new_tokens(gen, prompt) -> None:
    text, last = gen.generate(prompt, GenerationSettings(max_new_tokens=3, samplers=GREEDY))
    assert last.finish_reason == "length" and last.generated_tokens == 3
    assert text == "The capital of"


def test_stop_string_is_held_back_and_excluded(gen, prompt) -> None:
    text, last = gen.generate(prompt, GenerationSettings(max_new_tokens=20, samplers=GREEDY,
                                                          stop_strings=["Par"]))
    assert text == "The capital of France is " and last.finish_reason == "stop"


def test_seed_reproducible(gen, prompt) -> None:
    s = {"temperature": 1.5, "top_k": 50}
    a, _ = gen.generate(prompt, GenerationSettings(max_new_tokens=12, samplers=s, seed=7, stop_on_eos=False))
    b, _ = gen.generate(prompt, GenerationSettings(max_new_tokens=12, samplers=s, seed=7, stop_on_eos=False))
    c, _ = gen.generate(prompt, GenerationSettings(max_new_tokens=12, samplers=s, seed=8, stop_on_eos=False))
    assert a == b
    assert a != c


def test_cancel_from_another_thread(gen, prompt) -> None:
    settings = GenerationSettings(max_new_tokens=400, samplers={"temperature": 1.0}, seed=1, stop_on_eos=False)
    chunks = []
    for c in gen.stream(prompt, settings):
        chunks.append(c)
        if len(chunks) == 2:
            threading.Thread(target=gen.cancel).start()
        assert len(chunks) < 50, "cancel did not take effect"
    assert chunks[-1].finish_reason == "cancelled"


def test_prompt_cache_prefills_only_new_tokens(gen, prompt) -> None:
    seen: list[int] = []
    forward = gen.model.forward

    def counting(ids, cache=None, start=0, last_only=False):
        seen.append(ids.shape[1])
        return forward(ids, cache, start, last_only)

    gen.reset_cache()
    first, _ = gen.generate(prompt, GenerationSettings(max_new_tokens=20, samplers=GREEDY))
    turn2 = gen.tokenizer.encode(first + "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    follow = prompt + turn2
    gen.model.forward = counting
    try:
        cached, _ = gen.generate(follow, GenerationSettings(max_new_tokens=8, samplers=GREEDY))
    finally:
        gen.model.forward = forward
    prefill = seen[0]
    assert prefill < len(turn2) + 2, f"prefilled {prefill} of {len(follow)} tokens"
    fresh = Generator(gen.model, gen.tokenizer, max_seq_len=512)
    assert fresh.generate(follow, GenerationSettings(max_new_tokens=8, samplers=GREEDY))[0] == cached


def test_perplexity_matches_direct_computation(gen, reference_dir) -> None:
    rows = np.load(reference_dir / "ppl_ids.npy")[:1, :64].tolist()
    ppl = gen.perplexity(rows)
    logits = gen.model.forward(torch.tensor(rows))[0, :-1]
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(rows)[0, 1:, None]).mean()
    assert ppl == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_prompt_longer_than_context_is_a_clear_error(gen) -> None:
    from app.engine.errors import GenerationError

    with pytest.raises(GenerationError, match="context holds 512"):
        list(gen.stream([1] * 600))

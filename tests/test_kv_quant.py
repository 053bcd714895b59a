"""Quantized KV cache (app/engine/kv_quant.py): exact memory per the planner's formula, packing,
round-trip error bounds, and quality on the real SmolLM2 (perplexity vs the FP16 cache, greedy decode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.cache import CACHE_GROUP_SIZE, CACHE_MODES, KVCache, kv_bytes_per_token
from app.engine.config import ModelConfig
from app.engine.generator import Generator
from app.engine.kv_quant import QuantKVCache, dequantize, hadamard, pack, quantize, unpack
from app.engine.session import Engine
from app.engine.types import GenerationSettings

BITS = {"q8": 8, "q6": 6, "q4": 4}
# perplexity change vs the FP16 cache allowed on the fixture rows (issue #9: Q8 <= 0.3%, Q4 <= 1.5%)
PPL_LIMIT = {"q8": 0.3, "q6": 0.5, "q4": 1.5}


def config(head_dim: int, kv_heads: int = 3, layers: int = 2) -> ModelConfig:
    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 9 * head_dim, "intermediate_size": 64,
        "num_hidden_layers": layers, "num_attention_heads": 9, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": 100})


@pytest.mark.parametrize("mode", list(CACHE_MODES))
@pytest.mark.parametrize("head_dim", [64, 128, 80, 72, 100])
def test_allocated_bytes_equal_the_planner_formula(mode: str, head_dim: int) -> None:
    cfg = config(head_dim)
    cache = KVCache.allocate(cfg, 37, "cpu", torch.float16, mode=mode)
    assert cache.mode == mode and cache.max_seq_len == 37
    assert cache.storage_bytes() == 37 * kv_bytes_per_token(cfg, mode)
    if mode != "fp16":
        padded = -(-head_dim // CACHE_GROUP_SIZE) * CACHE_GROUP_SIZE
        assert cache.keys[0].shape[-1] == padded * BITS[mode] // 8  # Q6: 4 values in 3 bytes, Q4: 2 per byte


def test_unknown_mode_is_a_clear_error() -> None:
    from app.engine.errors import GenerationError

    with pytest.raises(GenerationError, match="unknown cache mode 'q3'"):
        KVCache.allocate(config(64), 8, "cpu", mode="q3")


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_packing_round_trips_every_code(bits: int) -> None:
    codes = torch.randint(0, 2 ** bits, (5, 3, 96), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 96 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


def test_hadamard_is_orthogonal_and_its_own_inverse() -> None:
    h = hadamard()
    assert torch.allclose(h @ h, torch.eye(CACHE_GROUP_SIZE), atol=1e-6)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_round_trip_error_is_within_half_a_step(bits: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 96)
    x[..., 5] *= 20  # an outlier channel
    packed, scales = quantize(x, bits, hadamard())
    y = dequantize(packed, scales, bits, hadamard(), torch.float32)
    groups_err = (y - x).reshape(64, 3, 3, 32).norm(dim=-1)
    bound = scales.float() * 0.5 * CACHE_GROUP_SIZE ** 0.5 * 1.001  # |error| <= step/2 per rotated value
    assert (groups_err <= bound).all()
    rel = ((y - x).norm() / x.norm()).item()
    assert rel < {8: 0.006, 6: 0.025, 4: 0.11}[bits]


def test_the_rotation_helps_with_outliers() -> None:
    torch.manual_seed(1)
    x = torch.randn(256, 32)
    x[:, 3] += 12  # a large per-channel offset, as Llama keys have
    err_rot = (dequantize(*quantize(x, 4, hadamard()), 4, hadamard(), torch.float32) - x).norm()
    err_plain = (dequantize(*quantize(x, 4, None), 4, None, torch.float32) - x).norm()
    assert err_rot < 0.8 * err_plain


@pytest.mark.parametrize("mode", ["q8", "q6", "q4"])
def test_update_keeps_the_cache_contract(mode: str) -> None:
    torch.manual_seed(2)
    cfg = config(80)
    cache = KVCache.allocate(cfg, 40, "cpu", torch.float16, mode=mode)
    assert isinstance(cache, QuantKVCache)
    k, v = torch.randn(1, 30, 3, 80).half(), torch.randn(1, 30, 3, 80).half()
    k[..., 7] += 6
    ka, va = cache.update(1, 0, k[:, :20], v[:, :20])
    assert ka.shape == (1, 20, 3, 80) and ka.dtype == torch.float16
    kb, vb = cache.update(1, 20, k[:, 20:], v[:, 20:])
    assert kb.shape == (1, 30, 3, 80)
    tol = {"q8": 0.02, "q6": 0.06, "q4": 0.2}[mode]
    assert ((kb.float() - k.float()).norm() / k.float().norm()) < tol
    assert ((vb.float() - v.float()).norm() / v.float().norm()) < tol
    cache.truncate(10)
    assert cache.length == 0 or cache.length <= 10
    kc, _ = cache.update(1, 10, k[:, 10:12], v[:, 10:12])  # a kept prefix reads back unchanged
    assert kc.shape[1] == 12 and torch.equal(kc[:, :10], kb[:, :10])
    with pytest.raises(Exception, match="context is full"):
        cache.update(1, 39, k[:, :2], v[:, :2])


def test_recent_tokens_read_back_exactly_and_survive_a_truncate(monkeypatch) -> None:
    """The latest RECENT_TOKENS positions and the tokens being written come back bit-exact; older
    ones are the quantized copy. After a truncate, ring slots that newer (now dropped) positions took
    over are not read: those positions fall back to their quantized copy, never to another token."""
    import app.engine.kv_quant as kvq

    monkeypatch.setattr(kvq, "RECENT_TOKENS", 8)
    torch.manual_seed(3)
    cache = KVCache.allocate(config(64), 64, "cpu", torch.float16, mode="q4")
    k, v = torch.randn(1, 40, 3, 64).half(), torch.randn(1, 40, 3, 64).half()
    for pos in range(30):                                   # decode: one token at a time
        kb, vb = cache.update(0, pos, k[:, pos:pos + 1], v[:, pos:pos + 1])
    assert torch.equal(kb[:, 22:30], k[:, 22:30]) and torch.equal(vb[:, 22:30], v[:, 22:30])
    assert torch.equal(kb[:, :4], k[:, :4])                 # attention sinks
    older = slice(4, 22)
    assert not torch.equal(kb[:, older], k[:, older])       # quantized, but close
    assert ((kb[:, older].float() - k[:, older].float()).norm() / k[:, older].float().norm()) < 0.2
    cache.truncate(25)                                      # positions 25..29 dropped (they hold ring slots)
    kb, vb = cache.update(0, 25, k[:, 35:36], v[:, 35:36])  # a different token at 25
    assert torch.equal(kb[:, 25], k[:, 35]) and torch.equal(kb[:, 22:25], k[:, 22:25])
    err = (kb[:, 17:22].float() - k[:, 17:22].float()).norm() / k[:, 17:22].float().norm()
    assert 0 < err < 0.2                                    # slots of 17..21 were reused: quantized copy
    # and on the next step too: the ring's slots for 18..21 still hold the dropped 26..29, not them
    kb, vb = cache.update(0, 26, k[:, 36:37], v[:, 36:37])
    assert torch.equal(kb[:, 22:25], k[:, 22:25]) and torch.equal(kb[:, 25:27], k[:, 35:37])
    err = (kb[:, 18:22].float() - k[:, 18:22].float()).norm() / k[:, 18:22].float().norm()
    assert 0 < err < 0.2
    assert cache.ring_lo[0] == 22 and cache.ring_end[0] == 27


def test_reading_back_in_pieces_gives_the_same_values(monkeypatch) -> None:
    """The quantized span is read back SLAB positions at a time (bounded, reusable temporaries): any
    piece size gives the very values of one piece for the whole span."""
    import app.engine.kv_quant as kvq

    torch.manual_seed(4)
    k, v = torch.randn(1, 150, 3, 64).half(), torch.randn(1, 150, 3, 64).half()
    reads = []
    for slab in (4096, 7):
        monkeypatch.setattr(kvq, "SLAB", slab)
        cache = KVCache.allocate(config(64), 160, "cpu", torch.float16, mode="q4")
        cache.update(0, 0, k[:, :140], v[:, :140])
        reads.append(cache.update(0, 140, k[:, 140:], v[:, 140:]))
    assert torch.equal(reads[0][0], reads[1][0]) and torch.equal(reads[0][1], reads[1][1])


@pytest.fixture(scope="module")
def engine(smollm2_fp16_dir) -> Engine:
    return Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=1024)


@pytest.fixture(scope="module")
def fp16_ppl(engine, reference_dir) -> tuple[list[list[int]], float]:
    rows = np.load(reference_dir / "ppl_ids.npy")[:2].tolist()
    return rows, Generator(engine.model, engine.tokenizer, 1024, "fp16").perplexity(rows)


@pytest.mark.parametrize("mode", ["q8", "q6", "q4"])
def test_perplexity_change_vs_fp16_cache(engine, fp16_ppl, mode: str) -> None:
    rows, base = fp16_ppl
    ppl = Generator(engine.model, engine.tokenizer, 1024, mode).perplexity(rows)
    change = (ppl / base - 1) * 100
    assert abs(change) <= PPL_LIMIT[mode], f"{mode}: {ppl:.4f} vs {base:.4f} ({change:+.2f}%)"


# Greedy text is only checked for Q8: on this chat prompt the fp16 model's first token is a near tie
# ("The" 0.152 vs "L" 0.140), so any cache error of Q6/Q4 size may flip it while the distribution stays
# close. The distributions themselves are checked for every mode below.
@pytest.mark.parametrize("mode", ["q8"])
def test_greedy_decode_with_a_quantized_cache_is_sensible(smollm2_fp16_dir, reference_dir, mode: str) -> None:
    engine = Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=256, cache_mode=mode)
    assert engine.info.cache_mode == mode
    prompt = np.load(reference_dir / "prompt_ids.npy")[0].tolist()
    text, last = engine.generator.generate(prompt, GenerationSettings(max_new_tokens=12, samplers={"temperature": 0}))
    assert "Paris" in text and last.finish_reason in ("stop", "length")


# KL(fp16 cache || quantized cache) of the next-token distribution, mean over positions; measured on
# the fixture: q8 0.00007, q6 0.0026, q4 0.027 (chat prompt) and 0.00006 / 0.0010 / 0.015 (text row).
KL_LIMIT = {"q8": 0.001, "q6": 0.01, "q4": 0.05}


@pytest.mark.parametrize("mode", ["q8", "q6", "q4"])
def test_next_token_distributions_stay_close_to_the_fp16_cache(engine, reference_dir, mode: str) -> None:
    """Per position of the chat prompt and a text row: small KL, and the same argmax wherever fp16 is
    confident (top-1 ahead of top-2 by more than 0.2)."""
    model = engine.model
    prompts = [np.load(reference_dir / "prompt_ids.npy")[0].tolist(), np.load(reference_dir / "ppl_ids.npy")[0].tolist()]
    for ids in prompts:
        logprobs = {}
        for m in ("fp16", mode):
            with torch.no_grad():
                cache = model.allocate_cache(len(ids) + 8, mode=m)
                logits = model.forward(torch.tensor([ids]), cache, 0).float().reshape(len(ids), -1)
            logprobs[m] = logits.log_softmax(-1)
        ref, got = logprobs["fp16"], logprobs[mode]
        kl = (ref.exp() * (ref - got)).sum(-1)
        assert kl.mean() < KL_LIMIT[mode], f"{mode}, {len(ids)} tokens: mean KL {kl.mean():.5f}"
        top2 = ref.exp().topk(2).values
        confident = (top2[:, 0] - top2[:, 1]) > 0.2
        agree = (got.argmax(-1) == ref.argmax(-1))[confident].float().mean()
        assert confident.sum() > 10 and agree >= 0.99, f"{mode}: argmax agreement {agree:.3f} where fp16 is confident"


def test_fixed_overhead_is_what_the_planner_counts() -> None:
    """Beyond the per-token storage: the exact sink/recent copies and key means (planner's kv_scratch
    counts these plus the read-back buffers and one layer's temporaries)."""
    from app.engine.kv_quant import EXACT_TOKENS, RECENT_TOKENS

    cfg = config(64, kv_heads=3, layers=3)
    cache = KVCache.allocate(cfg, 100, "cpu", torch.float16, mode="q8")
    k = torch.randn(1, 10, 3, 64).half()
    for layer in range(3):
        cache.update(layer, 0, k, k)
    kv_dim = 3 * 64
    exact = 3 * kv_dim * 2 * (2 * (EXACT_TOKENS + RECENT_TOKENS) + 1)
    assert cache.overhead_bytes() == exact + 2 * 100 * kv_dim * 2

"""Transformer.decode_step (positions on the device, the CUDA-graph path) against forward().

decode_step must give the same logits as the ordinary cached forward at every position, for every
architecture trait that touches attention (GQA, q/k norm, sliding window, rope scaling), and must
leave the cache holding the same keys and values. Runs on the CPU with the pure-PyTorch backend; the
GPU tests run the same comparison on the CUDA kernels and inside a captured graph.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine import load_model
from tests.test_architectures import build, prompt

CASES = {
    "llama": None,
    "qwen3": None,
    "yarn-rope": None,
    "window": ("MistralForCausalLM", {"sliding_window": 8, "head_dim": 16}, 12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_step_matches_forward(tmp_path: Path, case: str) -> None:
    _, folder, length = build(tmp_path, case, spec=CASES[case])
    model = load_model(str(folder), "cpu")
    ids = prompt(length + 6)
    eager = model.allocate_cache(64)
    static = model.allocate_cache(64)
    model.forward(ids[:, :length], eager, 0)
    model.forward(ids[:, :length], static, 0)
    model.prepare_decode(static.max_seq_len)
    for pos in range(length, length + 6):
        tok = ids[:, pos:pos + 1]
        want = model.forward(tok, eager, pos)[0, -1]
        got = model.decode_step(tok, torch.tensor([pos], dtype=torch.int32), static)[0]
        assert torch.allclose(got, want, atol=2e-4, rtol=0), f"{case} at position {pos}"
    n = length + 6
    for layer in range(model.config.num_layers):
        assert torch.allclose(static.keys[layer][:, :n], eager.keys[layer][:, :n], atol=1e-5)
        assert torch.allclose(static.values[layer][:, :n], eager.values[layer][:, :n], atol=1e-5)


def test_decode_step_rows_at_different_positions(tmp_path: Path) -> None:
    """Batched rows each attend only to their own first pos+1 keys."""
    _, folder, _ = build(tmp_path, "llama")
    model = load_model(str(folder), "cpu")
    a, b = prompt(10, seed=1), prompt(17, seed=2)
    cache = model.allocate_cache(64, batch=2)
    single = [model.allocate_cache(64), model.allocate_cache(64)]
    model.prepare_decode(64)
    # fill each row token by token through decode_step, then compare the next step with single runs
    for i, row in enumerate((a, b)):
        model.forward(row[:, :-1], single[i], 0)
    rows = [a, b]
    # each row's prompt goes in one token per step; a shorter row rewrites its last prompt token
    for pos in range(max(a.shape[1], b.shape[1]) - 1):
        tokens = torch.stack([rows[i][0, min(pos, rows[i].shape[1] - 2)] for i in range(2)]).view(2, 1)
        positions = torch.tensor([min(pos, rows[i].shape[1] - 2) for i in range(2)], dtype=torch.int32)
        model.decode_step(tokens, positions, cache)
    tokens = torch.stack([a[0, -1], b[0, -1]]).view(2, 1)
    positions = torch.tensor([a.shape[1] - 1, b.shape[1] - 1], dtype=torch.int32)
    got = model.decode_step(tokens, positions, cache)
    for i, row in enumerate(rows):
        want = model.forward(row[:, -1:], single[i], row.shape[1] - 1)[0, -1]
        assert torch.allclose(got[i], want, atol=2e-4, rtol=0), f"row {i}"


def test_chunked_prefill_without_a_mask_equals_the_explicit_mask(tmp_path: Path, monkeypatch) -> None:
    """Later prefill chunks use SDPA's lower-right causal bias (no t x s mask); where SDPA rejects it
    the backend falls back to an explicit mask. Both give the same logits as one whole prefill."""
    from app.engine.backend import TorchBackend

    _, folder, length = build(tmp_path, "llama")
    model = load_model(str(folder), "cpu")
    ids = prompt(3 * length)

    def chunked() -> torch.Tensor:
        cache = model.allocate_cache(ids.shape[1])
        outs = [model.forward(ids[:, i:i + length], cache, i) for i in range(0, ids.shape[1], length)]
        return torch.cat(outs, dim=1)

    whole = model.forward(ids, model.allocate_cache(ids.shape[1]), 0)
    bias = chunked()
    monkeypatch.setattr(TorchBackend, "_lower_right_ok", False)
    mask = chunked()
    assert torch.allclose(bias, whole, atol=2e-4, rtol=0)
    assert torch.allclose(mask, bias, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", ["q4", "q8"])
def test_decode_step_with_a_quantized_cache(tmp_path: Path, mode: str) -> None:
    """A quantized cache in decode_step (the backend's kv_quant_decode; here through QuantKVCache.update)
    gives forward()'s logits, before and after a truncate, and keeps its ring bookkeeping."""
    _, folder, length = build(tmp_path, "llama")
    model = load_model(str(folder), "cpu")
    ids = prompt(length + 12)
    eager = model.allocate_cache(64, mode=mode)
    static = model.allocate_cache(64, mode=mode)
    model.forward(ids[:, :length], eager, 0)
    model.forward(ids[:, :length], static, 0)
    model.prepare_decode(static.max_seq_len)
    steps = list(range(length, length + 8)) + list(range(length + 4, length + 12))
    for i, pos in enumerate(steps):
        if i == 8:  # regenerate from length + 4: both caches forget the rest
            eager.truncate(pos)
            static.truncate(pos)
        assert static.decode_ready(pos)
        tok = ids[:, pos:pos + 1] if i < 8 else ids[:, pos - 3:pos - 2]
        want = model.forward(tok, eager, pos)[0, -1]
        got = model.decode_step(tok, torch.tensor([pos], dtype=torch.int32), static)[0]
        static.decoded(pos)
        static.length = pos + 1  # what DecodeGraph.step does after a replay
        assert torch.allclose(got, want, atol=2e-4, rtol=0), f"{mode} at step {i}"
    assert static.ring_lo == eager.ring_lo and static.ring_end == eager.ring_end


def test_decode_step_over_rows_sharing_one_cache(tmp_path: Path) -> None:
    """Speculative drafts' check as one decode step (graphs.SharedRows): k+1 tokens of one sequence as
    rows at consecutive positions give forward()'s logits over the same tokens, and the same cache."""
    from app.engine.graphs import SharedRows

    _, folder, length = build(tmp_path, "llama")
    model = load_model(str(folder), "cpu")
    ids = prompt(length + 5)
    eager, static = model.allocate_cache(64), model.allocate_cache(64)
    model.forward(ids[:, :length], eager, 0)
    model.forward(ids[:, :length], static, 0)
    want = model.forward(ids[:, length:], eager, length)[0]
    model.prepare_decode(64)
    positions = torch.arange(length, length + 5, dtype=torch.int32)
    got = model.decode_step(ids[0, length:].view(-1, 1), positions, SharedRows(static, 5))  # type: ignore[arg-type]
    assert torch.allclose(got, want, atol=2e-4, rtol=0)
    for layer in range(model.config.num_layers):
        assert torch.allclose(static.keys[layer][:, :length + 5], eager.keys[layer][:, :length + 5], atol=1e-5)
        assert torch.allclose(static.values[layer][:, :length + 5], eager.values[layer][:, :length + 5], atol=1e-5)

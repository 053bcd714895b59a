"""Loading real weights: the fp16 fixture against transformers, and EXL2 folders from our writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine import load_model


@pytest.fixture(scope="module")
def prompt_ids(reference_dir) -> torch.Tensor:
    return torch.tensor(np.load(reference_dir / "prompt_ids.npy"))


@pytest.fixture(scope="module")
def fp16_model(smollm2_fp16_dir):
    return load_model(smollm2_fp16_dir, device="cpu")


def test_fp16_logits_match_transformers(smollm2_fp16_dir, fp16_model, prompt_ids) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_fp16_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(prompt_ids).logits
    ours = fp16_model.forward(prompt_ids)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert (ours - ref).abs().max().item() < 1e-3


def test_fp16_greedy_answer(fp16_model, smollm2_fp16_dir, prompt_ids) -> None:
    from app.engine.generator import Generator
    from app.engine.tokenizer import Tokenizer
    from app.engine.types import GenerationSettings

    tok = Tokenizer.from_folder(smollm2_fp16_dir)
    text, last = Generator(fp16_model, tok, max_seq_len=256).generate(
        prompt_ids[0].tolist(), GenerationSettings(max_new_tokens=20, samplers={"temperature": 0}))
    assert text == "The capital of France is Paris."
    assert last.finish_reason == "stop"


def test_dequantized_weight_of_fp16_model_is_the_stored_weight(fp16_model, smollm2_fp16_dir) -> None:
    from safetensors import safe_open

    with safe_open(f"{smollm2_fp16_dir}/model.safetensors", "pt") as f:
        stored = f.get_tensor("model.layers.3.mlp.down_proj.weight")
    w = fp16_model.dequantized_weight("model.layers.3.mlp.down_proj")
    assert w.dtype == torch.float16 and w.shape == (576, 1536)
    assert torch.equal(w, stored)


def test_exl2_mixed_folder_loads_every_width_and_tracks_fp16(smollm2_exl2_mixed, fp16_model, prompt_ids) -> None:
    """All of 2/3/4/5/6/8 bits, act-order everywhere, quantized head: weights near the originals."""
    m = load_model(smollm2_exl2_mixed, device="cpu")
    assert m.config.quant is not None and m.config.quant.head_bits == 6
    widths = set()
    from app.engine.safetensors_io import TensorStore

    store = TensorStore(smollm2_exl2_mixed)
    for name in store.names():
        if name.endswith(".q_groups"):
            widths.update(store.get(name).tolist()[0::2])
    assert widths == {2, 3, 4, 5, 6, 8}
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.4.mlp.down_proj", "lm_head"):
        w = m.dequantized_weight(key).float()
        ref = fp16_model.dequantized_weight(key).float()
        assert w.shape == ref.shape
        rel = (w - ref).norm() / ref.norm()
        assert rel < 0.35, key  # 2-bit groups are coarse, but far from random (rel ~1.4)
    logits = m.forward(prompt_ids)
    assert torch.isfinite(logits).all()


def test_exl2_q8_matches_fp16_closely(smollm2_exl2_q8, fp16_model, prompt_ids) -> None:
    m = load_model(smollm2_exl2_q8, device="cpu")
    a = fp16_model.forward(prompt_ids)[0]
    b = m.forward(prompt_ids)[0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    overlap = np.mean([len(set(a[i].topk(20).indices.tolist()) & set(b[i].topk(20).indices.tolist()))
                       for i in range(a.shape[0])])
    assert agree >= 0.85 and overlap >= 17

"""RoPE against transformers: every scaling type the engine claims, value for value.

The reference is transformers' own code: ROPE_INIT_FUNCTIONS (inverse frequencies and the attention
factor), LlamaRotaryEmbedding (cos/sin tables, including dynamic NTK's recomputation) and
apply_rotary_pos_emb (the rotation). Each case is written once as a raw config.json dict in the
pre-5.x layout (`rope_theta` and `rope_scaling` at the top level); transformers builds its config from
it, and we parse both that dict and the 5.x layout transformers writes back (`rope_parameters`).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from app.engine.config import ModelConfig  # noqa: E402
from app.engine.errors import ConfigError  # noqa: E402
from app.engine.rope import apply_rope, inv_freq_for, rope_tables  # noqa: E402

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32,
}

# name -> (extra config.json fields, sequence lengths to evaluate at: None = at load time)
CASES: dict[str, tuple[dict[str, Any], tuple[int | None, ...]]] = {
    "default": ({"rope_theta": 10000.0, "max_position_embeddings": 2048}, (None,)),
    "default-qwen-theta": ({"rope_theta": 1_000_000.0, "max_position_embeddings": 32768}, (None,)),
    "linear": ({"rope_theta": 10000.0, "max_position_embeddings": 4096,
                "rope_scaling": {"type": "linear", "factor": 4.0}}, (None,)),
    "dynamic": ({"rope_theta": 10000.0, "max_position_embeddings": 4096,
                 "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, (None, 1000, 4096, 4097, 12000)),
    # transformers' dynamic type ignores an original_max_position_embeddings here (and warns)
    "dynamic-with-original": ({"rope_theta": 10000.0, "max_position_embeddings": 8192,
                               "rope_scaling": {"rope_type": "dynamic", "factor": 2.0,
                                                "original_max_position_embeddings": 4096}},
                              (None, 6000, 8192, 12000)),
    "llama3.1": ({"rope_theta": 500000.0, "max_position_embeddings": 131072,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, (None,)),
    "llama3.2": ({"rope_theta": 500000.0, "max_position_embeddings": 131072,
                  "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, (None,)),
    # transformers fills original_max_position_embeddings from max_position_embeddings when absent
    "llama3-no-original": ({"rope_theta": 500000.0, "max_position_embeddings": 16384,
                            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0}}, (None,)),
    "yarn-qwen2.5": ({"rope_theta": 1_000_000.0, "max_position_embeddings": 32768,
                      "rope_scaling": {"type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 32768}}, (None,)),
    "yarn-betas": ({"rope_theta": 10000.0, "max_position_embeddings": 16384,
                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                     "beta_fast": 16, "beta_slow": 2}}, (None,)),
    "yarn-mscale": ({"rope_theta": 10000.0, "max_position_embeddings": 16384,
                     "rope_scaling": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                      "mscale": 0.707, "mscale_all_dim": 0.707}}, (None,)),
    "yarn-mscale-unequal": ({"rope_theta": 10000.0, "max_position_embeddings": 16384,
                             "rope_scaling": {"rope_type": "yarn", "factor": 40.0,
                                              "original_max_position_embeddings": 4096,
                                              "mscale": 1.0, "mscale_all_dim": 0.5}}, (None,)),
    "yarn-attention-factor": ({"rope_theta": 10000.0, "max_position_embeddings": 16384,
                               "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.5,
                                                "original_max_position_embeddings": 4096}}, (None,)),
    "yarn-no-truncate": ({"rope_theta": 150000.0, "max_position_embeddings": 131072,
                          "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                           "beta_slow": 1.0, "truncate": False,
                                           "original_max_position_embeddings": 4096}}, (None,)),
    # transformers derives the factor from the two lengths when it is null (DeepSeek-style configs)
    "yarn-null-factor": ({"rope_theta": 10000.0, "max_position_embeddings": 16384,
                          "rope_scaling": {"rope_type": "yarn", "factor": None,
                                           "original_max_position_embeddings": 4096}}, (None,)),
}


def _hf_config(raw: dict[str, Any]) -> LlamaConfig:
    fields = {k: v for k, v in raw.items() if k != "architectures"}
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = dict(fields["rope_scaling"])  # transformers edits it in place
    return LlamaConfig(**fields)


def _hf_inv_freq(hf: LlamaConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """transformers' (inv_freq, attention_factor); its init functions take (config, device, seq_len)."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    fn = ROPE_INIT_FUNCTIONS.get(kind)
    if fn is None:  # transformers 5 keeps the plain type on the rotary module, not in the table
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    return fn(hf, "cpu", seq_len=seq_len)


def _ours(config: ModelConfig, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return inv_freq_for(config.head_dim, config.rope_theta, config.rope_scaling,
                        config.max_position_embeddings, seq_len)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_attention_factor_match_transformers(case: str, head_dim: int) -> None:
    """Both config.json layouts must give transformers' frequencies and attention factor exactly."""
    extra, lengths = CASES[case]
    raw = {**BASE, **extra, "hidden_size": head_dim * BASE["num_attention_heads"]}
    hf = _hf_config(raw)
    legacy = ModelConfig.from_dict(raw)
    modern = ModelConfig.from_dict({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    assert modern.rope_theta == legacy.rope_theta == raw["rope_theta"]
    for seq_len in lengths:
        want_freq, want_attn = _hf_inv_freq(hf, seq_len)
        for config in (legacy, modern):
            freq, attn = _ours(config, seq_len)
            assert freq.shape == (head_dim // 2,) and freq.dtype == torch.float32
            torch.testing.assert_close(freq, want_freq.float(), rtol=1e-6, atol=0)
            assert attn == pytest.approx(want_attn, rel=1e-9), (case, seq_len)


def test_the_cases_are_not_all_the_plain_rope() -> None:
    """Guard: every scaled case must really move some frequency (or the attention factor)."""
    plain, _ = inv_freq_for(128, 10000.0, None, 4096)
    for case, (extra, _lengths) in CASES.items():
        if "rope_scaling" not in extra:
            continue
        config = ModelConfig.from_dict({**BASE, **extra, "hidden_size": 512})
        plain, _ = inv_freq_for(128, config.rope_theta, None, config.max_position_embeddings)
        seq_len = 3 * config.max_position_embeddings
        freq, attn = _ours(config, seq_len)
        assert not torch.allclose(freq, plain) or attn != 1.0, case


def test_yarn_attention_factor_values() -> None:
    """The factor that multiplies cos and sin: 0.1*ln(s)+1, its mscale ratio, or the explicit value."""
    cfg = ModelConfig.from_dict({**BASE, **CASES["yarn-betas"][0]})
    assert _ours(cfg, None)[1] == pytest.approx(0.1 * math.log(4.0) + 1.0)
    cfg = ModelConfig.from_dict({**BASE, **CASES["yarn-mscale-unequal"][0]})
    assert _ours(cfg, None)[1] == pytest.approx((0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1))
    cfg = ModelConfig.from_dict({**BASE, **CASES["yarn-mscale"][0]})
    assert _ours(cfg, None)[1] == pytest.approx(1.0)
    cfg = ModelConfig.from_dict({**BASE, **CASES["yarn-attention-factor"][0]})
    assert _ours(cfg, None)[1] == 1.5


@pytest.mark.parametrize("case", ["default", "linear", "llama3.1", "yarn-betas", "yarn-mscale-unequal"])
def test_cos_sin_tables_and_rotation_match_transformers(case: str) -> None:
    """rope_tables + apply_rope == LlamaRotaryEmbedding + apply_rotary_pos_emb at positions 0..299."""
    extra, _ = CASES[case]
    raw = {**BASE, **extra, "hidden_size": 256}  # head_dim 64
    hf = _hf_config(raw)
    ours = ModelConfig.from_dict(raw)
    length = 300
    positions = torch.arange(length)[None]
    x = torch.randn(1, length, 64, generator=torch.Generator().manual_seed(1))
    want_cos, want_sin = LlamaRotaryEmbedding(hf)(x, positions)
    freq, attn = _ours(ours, None)
    cos, sin = rope_tables(freq, attn, length, "cpu", torch.float32)
    torch.testing.assert_close(cos, want_cos[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, want_sin[0], rtol=0, atol=2e-5)

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, length, 4, 64, generator=gen)  # ours: (batch, seq, heads, dim)
    k = torch.randn(2, length, 2, 64, generator=gen)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), want_cos, want_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), want_q.transpose(1, 2), rtol=0, atol=1e-4)
    torch.testing.assert_close(apply_rope(k, cos, sin), want_k.transpose(1, 2), rtol=0, atol=1e-4)


def test_dynamic_ntk_follows_the_length_like_transformers_rotary_module() -> None:
    """transformers recomputes dynamic NTK frequencies from the longest position in each call.

    Within max_position_embeddings the frequencies are the plain ones; past it they are those of
    inv_freq_for(..., seq_len=longest). The engine calls inv_freq_for once, with the KV cache's
    length (Transformer.set_rope_length, from allocate_cache): test_architectures checks the logits.
    """
    raw = {**BASE, **CASES["dynamic"][0], "hidden_size": 256}
    hf = _hf_config(raw)
    ours = ModelConfig.from_dict(raw)
    rotary = LlamaRotaryEmbedding(hf)
    x = torch.zeros(1, 1, 64)
    for longest in (100, 4096, 6000, 9000):
        cos, _ = rotary(x, torch.tensor([[longest - 1]]))
        freq, _ = _ours(ours, longest)
        torch.testing.assert_close(cos[0, 0], torch.cat([freq, freq]).mul(longest - 1).cos(), rtol=0, atol=2e-4)
    plain, _ = _ours(ours, None)
    assert torch.equal(_ours(ours, 4096)[0], plain)
    assert not torch.allclose(_ours(ours, 4097)[0], plain, rtol=1e-5, atol=0)


def test_rope_parameters_layout_of_transformers_5_is_read() -> None:
    """config.json from transformers >= 5 nests theta and scaling in `rope_parameters`."""
    raw = {**BASE, "max_position_embeddings": 131072,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    config = ModelConfig.from_dict(raw)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
    plain = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None


@pytest.mark.parametrize("rope, words", [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, ["rope_scaling", "longrope"]),
    ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, ["rope_parameters", "mrope"]),
    ({"rope_scaling": [1, 2]}, ["rope_scaling"]),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "default"}}}, ["per-layer"]),
    ({"rope_theta": "big"}, ["rope_theta"]),
    ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
])
def test_rope_settings_the_engine_cannot_run_are_config_errors(rope: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({**BASE, **rope}, path="/models/x/config.json")
    message = str(info.value)
    assert "/models/x/config.json" in message
    for word in words:
        assert word in message

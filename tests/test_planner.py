"""app.planner: exact weights from the real fixture's headers, the KV term from the engine's formula,
inverse functions consistent with the forward estimate, Llama-3-8B-shaped sanity numbers, NVML."""

from __future__ import annotations

import json
import os
import struct
from math import prod
from pathlib import Path

import pytest
from safetensors import safe_open

from app.engine.cache import CACHE_MODES, kv_bytes_per_token
from app.engine.config import ModelConfig
from app.engine.errors import KestrelError, ModelFormatError
from app.planner import (
    DOES_NOT_FIT,
    FITS,
    FITS_WITH_CHANGES,
    GPU_PRESETS,
    Overheads,
    PlannerError,
    best_branch,
    estimate,
    max_context,
    param_counts,
    read_gpus,
    spec_from_files,
    spec_from_folder,
    spec_from_params,
    unavailable_reason,
    verdict,
)

GIB = 1024 ** 3
SAFETENSORS_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2, "I64": 8, "U8": 1, "I8": 1}

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
}


def test_weights_term_equals_tensor_bytes_from_safetensors_itself(smollm2_fp16_dir: str) -> None:
    expected = numel = 0
    for name in os.listdir(smollm2_fp16_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(smollm2_fp16_dir, name), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    expected += prod(sl.get_shape()) * SAFETENSORS_BYTES[sl.get_dtype()]
                    numel += prod(sl.get_shape())
    spec = spec_from_folder(smollm2_fp16_dir)
    assert spec.weight_bytes == expected
    assert estimate(spec, 1024, "fp16").weights == expected
    assert spec.bpw is None and spec.bits_per_weight == 16.0
    assert param_counts(spec.config).total == numel  # geometry-based count agrees with the real file


def test_hub_file_sizes_and_param_counts_agree_with_the_folder(smollm2_fp16_dir: str) -> None:
    folder = spec_from_folder(smollm2_fp16_dir)
    with open(os.path.join(smollm2_fp16_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    sizes = {n: os.path.getsize(os.path.join(smollm2_fp16_dir, n)) for n in os.listdir(smollm2_fp16_dir)}
    from_files = spec_from_files(raw, sizes, name="main")
    overhead = from_files.weight_bytes - folder.weight_bytes   # = the headers: 8 + JSON each
    assert 0 < overhead < 100_000
    fp16_plan = spec_from_params(raw, bpw=16.0, head_bits=16)  # tied head at 16 bits is shared
    assert fp16_plan.weight_bytes == folder.weight_bytes
    with pytest.raises(PlannerError, match="no .safetensors"):
        spec_from_files(raw, {"model.gguf": 10, "config.json": 5})


def test_kv_term_is_the_engines_formula(smollm2_fp16_dir: str) -> None:
    spec = spec_from_folder(smollm2_fp16_dir)
    for mode in CACHE_MODES:
        for context, batch in ((1, 1), (777, 1), (4096, 3)):
            e = estimate(spec, context, mode, batch=batch)
            assert e.kv_cache == kv_bytes_per_token(spec.config, mode) * context * batch
            assert e.total == sum(e.terms().values())
    assert estimate(spec, 4096, "q4").kv_cache < estimate(spec, 4096, "q8").kv_cache < \
        estimate(spec, 4096, "fp16").kv_cache


def test_activation_terms_follow_the_documented_formulas(smollm2_fp16_dir: str) -> None:
    spec = spec_from_folder(smollm2_fp16_dir)
    c = spec.config
    o = Overheads()
    e = estimate(spec, 8192, "fp16", chunk_size=512, batch=2)
    assert e.activations == 2 * 512 * 2 * (2 * c.hidden_size + 2 * c.q_dim + 2 * c.kv_dim + 3 * c.intermediate_size) \
        + o.workspace_bytes
    assert e.logits == 2 * c.vocab_size * 4                   # chat: the last position's logits only
    assert e.kv_scratch == 0 and e.kernel_layout == 0         # fp16 caches are read in place; fp16 weights as stored
    assert e.decode_graph == o.graph_bytes and e.cuda_context == o.cuda_context_bytes
    q4 = estimate(spec, 8192, "q4", chunk_size=512, batch=2)
    from app.engine.kv_quant import EXACT_TOKENS, RECENT_TOKENS, SLAB

    exact = 2 * c.num_layers * c.kv_dim * 2 * (2 * (EXACT_TOKENS + RECENT_TOKENS) + 1)
    read_back, pieces = 2 * 8192 * c.kv_dim * 4, 2 * SLAB * c.kv_dim * 16
    assert q4.kv_scratch == read_back + pieces + exact         # read-back buffers + one piece's fp32 temporaries
    assert q4.decode_graph == o.graph_bytes                    # quantized caches decode in a graph too
    assert e.allocator == int(spec.weight_bytes * o.allocator_fraction) + o.allocator_fixed_bytes


def test_slots_multiply_the_kv_cache_only(smollm2_fp16_dir: str) -> None:
    spec = spec_from_folder(smollm2_fp16_dir)
    one, two = estimate(spec, 4096, "q8"), estimate(spec, 4096, "q8", slots=2)
    assert two.kv_cache == 2 * one.kv_cache and two.kv_scratch == one.kv_scratch
    with pytest.raises(PlannerError, match="slots"):
        estimate(spec, 4096, "q8", slots=0)


def test_estimate_tracks_the_h100_measurements(smollm2_fp16_dir: str) -> None:
    """NVML's peak used memory measured on an H100 (docs/MEASUREMENTS.md, session 5: SmolLM2-135M fp16,
    the context filled in 2048-token chunks, then decode steps in the CUDA graph, q4 included): the
    estimate is within 5 %."""
    spec = spec_from_folder(smollm2_fp16_dir)
    nvml_peak_mib = {(2048, "fp16"): 1244, (2048, "q4"): 1200, (8192, "fp16"): 1354, (8192, "q4"): 1212,
                     (32768, "fp16"): 1880, (32768, "q4"): 1400}
    for (context, mode), mib in nvml_peak_mib.items():
        ratio = estimate(spec, context, mode).total / (mib * 2 ** 20)
        assert 0.95 <= ratio <= 1.05, (context, mode, ratio)


def test_llama3_8b_shape_gives_plausible_numbers() -> None:
    fp16 = spec_from_params(LLAMA3_8B, bpw=16.0, head_bits=16)
    assert param_counts(fp16.config).total == 8_030_261_248   # Meta-Llama-3-8B's published parameter count
    e = estimate(fp16, 8192, "fp16")
    assert e.kv_cache == 1 * GIB   # 32 layers x 8 kv heads x 128 dim x 2 (k, v) x 2 bytes x 8192 tokens
    assert e.kv_cache == 32 * 8 * 128 * 2 * 2 * 8192
    assert 14.5 * GIB < e.weights < 15.5 * GIB
    q4 = spec_from_params(LLAMA3_8B, bpw=4.0, head_bits=6)
    assert 4.3 * GIB < q4.weight_bytes < 5.0 * GIB             # EXL2 4.0 bpw repos are ~5 GB
    assert estimate(q4, 8192, "q4").kv_cache == GIB * (128 * 4 // 8 + 4 * 2) // (128 * 2)  # 4-bit + fp16 scale/32
    total = estimate(q4, 8192, "fp16").total
    assert 6 * GIB < total < 12 * GIB                           # runs on a 12 GB card, not on a 6 GB one
    assert verdict(estimate(q4, 8192, "fp16"), 23 * GIB).level == FITS


@pytest.mark.parametrize("mode", list(CACHE_MODES))
def test_max_context_is_the_exact_inverse(smollm2_fp16_dir: str, mode: str) -> None:
    spec = spec_from_folder(smollm2_fp16_dir)
    for free in (int(1.2 * GIB), 2 * GIB, 5 * GIB):
        n = max_context(spec, free, mode)
        assert n > 0
        assert estimate(spec, n, mode).total <= free
        assert estimate(spec, n + 1, mode).total > free
    assert max_context(spec, 100 * 1024 ** 2, mode) == 0        # not even the weights fit
    assert max_context(spec, 5 * GIB, mode, limit=8192) == 8192


def test_smaller_cache_modes_allow_longer_contexts() -> None:
    q4 = spec_from_params(LLAMA3_8B, bpw=4.0, head_bits=6)
    free = 12 * GIB
    contexts = [max_context(q4, free, mode, chunk_size=512) for mode in ("fp16", "q8", "q6", "q4")]
    assert contexts == sorted(contexts) and contexts[0] < contexts[-1]
    assert 8192 < contexts[0] < 200_000


def test_best_branch_picks_the_highest_bpw_that_fits() -> None:
    branches = [(f"{b}bpw", spec_from_params(LLAMA3_8B, bpw=b, head_bits=6)) for b in (3.0, 4.0, 5.0, 6.0, 8.0)]
    free = 8 * GIB
    name, spec = best_branch(branches, free, 4096, "fp16", chunk_size=512) or ("", None)
    assert spec is not None
    assert estimate(spec, 4096, "fp16", chunk_size=512).total <= free
    higher = [s for _, s in branches if s.bits_per_weight > spec.bits_per_weight]
    assert higher and all(estimate(s, 4096, "fp16", chunk_size=512).total > free for s in higher)
    assert name == "5.0bpw"  # ~7.2 GiB with a 4k cache; 6.0 bpw is just over 8 GiB
    assert best_branch(branches, 2 * GIB, 4096, "fp16") is None


def test_verdict_levels_and_suggestions_that_really_fit() -> None:
    q4 = spec_from_params(LLAMA3_8B, bpw=4.0, head_bits=6)
    e = estimate(q4, 16384, "fp16", chunk_size=512)            # ~8.2 GiB
    free = int(7.5 * GIB)
    v = verdict(e, free)
    assert v.level == FITS_WITH_CHANGES and v.needed_bytes == e.total > free
    assert "does not fit" in v.text.lower() and "GiB" in v.text
    by_kind = {s.kind: s for s in v.suggestions}
    assert {"cache_mode", "context", "bpw"} <= set(by_kind)
    assert by_kind["cache_mode"].value == "q8"                   # the least lossy cache that fits
    assert by_kind["bpw"].value < 4.0
    for s in v.suggestions:                                      # every suggestion really fits
        assert s.total_bytes <= free, s
    n = by_kind["context"].value
    assert estimate(q4, n, "fp16", chunk_size=512).total <= free  # type: ignore[arg-type]
    assert n % 256 == 0 and 8192 < n < 16384                     # type: ignore[operator]

    tight = 7 * GIB                                              # even the Q4 cache needs ~7.5 GiB at 32k
    long = verdict(estimate(q4, 32768, "fp16"), tight)           # only shorter contexts help here
    assert long.level == FITS_WITH_CHANGES
    combined = next(s for s in long.suggestions if s.kind == "cache_mode+context")
    mode, ctx = combined.value  # type: ignore[misc]
    assert estimate(q4, ctx, mode).total <= tight < estimate(q4, ctx + 256, mode).total

    fits = verdict(estimate(q4, 4096, "q4", chunk_size=512), free)
    assert fits.level == FITS and fits.suggestions == () and fits.spare_bytes > 0

    nope = verdict(estimate(spec_from_params(LLAMA3_8B, 16.0, 16), 4096, "fp16"), 2 * GIB)
    assert nope.level == DOES_NOT_FIT and nope.suggestions == () and "smaller model" in nope.text


def test_bad_requests_raise_planner_errors(smollm2_fp16_dir: str, tmp_path: Path) -> None:
    spec = spec_from_folder(smollm2_fp16_dir)
    with pytest.raises(PlannerError, match="cache mode"):
        estimate(spec, 1024, "q3")
    with pytest.raises(PlannerError, match="context"):
        estimate(spec, 0, "fp16")
    with pytest.raises(PlannerError, match="bits per weight"):
        spec_from_params(LLAMA3_8B, bpw=0.5)
    # A truncated shard: the header says more data than the file holds.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(LLAMA3_8B))
    header = json.dumps({"w": {"dtype": "F16", "shape": [1024, 1024], "data_offsets": [0, 2 * 1024 * 1024]}}).encode()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    with pytest.raises(ModelFormatError, match="model.safetensors") as info:
        spec_from_folder(str(bad))
    assert isinstance(info.value, KestrelError) and "download" in str(info.value)


def test_config_geometry_comes_from_the_engine(smollm2_fp16_dir: str) -> None:
    spec = spec_from_folder(smollm2_fp16_dir)
    assert spec.config == ModelConfig.from_folder(smollm2_fp16_dir)


def test_read_gpus_never_raises() -> None:
    gpus = read_gpus()
    assert isinstance(gpus, list)
    if gpus:
        assert unavailable_reason() is None
        for g in gpus:
            assert g.total_bytes > 0 and 0 <= g.free_bytes <= g.total_bytes and g.name and g.driver_version
    else:
        reason = unavailable_reason()
        assert isinstance(reason, str) and reason
    sizes = sorted(p.total_bytes // GIB for p in GPU_PRESETS)
    assert {8, 12, 16, 24, 48, 80} <= set(sizes)
    assert all(0 < p.free_bytes < p.total_bytes for p in GPU_PRESETS)

"""LoRA adapters on the real SmolLM2 fixture: run-time application equals the merged delta (fp16 and
EXL2), rsLoRA, several adapters, per-request selection, prompt-cache keying and wrong-base errors."""

from __future__ import annotations

import json

import pytest
import torch

from app.engine.errors import GenerationError, ModelFormatError
from app.engine.lora import LoraError, lora_scale
from app.engine.session import Engine
from app.engine.types import GenerationSettings
from tests.lora_fixtures import MLP, scale_of, write_adapter

GREEDY = {"temperature": 0}
IDS = [1, 504, 3458, 282, 4649, 314, 2545, 30, 378, 5646, 314, 253, 3572, 29]


@pytest.fixture(scope="module")
def fp16(smollm2_fp16_dir) -> Engine:
    return Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=256)


@pytest.fixture(scope="module")
def exl2(smollm2_exl2_mixed) -> Engine:
    return Engine.load(smollm2_exl2_mixed, "cpu", max_seq_len=256)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smollm2_fp16_dir) -> dict:
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": (root / "a", write_adapter(root / "a", smollm2_fp16_dir, rank=4, alpha=8, seed=1), scale_of(4, 8)),
        "b": (root / "b", write_adapter(root / "b", smollm2_fp16_dir, rank=8, alpha=4, seed=2,
                                        targets=("q_proj", "v_proj", "down_proj")), scale_of(8, 4)),
        "rs": (root / "rs", write_adapter(root / "rs", smollm2_fp16_dir, rank=16, alpha=8, rslora=True, seed=3,
                                          targets=MLP), scale_of(16, 8, True)),
    }


def logits_with(engine: Engine, selection: dict[str, float]) -> torch.Tensor:
    """Logits of IDS through the real path: the generator's adapter selection, then forward."""
    engine.generator._use_loras(selection)
    return engine.model.forward(torch.tensor([IDS]))[0]


def merged_logits(engine: Engine, deltas: list[tuple[dict, float]]) -> torch.Tensor:
    """Reference: the same model with s * B @ A added into its dense weights (restored afterwards)."""
    model = engine.model
    engine.generator._use_loras({})
    linears = model.linears()
    saved = {}
    try:
        for factors, s in deltas:
            for module, (a, b) in factors.items():
                w = linears[module].weight
                saved.setdefault(module, w.clone())
                w += (s * (b @ a)).to(w.dtype)
        return model.forward(torch.tensor([IDS]))[0]
    finally:
        for module, w in saved.items():
            linears[module].weight.copy_(w)


def load(engine: Engine, adapters: dict, *names: str) -> None:
    have = {i.name for i in engine.loras()}
    for name in names:
        if name not in have:
            engine.load_lora(str(adapters[name][0]), name)


def test_fp16_adapter_equals_merged_weights(fp16, adapters) -> None:
    load(fp16, adapters, "a")
    base = logits_with(fp16, {})
    weights_before = fp16.model.dequantized_weight("model.layers.3.mlp.up_proj").clone()
    got = logits_with(fp16, {"a": 1.0})
    _, factors, s = adapters["a"]
    want = merged_logits(fp16, [(factors, s)])
    assert (got - base).abs().max() > 0.5  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3)
    # applied beside the weight, never merged into it
    assert torch.equal(fp16.model.dequantized_weight("model.layers.3.mlp.up_proj"), weights_before)


def test_exl2_adapter_changes_logits_by_exactly_the_delta(exl2, adapters) -> None:
    load(exl2, adapters, "a")
    base = logits_with(exl2, {})
    got = logits_with(exl2, {"a": 1.0})
    _, factors, s = adapters["a"]
    want = merged_logits(exl2, [(factors, s)])
    assert (got - base).abs().max() > 0.5
    torch.testing.assert_close(got - base, want - base, rtol=1e-3, atol=5e-3)


def test_rslora_scales_by_sqrt_rank(fp16, adapters) -> None:
    assert lora_scale(8, 16, True) == pytest.approx(2.0) and lora_scale(8, 16, False) == pytest.approx(0.5)
    load(fp16, adapters, "rs")
    assert next(i for i in fp16.loras() if i.name == "rs").rslora
    _, factors, s = adapters["rs"]
    got = logits_with(fp16, {"rs": 1.0})
    torch.testing.assert_close(got, merged_logits(fp16, [(factors, s)]), rtol=1e-4, atol=2e-3)
    plain = merged_logits(fp16, [(factors, scale_of(16, 8, False))])
    assert (got - plain).abs().max() > 0.1  # alpha/r would be a different model


def test_two_adapters_at_once_add_up(fp16, adapters) -> None:
    load(fp16, adapters, "a", "b")
    got = logits_with(fp16, {"a": 0.5, "b": 1.5})
    # one fused pair per module: ranks stacked (4 + 8 where both target it)
    a_cat, b_cat = fp16.model.lora["model.layers.0.self_attn.q_proj"]
    assert a_cat.shape == (12, 576) and b_cat.shape == (576, 12)
    assert fp16.model.lora["model.layers.0.self_attn.k_proj"][0].shape[0] == 4
    want = merged_logits(fp16, [(adapters["a"][1], 0.5 * adapters["a"][2]),
                                (adapters["b"][1], 1.5 * adapters["b"][2])])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3)


def test_scale_zero_equals_base(fp16, adapters) -> None:
    load(fp16, adapters, "a")
    base = logits_with(fp16, {})
    assert torch.equal(logits_with(fp16, {"a": 0.0}), base)
    assert fp16.model.lora == {}


def test_unknown_adapter_name_and_bad_scale(fp16, adapters) -> None:
    load(fp16, adapters, "a")
    with pytest.raises(GenerationError, match="no LoRA adapter named 'nope'.*loaded: .*a"):
        list(fp16.generator.stream(IDS, GenerationSettings(max_new_tokens=2, loras={"nope": 1.0})))
    with pytest.raises(GenerationError, match="finite"):
        list(fp16.generator.stream(IDS, GenerationSettings(max_new_tokens=2, loras={"a": float("nan")})))
    with pytest.raises(GenerationError, match="already loaded"):
        fp16.load_lora(str(adapters["a"][0]), "a")


def test_selection_is_per_request_and_does_not_leak(fp16, adapters) -> None:
    load(fp16, adapters, "a")
    g = fp16.generator

    def run(loras: dict) -> list[int]:
        settings = GenerationSettings(max_new_tokens=8, samplers=GREEDY, stop_on_eos=False, loras=loras)
        return [t for c in g.stream(IDS, settings) for t in c.token_ids]

    g.reset_cache()
    base = run({})
    tuned = run({"a": 3.0})
    again = run({})
    assert tuned != base
    assert again == base
    g.reset_cache()
    assert run({"a": 3.0}) == tuned


def test_prompt_cache_is_keyed_by_adapter_set(fp16, adapters) -> None:
    load(fp16, adapters, "a")
    g = fp16.generator
    g.reset_cache()
    g._use_loras({})
    base = g._prefill(IDS).clone()
    assert g._cached_ids == IDS
    g._use_loras({"a": 1.0})
    assert g._cached_ids == []  # KV computed without the adapter is not reused
    switched = g._prefill(IDS).clone()
    g.reset_cache()
    fresh = g._prefill(IDS)
    torch.testing.assert_close(switched, fresh)
    assert (switched - base).abs().max() > 0.5
    g._use_loras({"a": 1.0})
    assert g._cached_ids == IDS  # same set: the prefix is reused
    g._use_loras({"a": 0.5})
    assert g._cached_ids == []  # another scale is another model


def test_reloaded_adapter_under_same_name_invalidates(fp16, adapters, tmp_path, smollm2_fp16_dir) -> None:
    g = fp16.generator
    write_adapter(tmp_path / "x1", smollm2_fp16_dir, seed=11, layers=range(2))
    write_adapter(tmp_path / "x2", smollm2_fp16_dir, seed=12, layers=range(2))
    fp16.load_lora(str(tmp_path / "x1"), "x")
    g._use_loras({"x": 1.0})
    g._prefill(IDS)
    assert fp16.unload_lora("x")
    fp16.load_lora(str(tmp_path / "x2"), "x")
    g._use_loras({"x": 1.0})
    assert g._cached_ids == []
    fp16.unload_lora("x")
    assert "x" not in {i.name for i in fp16.loras()}


def test_with_template_stops_keeps_loras(fp16) -> None:
    s = fp16._with_template_stops(GenerationSettings(loras={"a": 0.5}))
    assert s.loras == {"a": 0.5}


# --- wrong base model / broken folders -------------------------------------------------------


def test_hidden_size_mismatch_names_folder_and_shapes(fp16, tmp_path, smollm2_fp16_dir) -> None:
    folder = tmp_path / "other-base"
    write_adapter(folder, smollm2_fp16_dir, targets=("q_proj",), in_override=512, layers=range(1))
    with pytest.raises(LoraError, match=r"other-base.*lora_A \[4, 512\].*576") as e:
        fp16.load_lora(str(folder))
    assert isinstance(e.value, ModelFormatError)


def test_unknown_target_module(fp16, tmp_path, smollm2_fp16_dir) -> None:
    folder = tmp_path / "neox"
    write_adapter(folder, smollm2_fp16_dir, targets=("q_proj",), layers=range(1),
                  config_extra={"target_modules": ["query_key_value"]})
    with pytest.raises(LoraError, match=r"neox.*query_key_value.*another architecture"):
        fp16.load_lora(str(folder))
    # a tensor for a module the model lacks, with a config that does not say so
    from safetensors.torch import save_file
    folder2 = tmp_path / "neox2"
    folder2.mkdir()
    (folder2 / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": "qkv"}))
    save_file({"base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight": torch.zeros(4, 576)},
              str(folder2 / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match=r"neox2.*query_key_value"):
        fp16.load_lora(str(folder2))


def test_missing_files_and_tensors(fp16, tmp_path, smollm2_fp16_dir) -> None:
    folder = tmp_path / "nofile"
    write_adapter(folder, smollm2_fp16_dir, targets=("q_proj",), layers=range(1))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraError, match=r"nofile.*adapter_model.safetensors is missing"):
        fp16.load_lora(str(folder))
    (folder / "adapter_model.bin").write_bytes(b"not opened")
    with pytest.raises(LoraError, match="pickle"):
        fp16.load_lora(str(folder))
    with pytest.raises(LoraError, match="no adapter_config.json.*model folder"):
        fp16.load_lora(smollm2_fp16_dir)
    with pytest.raises(LoraError, match="is not a folder"):
        fp16.load_lora(str(tmp_path / "absent"))
    # config targets a module the weights lack
    partial = tmp_path / "partial"
    write_adapter(partial, smollm2_fp16_dir, targets=("q_proj",), layers=range(1),
                  config_extra={"target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(LoraError, match=r"partial.*\['v_proj'\].*no tensors"):
        fp16.load_lora(str(partial))
    # lora_B missing for one module
    from safetensors.torch import load_file, save_file
    half = tmp_path / "half"
    write_adapter(half, smollm2_fp16_dir, targets=("q_proj",), layers=range(1))
    t = load_file(str(half / "adapter_model.safetensors"))
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(t, str(half / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match=r"half.*lora_B is missing"):
        fp16.load_lora(str(half))
    # more layers than the model has
    deep = tmp_path / "deep"
    write_adapter(deep, smollm2_fp16_dir, targets=("q_proj",), layers=range(30, 31))
    with pytest.raises(LoraError, match="layer 30, the model has 30 layers"):
        fp16.load_lora(str(deep))
    assert "deep" not in {i.name for i in fp16.loras()}


def test_unsupported_options_are_refused(fp16, tmp_path, smollm2_fp16_dir) -> None:
    for extra, words in (({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "IA3"),
                         ({"modules_to_save": ["lm_head"]}, "replaces whole modules")):
        folder = tmp_path / next(iter(extra))
        write_adapter(folder, smollm2_fp16_dir, targets=("q_proj",), layers=range(1), config_extra=extra)
        with pytest.raises(LoraError, match=words):
            fp16.load_lora(str(folder))


@pytest.mark.gpu
def test_cuda_backend_adapter_matches_merged(smollm2_exl2_mixed, smollm2_fp16_dir, tmp_path) -> None:
    """On the GPU (CUDA backend, packed EXL2): the adapter adds the delta within fp16 tolerance."""
    engine = Engine.load(smollm2_exl2_mixed, "cuda", max_seq_len=256)
    factors = write_adapter(tmp_path / "g", smollm2_fp16_dir, seed=5)
    engine.load_lora(str(tmp_path / "g"), "g")
    s = scale_of(4, 8)
    ids = torch.tensor([IDS], device=engine.model.device)
    engine.generator._use_loras({})
    base = engine.model.forward(ids)[0].float()
    engine.generator._use_loras({"g": 1.0})
    got = engine.model.forward(ids)[0].float()
    # reference: dense fp16 model holding the dequantized EXL2 weights plus the delta (torch backend)
    ref = Engine.load(smollm2_exl2_mixed, "cuda", max_seq_len=256, backend="torch")
    ref_base = ref.model.forward(ids)[0].float()
    for module, (a, b) in factors.items():
        w = ref.model.linears()[module].weight
        w += (s * (b @ a)).to(w.device, w.dtype)
    ref_delta = ref.model.forward(ids)[0].float() - ref_base
    torch.testing.assert_close(got - base, ref_delta, rtol=0.05, atol=0.25)  # fp16 logits of ~20: ulp 0.016

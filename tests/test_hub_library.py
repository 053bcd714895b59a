"""The local model library: folder and HF-cache scanning, safetensors headers, deletion."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from app.engine.errors import ModelFormatError
from app.hub.download import DownloadJob, JobState
from app.hub.errors import HubError
from app.hub.library import (
    count_parameters,
    delete_model,
    read_model_card,
    read_safetensors_header,
    scan_library,
)
from tests.hubserver import FIXTURE_PARAMS, FIXTURE_TENSORS, TINY_CONFIG

TINY = "kestrel-test/TinyLlama-1.1B-exl2"


def test_header_parsing_counts_exl2_layers_as_matrices(tmp_path, hub):
    path = tmp_path / "w.safetensors"
    path.write_bytes(hub.repos[TINY].branches["4_0"]["output.safetensors"])
    header = read_safetensors_header(str(path))
    assert {n for n in header if n != "__metadata__"} == {n for n, _, _ in FIXTURE_TENSORS}
    assert header["model.layers.0.mlp.down_proj.q_weight"]["dtype"] == "I32"
    # the EXL2 linear is 128 in x 64 out, not its packed (16, 64) int32 words
    assert count_parameters([header]) == FIXTURE_PARAMS


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x00", "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    (struct.pack("<Q", 50) + b"{}", "does not fit in the file"),
    (struct.pack("<Q", 4) + b"[1]\n", "not a JSON object"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
])
def test_bad_safetensors_headers_raise_model_format_error(tmp_path, blob, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ModelFormatError, match=message) as info:
        read_safetensors_header(str(path))
    assert str(path) in str(info.value)


def test_truncated_tensor_data_is_detected(tmp_path):
    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)
    with pytest.raises(ModelFormatError, match="truncated"):
        read_safetensors_header(str(path))


def test_scan_library_describes_downloaded_models_and_deletes(access, tmp_path):
    lib = tmp_path / "lib"
    for branch in ("4_0", "3.0bpw_h6"):
        assert DownloadJob(TINY, branch, str(lib), access=access, reserve_bytes=0).run() is JobState.COMPLETE
    # an unsupported architecture and a broken config are listed with a problem, not skipped
    odd = lib / "nested" / "gpt2-thing"
    odd.mkdir(parents=True)
    (odd / "config.json").write_text(json.dumps({**TINY_CONFIG, "architectures": ["GPT2LMHeadModel"]}))
    (odd / "model.safetensors").write_bytes((lib / "kestrel-test--TinyLlama-1.1B-exl2--4_0" /
                                             "output.safetensors").read_bytes())
    broken = lib / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\0" * 4)
    (lib / "not-a-model").mkdir()
    (lib / "not-a-model" / "config.json").write_text("{}")

    cards = scan_library([str(lib)], include_hf_cache=False)
    by_name = {c.name: c for c in cards}
    assert set(by_name) == {"TinyLlama-1.1B-exl2 (4_0)", "TinyLlama-1.1B-exl2 (3.0bpw_h6)", "gpt2-thing", "broken"}
    q4 = by_name["TinyLlama-1.1B-exl2 (4_0)"]
    assert (q4.architecture, q4.supported, q4.params) == ("LlamaForCausalLM", True, FIXTURE_PARAMS)
    assert (q4.bpw, q4.head_bits, q4.context_length) == (4.0, 6, 2048)
    assert (q4.repo_id, q4.branch, q4.source, q4.problem) == (TINY, "4_0", "library", None)
    on_disk = sum(p.stat().st_size for p in Path(q4.path).rglob("*") if p.is_file())
    assert q4.size_bytes == on_disk and q4.quantized
    q3 = by_name["TinyLlama-1.1B-exl2 (3.0bpw_h6)"]
    assert (q3.bpw, q3.head_bits) == (3.0, 6)           # no quantization_config: from the branch name
    assert not by_name["gpt2-thing"].supported and "GPT2LMHeadModel" in by_name["gpt2-thing"].problem
    assert "config.json cannot be read" in by_name["broken"].problem

    freed = delete_model(q4)
    assert freed == on_disk and not Path(q4.path).exists()
    assert "TinyLlama-1.1B-exl2 (4_0)" not in {c.name for c in scan_library([str(lib)], include_hf_cache=False)}
    with pytest.raises(HubError, match="not a model folder"):
        delete_model(read_model_card(str(lib / "not-a-model")))


def test_scan_hf_cache_finds_snapshots_and_deletes_revisions(hub, access, tmp_path):
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    for name in ("config.json", "output.safetensors"):     # huggingface_hub's own download path
        hf_hub_download(TINY, name, revision="6_5", cache_dir=str(cache), endpoint=hub.url)
    hf_hub_download(TINY, "README.md", revision="main", cache_dir=str(cache), endpoint=hub.url)  # no weights

    cards = scan_library([], hf_cache_dir=str(cache))
    assert len(cards) == 1
    card = cards[0]
    assert (card.source, card.repo_id, card.branch) == ("hf-cache", TINY, "6_5")
    assert card.commit == hub.repos[TINY].commit("6_5")
    assert (card.bpw, card.head_bits, card.params) == (6.5, 8, FIXTURE_PARAMS)
    assert card.size_bytes == sum(len(hub.repos[TINY].branches["6_5"][n]) for n in ("config.json",
                                                                                       "output.safetensors"))
    assert delete_model(card, hf_cache_dir=str(cache)) >= card.size_bytes
    assert scan_library([], hf_cache_dir=str(cache)) == []
    assert scan_library([str(tmp_path / "does-not-exist")], hf_cache_dir=str(tmp_path / "no-cache")) == []

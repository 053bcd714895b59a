"""Browsing EXL2 repos through huggingface_hub against a real HTTP fake Hub (tests/hubserver.py)."""

from __future__ import annotations

import shutil
import subprocess

import keyring
import pytest
from keyring.backends import fail

from app.hub import access as hub_access
from app.hub.access import HubAccess
from app.hub.browse import (
    fetch_branch_config,
    fetch_model_card,
    fit_input,
    list_branches,
    parse_bpw,
    parse_params_b,
    search_models,
    strip_front_matter,
)
from app.hub.errors import HubAuthError, HubError, HubNotFoundError, HubOfflineError, TokenStoreError
from tests.hubserver import (
    TINY_CONFIG,
    git_blob_sha1,
)

TINY = "kestrel-test/TinyLlama-1.1B-exl2"
GATED = "kestrel-test/Gated-Llama-exl2"
GATED_TOKEN = "hf_kestrel_test_token"


@pytest.mark.parametrize("name, expected", [
    ("4_0", (4.0, None)), ("4_65", (4.65, None)), ("6_5", (6.5, None)), ("8_0", (8.0, None)),
    ("4.0bpw", (4.0, None)), ("6.5bpw_h8", (6.5, 8)), ("8.0bpw-h8", (8.0, 8)), ("3.0bpw_h6", (3.0, 6)),
    ("5_0_h6", (5.0, 6)), ("h6-4.25bpw", (4.25, 6)), ("Llama-3-8B-Instruct-exl2-4.0bpw-h6", (4.0, 6)),
    ("main", (None, None)), ("measurement", (None, None)), ("99_0", (None, None)), ("v1_2024", (None, None)),
])
def test_parse_bpw(name, expected):
    assert parse_bpw(name) == expected


@pytest.mark.parametrize("name, expected", [
    ("Llama-3-8B-Instruct-exl2", 8.0), ("Mixtral-8x7B-v0.1-exl2", 56.0), ("SmolLM2-135M-Instruct", 0.135),
    ("Qwen2.5-1.5B", 1.5), ("gpt2-exl2", None),
])
def test_parse_params_from_name(name, expected):
    assert parse_params_b(name) == expected


def test_fake_hub_blob_ids_match_git(tmp_path):
    """The fake Hub's non-LFS ETags/oids must be real git blob ids, or verification tests prove nothing."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git not installed")
    f = tmp_path / "x.json"
    f.write_bytes(b'{"a": 1}\n')
    out = subprocess.run([git, "hash-object", str(f)], capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_sha1(f.read_bytes()) == out


def test_search_finds_exl2_by_tag_or_name_and_sorts(access):
    everything = search_models(access=access)
    ids = [s.repo_id for s in everything]
    assert "plain/Llama-3-8B-Instruct" not in ids                     # not EXL2
    assert "quanter/Mistral-7B-Instruct-quant" in ids                 # tagged exl2, name says nothing
    assert TINY in ids and "bigorg/Llama-3-70B-Instruct-exl2" in ids  # exl2 in the name only
    assert [s.downloads for s in everything] == sorted((s.downloads for s in everything), reverse=True)

    by_likes = search_models(sort="likes", access=access)
    assert by_likes[0].repo_id == "bigorg/Llama-3-70B-Instruct-exl2"
    recent = search_models(sort="last_modified", access=access)
    assert recent[0].repo_id == "bigorg/Llama-3-70B-Instruct-exl2"

    llama = search_models("llama", access=access)
    assert {s.repo_id for s in llama} == {TINY, "bigorg/Llama-3-70B-Instruct-exl2", GATED}
    assert all(s.architecture == "llama" for s in llama)

    mistral = search_models(architecture="mistral", access=access)
    assert [s.repo_id for s in mistral] == ["quanter/Mistral-7B-Instruct-quant"]

    small = search_models(max_params_b=10, access=access)
    assert "bigorg/Llama-3-70B-Instruct-exl2" not in {s.repo_id for s in small}
    assert {s.repo_id for s in search_models(min_params_b=60, access=access)} == {"bigorg/Llama-3-70B-Instruct-exl2"}

    gated = next(s for s in everything if s.repo_id == GATED)
    assert gated.gated
    with pytest.raises(HubError, match="sort"):
        search_models(sort="stars", access=access)  # type: ignore[arg-type]


def test_list_branches_reads_bpw_sizes_and_config(hub, access):
    branches = list_branches(TINY, access=access)
    assert [b.name for b in branches] == ["6_5", "4_0", "3.0bpw_h6", "main"]
    b65, b40, b30, main = branches
    assert (b65.bpw, b65.head_bits) == (6.5, 8)          # from quantization_config
    assert (b40.bpw, b40.head_bits) == (4.0, 6)
    assert (b30.bpw, b30.head_bits) == (3.0, 6)          # no quantization_config: from the branch name
    assert main.bpw is None and not main.has_weights and main.problem
    files = hub.repos[TINY].branches["4_0"]
    assert b40.total_bytes == sum(len(d) for d in files.values())
    assert {f.path for f in b40.files} == set(files)
    weights = next(f for f in b40.files if f.path == "output.safetensors")
    assert weights.is_lfs and len(weights.sha256) == 64
    config_file = next(f for f in b40.files if f.path == "config.json")
    assert not config_file.is_lfs and config_file.blob_id == git_blob_sha1(files["config.json"])
    assert b40.commit == hub.repos[TINY].commit("4_0")
    assert b40.architecture == "LlamaForCausalLM" and b40.supported
    assert b40.context_length == 2048

    c = TINY_CONFIG
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    expected = v * h + L * (h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h) + h + v * h
    assert b40.params == expected

    config, sizes = fit_input(b40)
    assert config["quantization_config"]["bits"] == 4.0 and config["hidden_size"] == 64
    assert sizes == {p: len(d) for p, d in files.items()}
    with pytest.raises(HubError, match="config.json"):
        fit_input(main)


def test_branch_listing_without_configs_uses_names_only(hub, access):
    branches = list_branches(TINY, fetch_configs=False, access=access)
    by_name = {b.name: b for b in branches}
    assert by_name["6_5"].bpw == 6.5 and by_name["6_5"].head_bits is None and by_name["6_5"].config is None
    assert not any(r["path"].startswith(f"/{TINY}/resolve") for r in hub.requests)


def test_model_card_and_config_fetch(access):
    card = fetch_model_card(TINY, access=access)
    assert card.startswith("---") and "# TinyLlama EXL2" in card
    assert strip_front_matter(card).startswith("# TinyLlama EXL2")
    assert fetch_model_card("quanter/Mistral-7B-Instruct-quant", "8_0", access=access) == ""  # no README there
    config = fetch_branch_config(TINY, "6_5", access=access)
    assert config is not None and config["quantization_config"]["bits"] == 6.5
    assert fetch_branch_config(TINY, "main", access=access) is None


def test_offline_mode_uses_cache_and_refuses_network(hub, access, monkeypatch):
    fetch_model_card(TINY, access=access)            # cached while online
    offline = HubAccess(endpoint=hub.url, cache_dir=access.cache_dir, offline=True)
    before = len(hub.requests)
    assert "# TinyLlama EXL2" in fetch_model_card(TINY, access=offline)
    with pytest.raises(HubOfflineError, match="offline"):
        search_models("llama", access=offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubOfflineError):
        list_branches(TINY, access=access)
    with pytest.raises(HubOfflineError):
        fetch_model_card(TINY, "6_5", access=access)   # never cached
    assert len(hub.requests) == before


def test_missing_repo_branch_are_not_found(access):
    with pytest.raises(HubNotFoundError, match="nobody/missing"):
        list_branches("nobody/missing", access=access)
    with pytest.raises(HubNotFoundError, match="branch does not exist"):
        fetch_branch_config(TINY, "9_9", access=access)


def test_gated_repo_needs_token(hub, access, memory_keyring):
    with pytest.raises(HubAuthError, match="token") as info:
        list_branches(GATED, access=access)
    assert GATED in str(info.value)
    with pytest.raises(HubAuthError, match="refused your token"):
        list_branches(GATED, access=HubAccess(endpoint=hub.url, cache_dir=access.cache_dir, token="hf_wrong"))

    explicit = HubAccess(endpoint=hub.url, cache_dir=access.cache_dir, token=GATED_TOKEN)
    assert [b.name for b in list_branches(GATED, access=explicit)] == ["4_0", "main"]

    hub_access.set_token(GATED_TOKEN)   # through the OS keyring
    assert memory_keyring.store[("Kestrel", "huggingface")] == GATED_TOKEN
    branches = list_branches(GATED, access=access)
    assert branches[0].bpw == 4.0
    assert any(r["auth"] == f"Bearer {GATED_TOKEN}" for r in hub.requests)
    hub_access.delete_token()
    hub_access.delete_token()           # deleting twice is fine
    assert hub_access.get_token() is None
    with pytest.raises(HubAuthError):
        list_branches(GATED, access=access)


def test_token_functions_degrade_without_keyring_backend():
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        assert hub_access.get_token() is None
        with pytest.raises(TokenStoreError, match="keyring"):
            hub_access.set_token("hf_abc")
        with pytest.raises(TokenStoreError, match="HF_TOKEN"):
            hub_access.delete_token()
        with pytest.raises(TokenStoreError, match="empty"):
            hub_access.set_token("   ")
    finally:
        keyring.set_keyring(previous)

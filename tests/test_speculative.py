"""Speculative decoding on the real SmolLM2: greedy output identical to plain decoding (n-gram drafts
and a draft model), the rejection rule preserves the sampled distribution (chi-square), stop strings,
EOS, max tokens and banned-string rollback behave the same, and the failure modes are clear errors."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from app.engine import load_model
from app.engine.errors import GenerationError, TokenizerError
from app.engine.generator import Generator, sampler_state
from app.engine.samplers import SamplerContext, probabilities, sample, validate_settings
from app.engine.speculative import (
    Proposal,
    Speculation,
    check_same_tokenizer,
    load_draft,
    ngram_lookup,
    speculative_pick,
)
from app.engine.tokenizer import Tokenizer
from app.engine.types import GenerationSettings

GREEDY = {"temperature": 0}
CODE = ("Rewrite this code with one change: rename total to acc.\n\n"
        "def total_of(items):\n    total = 0\n    for item in items:\n        total += item\n    return total\n\n"
        "def total_of(items):\n    acc = 0\n    for item in items:\n")


@pytest.fixture(scope="module")
def gen(smollm2_fp16_dir) -> Generator:
    return Generator(load_model(smollm2_fp16_dir, "cpu"), Tokenizer.from_folder(smollm2_fp16_dir), max_seq_len=512)


@pytest.fixture(scope="module")
def exl2_draft(gen, smollm2_exl2_mixed):
    return load_draft(smollm2_exl2_mixed, gen)


@pytest.fixture(scope="module")
def prompt(reference_dir) -> list[int]:
    return np.load(reference_dir / "prompt_ids.npy")[0].tolist()


@pytest.fixture(scope="module")
def code_prompt(gen) -> list[int]:
    return gen.tokenizer.encode(CODE)


def run(gen: Generator, ids: list[int], draft=None, **kw):
    """Chunks as (text, token ids, finish reason), and the last chunk."""
    gen.speculation.draft = draft
    try:
        chunks = list(gen.stream(ids, GenerationSettings(**kw)))
    finally:
        gen.speculation.draft = None
    return [(c.text, c.token_ids, c.finish_reason) for c in chunks], chunks[-1]


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of counts against probabilities (cells with p = 0 must have no counts)."""
    assert counts[probs == 0].sum() == 0, "drew a token the distribution excludes"
    live = probs > 0
    expected = probs[live] * counts.sum()
    stat = float(((counts[live] - expected) ** 2 / expected).sum())
    df = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


# --- the rule itself, on synthetic distributions ---------------------------------------------------

P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03, 0.0])
Q = torch.tensor([0.05, 0.10, 0.50, 0.05, 0.25, 0.0, 0.03, 0.02])  # one id past p's vocabulary


def test_rejection_sampling_preserves_p_for_a_draft_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    n = 8000
    drafts = torch.multinomial(Q, n, replacement=True, generator=g).tolist()
    out = np.bincount([speculative_pick(P, d, Q, g) for d in drafts], minlength=len(P))
    assert chi_square_p_value(out, P.numpy()) > 1e-3
    # The same test tells the drafts themselves apart from p, so it has the power to fail.
    raw = np.bincount([d for d in drafts if d < len(P)], minlength=len(P))
    assert chi_square_p_value(raw, P.numpy() + 1e-9) < 1e-6


def test_rejection_sampling_preserves_p_for_a_point_mass() -> None:
    g = torch.Generator().manual_seed(1)
    out = np.bincount([speculative_pick(P, 2, None, g) for _ in range(6000)], minlength=len(P))
    assert chi_square_p_value(out, P.numpy()) > 1e-3
    accepted = out[2] / out.sum()
    assert abs(accepted - 0.15) < 0.02  # a point-mass draft is accepted with probability p(draft)


def test_ngram_lookup_proposes_the_latest_continuation() -> None:
    h = torch.tensor([5, 1, 2, 3, 9, 9, 1, 2, 3, 4, 8, 7, 1, 2, 3])
    assert ngram_lookup(h, 3) == [4, 8, 7]  # "1 2 3" last seen before the end is followed by 4 8 7
    assert ngram_lookup(h, 10) == [4, 8, 7, 1, 2, 3]
    assert ngram_lookup(torch.tensor([1, 2, 3, 4]), 3) == []


# --- the rule on the real model's distributions, through the samplers ------------------------------

def test_sampling_matches_plain_sampling_on_real_logits(gen, exl2_draft, prompt) -> None:
    """p is the distribution after Kestrel's samplers (penalties read the history): drafts drawn from
    the EXL2 model's distribution, checked against the fp16 model's, come out distributed as p."""
    samplers = validate_settings({"temperature": 1.3, "top_k": 6, "repetition_penalty": 1.3})
    history = torch.tensor(prompt)
    state = sampler_state(gen.tokenizer, samplers)
    target = gen.model.forward(history[None])[0, -1]
    draft_logits = exl2_draft.generator.model.forward(history[None])[0, -1]

    def ctx() -> SamplerContext:
        return SamplerContext(history=history, generated_start=len(prompt), settings=samplers,
                              eos_ids=gen.tokenizer.eos_ids, state=state)

    p = probabilities(target, samplers, ctx(), None)
    q = probabilities(draft_logits, samplers, ctx(), None)
    # p is what sample() draws from: the same random stream gives the same tokens.
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [sample(target, samplers, ctx(), g1) for _ in range(20)] == \
        [int(torch.multinomial(p, 1, generator=g2)) for _ in range(20)]
    # The rule over the real distributions, restricted to their joint support (12 ids at most).
    ids = torch.nonzero((p > 0) | (q > 0)).flatten()
    ps, qs = p[ids], q[ids]
    assert (ps > 0).sum() == 6 and not torch.allclose(ps, qs, atol=1e-2), "the draft should differ"
    g = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(qs, 6000, replacement=True, generator=g).tolist()
    out = np.bincount([speculative_pick(ps, d, qs, g) for d in drafts], minlength=len(ids))
    assert chi_square_p_value(out, ps.numpy()) > 1e-3
    # And through the generator's hook, with the samplers run on the full logits each time.
    spec = Speculation(gen, exl2_draft, 4, samplers, len(prompt), state, seed=3)
    for d in drafts[:40]:
        spec.pending = [(Proposal(int(ids[d]), q), target)]
        assert p[spec.pick(target, samplers, ctx(), g)] > 0
    assert 0 < spec.accepted < spec.proposed == 40


# --- greedy: identical to plain decoding -----------------------------------------------------------

def test_ngram_greedy_is_identical(gen, code_prompt) -> None:
    plain, _ = run(gen, code_prompt, max_new_tokens=14, samplers=GREEDY)
    spec, last = run(gen, code_prompt, max_new_tokens=14, samplers=GREEDY, speculative="ngram")
    assert spec == plain
    assert last.draft_accepted > 0 and last.draft_proposed >= last.draft_accepted
    assert plain[-1][2] == "length" and last.generated_tokens == 14


def test_history_dependent_samplers_stay_exact(gen, exl2_draft, code_prompt) -> None:
    """Penalties, DRY and min_tokens read the history: each drafted position sees the right one."""
    samplers = {"temperature": 0, "repetition_penalty": 1.3, "dry_multiplier": 0.8, "min_tokens": 4}
    plain, _ = run(gen, code_prompt, max_new_tokens=12, samplers=samplers)
    spec, last = run(gen, code_prompt, exl2_draft, max_new_tokens=12, samplers=samplers)
    assert spec == plain
    assert last.draft_proposed > 0


def test_draft_model_greedy_is_identical_and_stops_on_eos(gen, exl2_draft, prompt) -> None:
    plain, _ = run(gen, prompt, max_new_tokens=20, samplers=GREEDY)
    spec, last = run(gen, prompt, exl2_draft, max_new_tokens=20, samplers=GREEDY)
    assert spec == plain
    assert "".join(t for t, _, _ in spec) == "The capital of France is Paris."
    assert last.finish_reason == "stop" and last.draft_proposed > 0
    assert 0 < last.draft_acceptance <= 1


def test_model_as_its_own_draft_accepts_everything(gen, smollm2_fp16_dir, code_prompt) -> None:
    own = load_draft(smollm2_fp16_dir, gen)
    plain, _ = run(gen, code_prompt, max_new_tokens=10, samplers=GREEDY)
    spec, last = run(gen, code_prompt, own, max_new_tokens=10, samplers=GREEDY, draft_tokens=3)
    assert spec == plain
    assert last.draft_proposed > 0 and last.draft_accepted == last.draft_proposed


def test_stop_strings_and_length_are_unchanged(gen, exl2_draft, prompt) -> None:
    for kw in ({"stop_strings": ["Par"]}, {"max_new_tokens": 3}):
        settings = {"max_new_tokens": 20, "samplers": GREEDY, **kw}
        plain, _ = run(gen, prompt, **settings)
        for draft, mode in ((exl2_draft, "draft"), (None, "ngram")):
            assert run(gen, prompt, draft, speculative=mode, **settings)[0] == plain
    assert "".join(t for t, _, _ in plain) == "The capital of"


def test_banned_string_rollback_is_unchanged(gen, exl2_draft, prompt) -> None:
    settings = {"max_new_tokens": 12, "samplers": {"temperature": 0, "banned_strings": ["Paris"]}}
    plain, _ = run(gen, prompt, **settings)
    spec, last = run(gen, prompt, exl2_draft, **settings)
    assert spec == plain
    assert "Paris" not in "".join(t for t, _, _ in spec) and last.draft_proposed > 0


def test_sampling_with_a_seed_is_reproducible(gen, exl2_draft, prompt) -> None:
    settings = {"max_new_tokens": 6, "samplers": {"temperature": 1.2, "top_k": 20}, "seed": 5,
                "stop_on_eos": False}
    a, last = run(gen, prompt, exl2_draft, **settings)
    b, _ = run(gen, prompt, exl2_draft, **settings)
    assert a == b and last.generated_tokens == 6 and last.draft_proposed > 0


# --- fallbacks and errors --------------------------------------------------------------------------

def test_mirostat_falls_back_to_plain_decoding(gen, prompt, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="app.engine.speculative"):
        _, last = run(gen, prompt, max_new_tokens=3, seed=1, speculative="ngram",
                      samplers={"mirostat_mode": 2, "temperature": 1.0})
    assert last.generated_tokens == 3 and last.draft_proposed == 0
    assert "Mirostat" in caplog.text


def test_bad_requests_are_clear_errors(gen, prompt) -> None:
    with pytest.raises(GenerationError, match="none is loaded"):
        run(gen, prompt, max_new_tokens=2, speculative="draft")
    with pytest.raises(GenerationError, match="unknown speculative mode"):
        run(gen, prompt, max_new_tokens=2, speculative="medusa")
    with pytest.raises(GenerationError, match="draft_tokens"):
        run(gen, prompt, max_new_tokens=2, speculative="ngram", draft_tokens=0)


def test_different_tokenizer_names_both_folders(gen, smollm2_fp16_dir, tmp_path) -> None:
    import json

    other = tmp_path / "other-model"
    other.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(f"{smollm2_fp16_dir}/{name}", other / name)
    spec = json.loads(open(f"{smollm2_fp16_dir}/tokenizer.json", encoding="utf-8").read())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[1000:1002]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerError) as e:
        check_same_tokenizer(gen.tokenizer, Tokenizer.from_folder(str(other)))
    assert str(other) in str(e.value) and smollm2_fp16_dir in str(e.value) and "token id 1000" in str(e.value)
    with pytest.raises(TokenizerError):
        load_draft(str(other), gen)


# --- the terminal ----------------------------------------------------------------------------------

def test_cli_generate_with_a_draft_model(smollm2_fp16_dir, smollm2_exl2_mixed) -> None:
    from tests.test_cli import run as cli

    r = cli("generate", "--model", smollm2_fp16_dir, "--draft", smollm2_exl2_mixed, "--prompt",
            "What is the capital of France?", "--chat", "--temperature", "0", "--device", "cpu",
            "--max-new-tokens", "20", "--draft-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The capital of France is Paris.\n"
    assert "drafted tokens accepted" in r.stderr
    r = cli("generate", "--model", smollm2_fp16_dir, "--speculative", "draft", "--prompt", "hi", "--device", "cpu")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "--draft DIR" in r.stderr

"""Each core sampler against a distribution worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from app.engine.errors import GenerationError
from app.engine.samplers import SAMPLERS, SamplerContext, process_logits, sample, validate_settings


def ctx(history=()) -> SamplerContext:
    return SamplerContext(history=torch.tensor(list(history), dtype=torch.int64))


def probs(logits: torch.Tensor) -> list[float]:
    return [round(p, 4) for p in torch.softmax(logits, -1).tolist()]


L = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))


def run(**settings) -> torch.Tensor:
    s = validate_settings({"temperature": 1.0, **settings})
    return process_logits(L, s, ctx(settings.pop("_history", ())))


def test_neutral_settings_change_nothing() -> None:
    assert probs(run()) == [0.5, 0.25, 0.15, 0.1]


def test_temperature() -> None:
    # p_i ** 2 / sum(p ** 2): 0.25, 0.0625, 0.0225, 0.01 over 0.345
    assert probs(run(temperature=0.5)) == [round(x / 0.345, 4) for x in (0.25, 0.0625, 0.0225, 0.01)]


def test_top_k() -> None:
    assert probs(run(top_k=2)) == [round(0.5 / 0.75, 4), round(0.25 / 0.75, 4), 0.0, 0.0]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    assert probs(run(top_p=0.7)) == [round(0.5 / 0.75, 4), round(0.25 / 0.75, 4), 0.0, 0.0]
    assert probs(run(top_p=0.75)) == [round(0.5 / 0.75, 4), round(0.25 / 0.75, 4), 0.0, 0.0]
    assert probs(run(top_p=0.76))[2] > 0


def test_min_p_relative_to_top() -> None:
    # threshold 0.4 * 0.5 = 0.2: keeps 0.5 and 0.25
    assert probs(run(min_p=0.4)) == [round(0.5 / 0.75, 4), round(0.25 / 0.75, 4), 0.0, 0.0]


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    s = validate_settings({"temperature": 1.0, "repetition_penalty": 2.0})
    out = process_logits(logits, s, ctx([0, 1]))
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(4)
    s = validate_settings({"temperature": 1.0, "presence_penalty": 0.5, "frequency_penalty": 0.25})
    out = process_logits(logits, s, ctx([1, 1, 1, 2]))
    assert out.tolist() == [0.0, -0.5 - 0.75, -0.5 - 0.25, 0.0]


def test_greedy_takes_argmax_after_penalties() -> None:
    logits = torch.tensor([3.0, 2.9, 0.0])
    s = validate_settings({"temperature": 0, "repetition_penalty": 1.5})
    assert sample(logits, s, ctx([0]), None) == 1


def test_sampling_frequencies_follow_the_distribution() -> None:
    s = validate_settings({"temperature": 1.0, "top_k": 3})
    g = torch.Generator().manual_seed(0)
    counts = [0, 0, 0, 0]
    for _ in range(3000):
        counts[sample(L, s, ctx(), g)] += 1
    expected = [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0]
    for c, e in zip(counts, expected):
        assert abs(c / 3000 - e) < 0.03
    assert counts[3] == 0


def test_validation_errors() -> None:
    with pytest.raises(GenerationError, match="unknown sampler"):
        validate_settings({"nonsense": 1})
    with pytest.raises(GenerationError, match="out of range"):
        validate_settings({"top_p": 1.5})
    with pytest.raises(GenerationError, match="needs a number"):
        validate_settings({"temperature": "hot"})


def test_every_spec_is_described() -> None:
    for spec in SAMPLERS.values():
        assert spec.help and spec.label and spec.group
        if spec.kind in ("float", "int"):
            assert spec.minimum <= spec.default <= spec.maximum
        assert not math.isnan(float(spec.step))


# --- the extended sampler set ---------------------------------------------------------------------

from app.engine.samplers import (  # noqa: E402
    GREEDY_STAGES,
    LIST_KINDS,
    BannedStringGuard,
    SamplerState,
    mirostat_draw,
)


def full(**settings) -> dict:
    return validate_settings({"temperature": 1.0, **settings})


def rounded(xs, n=4) -> list[float]:
    return [round(x, n) for x in xs]


def test_typical_p_keeps_tokens_nearest_the_entropy() -> None:
    # H = sum p ln(1/p) = 1.2080 nats; |ln(1/p) - H| = .515, .178, .689, 1.095, so the order is
    # token 1 (.25), token 0 (.5), token 2, token 3; cumulative .25, .75, ...
    assert probs(run(typical_p=0.2)) == [0.0, 1.0, 0.0, 0.0]
    assert probs(run(typical_p=0.5)) == [round(0.5 / 0.75, 4), round(0.25 / 0.75, 4), 0.0, 0.0]
    assert probs(run(typical_p=0.8)) == [round(x / 0.9, 4) for x in (0.5, 0.25, 0.15)] + [0.0]


def test_tfs_cuts_by_second_derivative_mass() -> None:
    # sorted p .5 .25 .15 .1 -> d1 -.25 -.1 -.05 -> |d2| .15 .05 -> normalized .75 .25 -> cdf .75 1.0
    # keep token 0 always, token i while cdf[i-1] <= z, the last candidate never
    assert probs(run(tfs=0.8)) == [round(0.5 / 0.75, 4), round(0.25 / 0.75, 4), 0.0, 0.0]
    assert probs(run(tfs=0.7)) == [1.0, 0.0, 0.0, 0.0]


def test_top_a_threshold_is_a_times_top_squared() -> None:
    assert probs(run(top_a=0.8)) == [round(0.5 / 0.75, 4), round(0.25 / 0.75, 4), 0.0, 0.0]  # cut < .2
    assert probs(run(top_a=0.5)) == [round(x / 0.9, 4) for x in (0.5, 0.25, 0.15)] + [0.0]  # cut < .125


def test_xtc_removes_all_top_choices_but_the_least_likely() -> None:
    # p >= .2: tokens 0 and 1; token 0 goes, token 1 (the least likely of them) stays
    assert probs(run(xtc_probability=1.0, xtc_threshold=0.2)) == [0.0, 0.5, 0.3, 0.2]
    assert probs(run(xtc_probability=1.0, xtc_threshold=0.3)) == [0.5, 0.25, 0.15, 0.1]  # one top choice
    s = full(xtc_probability=1.0, xtc_threshold=0.2)
    protected = SamplerContext(history=torch.tensor([], dtype=torch.int64), state=SamplerState(
        xtc_protected=frozenset({0})))
    assert probs(process_logits(L, s, protected)) == [0.5, 0.25, 0.15, 0.1]  # would remove EOS/newline


def test_xtc_coin_flip_uses_the_seeded_generator() -> None:
    s = full(xtc_probability=0.5, xtc_threshold=0.2)

    def flips(seed: int) -> list[bool]:
        c = ctx()
        c.generator = torch.Generator().manual_seed(seed)
        return [process_logits(L, s, c)[0].item() == float("-inf") for _ in range(400)]

    a = flips(7)
    assert a == flips(7)
    assert abs(sum(a) / len(a) - 0.5) < 0.08


def test_dry_penalizes_the_token_that_continued_a_repeat() -> None:
    history = [1, 2, 3, 4, 1, 2, 3]  # ends with 1 2 3, which was followed by 4: match length 3
    s = full(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2)
    assert process_logits(torch.zeros(6), s, ctx(history)).tolist() == [0, 0, 0, 0, -2.0, 0]  # 1 * 2**(3-2)
    breaker = SamplerContext(history=torch.tensor(history), state=SamplerState(dry_breakers=frozenset({2})))
    assert process_logits(torch.zeros(6), s, breaker).tolist() == [0.0] * 6  # match stops at 2: length 1
    s1 = full(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1)
    breaker = SamplerContext(history=torch.tensor(history), state=SamplerState(dry_breakers=frozenset({2})))
    assert process_logits(torch.zeros(6), s1, breaker).tolist() == [0, 0, 0, 0, -1.0, 0]
    ranged = full(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1, dry_range=4)  # sees 4 1 2 3
    assert process_logits(torch.zeros(6), ranged, ctx(history)).tolist() == [0.0] * 6


def test_penalty_range_and_decay_fade_linearly() -> None:
    # range 1, decay 2: the last token counts fully, the two before it 2/3 and 1/3, older ones not at all
    s = full(presence_penalty=1.0, penalty_range=1, penalty_decay=2)
    out = process_logits(torch.zeros(5), s, ctx([0, 1, 2, 3]))
    assert rounded(out.tolist()) == [0.0, round(-1 / 3, 4), round(-2 / 3, 4), -1.0, 0.0]
    # repetition penalty 2 scaled the same way: token 2 (weight 1) / 2, token 1 (weight 1/2) / 1.5
    s = full(repetition_penalty=2.0, penalty_range=1, penalty_decay=1)
    assert process_logits(torch.full((4,), 3.0), s, ctx([1, 2])).tolist() == [3.0, 2.0, 1.5, 3.0]
    s = full(frequency_penalty=1.0, penalty_range=1, penalty_decay=1)  # window is the last 2 tokens
    assert process_logits(torch.zeros(3), s, ctx([1, 1, 2])).tolist() == [0.0, -0.5, -1.0]
    s = full(presence_penalty=1.0, penalty_range=0, penalty_decay=5)  # 0 = whole history, no decay
    assert process_logits(torch.zeros(3), s, ctx([0, 1])).tolist() == [-1.0, -1.0, 0.0]


def test_temperature_last_applies_after_the_filters() -> None:
    # first: min-p .4 on the model's p keeps .5 and .25, then T=2 -> sqrt -> .7071 : .5
    last = probs(run(temperature=2.0, min_p=0.4, temperature_last=1))
    assert last == [round(0.5**0.5 / (0.5**0.5 + 0.5), 4), round(0.5 / (0.5**0.5 + 0.5), 4), 0.0, 0.0]
    # otherwise T=2 flattens first and min-p (threshold .4 * .370) keeps all four
    assert all(p > 0 for p in probs(run(temperature=2.0, min_p=0.4)))


def test_dynamic_temperature_from_normalized_entropy() -> None:
    def expected(p: list[float], low: float, high: float, exp: float) -> list[float]:
        h = -sum(x * math.log(x) for x in p)
        t = low + (high - low) * (h / math.log(len(p))) ** exp
        w = [x ** (1 / t) for x in p]
        return [round(x / sum(w), 4) for x in w]

    assert probs(run(dynatemp_low=0.5, dynatemp_high=1.5)) == expected([0.5, 0.25, 0.15, 0.1], 0.5, 1.5, 1)
    assert probs(run(dynatemp_low=0.5, dynatemp_high=1.5, dynatemp_exponent=2.0)) == \
        expected([0.5, 0.25, 0.15, 0.1], 0.5, 1.5, 2)
    # it runs after the filters, over the tokens left (here 2: max entropy ln 2)
    assert probs(run(dynatemp_low=0.5, dynatemp_high=1.5, top_k=2))[:2] == expected([2 / 3, 1 / 3], 0.5, 1.5, 1)
    # dynamic temperature replaces the plain one
    assert probs(run(temperature=0.3, dynatemp_low=0.5, dynatemp_high=1.5)) == \
        expected([0.5, 0.25, 0.15, 0.1], 0.5, 1.5, 1)


def test_smoothing_is_quadratic_around_the_top_logit() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, float("-inf")])
    c = ctx()
    assert process_logits(logits, full(smoothing_factor=1.0), c).tolist() == [2.0, 1.0, -2.0, float("-inf")]
    assert process_logits(logits, full(smoothing_factor=0.5), c).tolist() == [2.0, 1.5, 0.0, float("-inf")]
    # curve 3: pure cubic (k = 0, s = 1): 2 + d**3
    assert process_logits(logits, full(smoothing_factor=1.0, smoothing_curve=3.0), c).tolist() == \
        [2.0, 1.0, -6.0, float("-inf")]


def test_skew_reshapes_the_cumulative_distribution() -> None:
    # e = exp(ln 2) = 2: C = .5 .75 .9 1 -> C**2 = .25 .5625 .81 1 -> q = .25 .3125 .2475 .19
    assert probs(run(skew=round(math.log(2), 6))) == [0.25, 0.3125, 0.2475, 0.19]
    assert probs(run(skew=-round(math.log(2), 6)))[0] > 0.5  # negative skew favours the top token


def test_mirostat_v2_truncates_by_surprise_and_updates_mu() -> None:
    s = full(mirostat_mode=2, mirostat_tau=1.0, mirostat_eta=0.1)
    # mu starts at 2 * tau = 2: surprises (bits) 1, 2, 2.74, 3.32 -> tokens 0 and 1, as 2/3 and 1/3
    g = torch.Generator().manual_seed(3)
    counts = [0, 0, 0, 0]
    for _ in range(1500):
        state = SamplerState()
        token = mirostat_draw(L, s, state, g)
        counts[token] += 1
        want = 2.0 - 0.1 * (-math.log2((2 / 3) if token == 0 else (1 / 3)) - 1.0)
        assert state.mirostat_mu == pytest.approx(want)
    assert counts[2] == counts[3] == 0 and abs(counts[0] / 1500 - 2 / 3) < 0.04
    # a small mu keeps only the top token (surprise of the kept set is 0): mu += eta * tau
    state = SamplerState(mirostat_mu=0.5)
    assert sample(L, s, SamplerContext(history=torch.tensor([0]), state=state), g) == 0
    assert state.mirostat_mu == pytest.approx(0.6)


def test_logit_bias_and_banned_tokens() -> None:
    s = full(logit_bias={1: 2.0, 3: -100})
    assert process_logits(torch.zeros(4), s, ctx()).tolist() == [0.0, 2.0, 0.0, -100.0]
    assert probs(run(banned_tokens=[0, 2])) == [0.0, round(0.25 / 0.35, 4), 0.0, round(0.1 / 0.35, 4)]
    greedy = validate_settings({"temperature": 0, "banned_tokens": [0]})
    assert sample(L, greedy, ctx(), None) == 1
    with pytest.raises(GenerationError, match="token id 9"):
        process_logits(torch.zeros(4), full(banned_tokens=[9]), ctx())
    with pytest.raises(GenerationError, match="token id 4"):
        process_logits(torch.zeros(4), full(logit_bias={4: 1.0}), ctx())
    with pytest.raises(GenerationError, match="removed every token"):
        sample(L, full(banned_tokens=[0, 1, 2, 3]), ctx(), None)


def test_min_tokens_suppresses_eos_until_reached() -> None:
    s = full(min_tokens=2)
    early = SamplerContext(history=torch.tensor([5, 0]), generated_start=1, eos_ids=frozenset({3}))
    assert probs(process_logits(L, s, early)) == [round(x / 0.9, 4) for x in (0.5, 0.25, 0.15)] + [0.0]
    done = SamplerContext(history=torch.tensor([5, 0, 1]), generated_start=1, eos_ids=frozenset({3}))
    assert probs(process_logits(L, s, done)) == [0.5, 0.25, 0.15, 0.1]
    greedy = validate_settings({"temperature": 0, "min_tokens": 5})
    assert sample(torch.tensor([0.0, 0.0, 0.0, 9.0]), greedy, early, None) != 3


def test_banned_strings_ban_the_rolled_back_token_at_its_position() -> None:
    s = full(banned_strings=["x"])
    c = SamplerContext(history=torch.tensor([0]), state=SamplerState(banned_now=frozenset({0})))
    assert probs(process_logits(L, s, c)) == [0.0, 0.5, 0.3, 0.2]


def test_banned_string_guard_holds_and_rolls_back() -> None:
    g = BannedStringGuard(["Hello"])
    assert g.feed("Say ", 0) == ("Say ", None)
    assert g.feed("hel", 1) == ("", None) and g.held_from == 1  # could become "hello"
    assert g.feed("lo", 2) == ("", 1)                            # did (any case): back to token 1
    assert g.held_from is None
    assert g.feed("help", 1) == ("help", None)                   # went another way: released
    g = BannedStringGuard(["hello"])
    assert g.feed("oh he", 0) == ("", None)                      # held from the token holding "he"
    assert g.feed("llo", 1) == ("", 0)
    g = BannedStringGuard(["ab"])
    assert g.feed("xa", 0) == ("", None)
    assert g.feed("c", 1) == ("xac", None)
    assert g.feed("a", 2) == ("", None) and g.flush() == "a"     # the end releases a partial match
    assert BannedStringGuard([]).feed("anything", 0) == ("anything", None)


def test_greedy_applies_only_the_token_control_and_penalty_stages() -> None:
    assert GREEDY_STAGES[0] == "logit_bias" and "dry_multiplier" in GREEDY_STAGES
    assert "temperature" not in GREEDY_STAGES and "top_k" not in GREEDY_STAGES


def test_list_and_dict_kinds_parse_from_strings() -> None:
    v = validate_settings({
        "banned_tokens": "1, 2,3", "logit_bias": "15:-2.5, 16:3", "banned_strings": '["a, b", "c"]',
        "dry_sequence_breakers": "\\n,:"})
    assert v["banned_tokens"] == [1, 2, 3]
    assert v["logit_bias"] == {15: -2.5, 16: 3.0}
    assert v["banned_strings"] == ["a, b", "c"]
    assert v["dry_sequence_breakers"] == ["\\n", ":"]
    assert validate_settings({"logit_bias": '{"7": 1}', "banned_tokens": "[4]"})["logit_bias"] == {7: 1.0}
    assert validate_settings({"banned_tokens": ""})["banned_tokens"] == []
    for bad, match in [({"banned_tokens": "a,b"}, "list of token ids"),
                       ({"banned_tokens": [-1]}, "negative token id"),
                       ({"logit_bias": "5"}, "token id -> bias"),
                       ({"logit_bias": {5: 500}}, "out of range"),
                       ({"banned_strings": 5}, "list of strings"),
                       ({"mirostat_mode": 1}, "allowed values"),
                       ({"temperature_last": 2}, "out of range")]:
        with pytest.raises(GenerationError, match=match):
            validate_settings(bad)


def test_spec_table_is_consistent() -> None:
    names = list(SAMPLERS)
    # the documented order of the stages that run
    running = [n for n in names if SAMPLERS[n].fn is not None]
    assert running == ["logit_bias", "banned_tokens", "banned_strings", "min_tokens", "repetition_penalty",
                       "presence_penalty", "frequency_penalty", "dry_multiplier", "temperature",
                       "smoothing_factor", "top_k", "top_p", "min_p", "typical_p", "tfs", "top_a",
                       "xtc_probability", "temperature_last", "skew"]
    for spec in SAMPLERS.values():
        assert spec.validate(spec.default) == spec.default
        if spec.kind in LIST_KINDS:
            assert spec.neutral == spec.default
    # every neutral setting at once still changes nothing
    neutral = {n: s.neutral for n, s in SAMPLERS.items() if s.fn is not None and s.gate is None}
    assert probs(process_logits(L, validate_settings({**neutral, "temperature": 1.0}), ctx())) == \
        [0.5, 0.25, 0.15, 0.1]


def test_builtin_presets_use_known_samplers_in_range() -> None:
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parents[1] / "resources" / "presets.json").read_text(encoding="utf-8"))
    names = [p["name"] for p in data["presets"]]
    assert names[:3] == ["Precise", "Balanced", "Creative"] and len(names) == len(set(names))
    for name in ("simple-1", "Divine Intellect", "Big O", "Mirostat", "min_p", "Universal-Light"):
        assert name in names
    for preset in data["presets"]:
        assert preset["description"]
        for key, value in preset["samplers"].items():
            assert key in SAMPLERS, (preset["name"], key)
            assert SAMPLERS[key].kind in ("float", "int"), (preset["name"], key)
            SAMPLERS[key].validate(value)
        validate_settings(preset["samplers"])


# --- the real model: same seed, same tokens -----------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def engine(smollm2_fp16_dir):
    """One thread: on a shared 2-core machine torch's thread pool contends and runs ~8x slower."""
    from app.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    e = Engine.load(smollm2_fp16_dir, device="cpu", max_seq_len=256)
    yield e
    e.unload()
    torch.set_num_threads(threads)


def _tokens(engine, samplers: dict, seed: int, n: int = 12) -> tuple[list[int], str]:
    from app.engine import GenerationSettings

    ids: list[int] = []
    text = []
    for chunk in engine.stream_chat(MESSAGES, GenerationSettings(max_new_tokens=n, samplers=samplers, seed=seed)):
        ids += chunk.token_ids
        text.append(chunk.text)
    return ids, "".join(text)


MIXED = {"temperature": 1.2, "top_k": 60, "min_p": 0.02, "typical_p": 0.95, "repetition_penalty": 1.1,
         "penalty_decay": 64, "dry_multiplier": 0.8, "xtc_probability": 0.5, "xtc_threshold": 0.1,
         "smoothing_factor": 0.3, "temperature_last": 1, "min_tokens": 4}


def test_same_seed_same_tokens_on_the_real_model(engine) -> None:
    a = _tokens(engine, MIXED, seed=11)
    assert a == _tokens(engine, MIXED, seed=11)
    assert len(a[0]) >= 4
    miro = {"temperature": 1.0, "mirostat_mode": 2, "mirostat_tau": 4.0, "dynatemp_low": 0.5,
            "dynatemp_high": 1.5}
    b = _tokens(engine, miro, seed=5, n=6)
    assert b == _tokens(engine, miro, seed=5, n=6)
    assert _tokens(engine, MIXED, seed=12)[0] != a[0]  # the seed matters: sampling is really on


def test_banned_string_is_rolled_back_and_resampled_on_the_real_model(engine) -> None:
    greedy = {"temperature": 0}
    _, plain = _tokens(engine, greedy, seed=0, n=10)
    word = max(plain.split(), key=len).strip(".,!?;:\"'")
    assert len(word) >= 3, plain
    _, banned = _tokens(engine, {**greedy, "banned_strings": [word.upper()]}, seed=0, n=10)
    assert word.lower() not in banned.lower()
    assert banned != plain
    prefix = plain[: plain.lower().find(word.lower())]
    assert banned.startswith(prefix)  # text before the banned word was kept, not regenerated


def test_draw_never_returns_a_zero_probability_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.multinomial on CUDA can pick a zero-probability index (pytorch#48841); draw() draws again.

    The CUDA defect is reproduced by making the first multinomial call answer a forbidden index."""
    from app.engine import samplers

    probs = torch.tensor([0.0, 0.25, 0.0, 0.75])
    real = torch.multinomial
    calls: list[int] = []

    def flaky(p: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        calls.append(1)
        return torch.tensor([2]) if len(calls) == 1 else real(p, n, generator=generator)

    monkeypatch.setattr(torch, "multinomial", flaky)
    picked = samplers.draw(probs, torch.Generator().manual_seed(0))
    assert picked in (1, 3) and len(calls) == 2
    monkeypatch.setattr(torch, "multinomial", real)
    g = torch.Generator().manual_seed(1)
    draws = [samplers.draw(probs, g) for _ in range(400)]
    assert set(draws) <= {1, 3} and 0.6 < draws.count(3) / 400 < 0.9
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [samplers.draw(probs, g1) for _ in range(20)] == [samplers.draw(probs, g2) for _ in range(20)]

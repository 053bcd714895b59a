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
        assert spec.minimum <= spec.default <= spec.maximum
        assert not math.isnan(float(spec.step))

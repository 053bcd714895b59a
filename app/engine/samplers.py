"""Samplers: one small function each, plus one declarative spec each.

The GUI's sampler panel, the CLI's `--sampler NAME=VALUE` flags and the server's request schema are
all generated from SAMPLERS. A sampler is added by writing its function and one `SamplerSpec` line.

Order: SAMPLERS is applied in its declared order, on float32 logits of one sequence:
  penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p -> draw.
Filters set removed tokens to -inf; a value equal to the spec's `neutral` skips the sampler.
Temperature 0 means greedy: the draw takes the argmax, whatever the filters did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import GenerationError

if TYPE_CHECKING:  # torch loads on first use, so the GUI can read SAMPLERS at start-up
    import torch


@dataclass
class SamplerContext:
    """What a sampler may look at besides the logits."""

    history: torch.Tensor  # 1-D int64: prompt + generated token ids (for penalties)
    generated_start: int = 0  # index in history where the completion begins
    settings: Mapping[str, Any] = field(default_factory=dict)


SamplerFn = Callable[["torch.Tensor", Any, SamplerContext], "torch.Tensor"]


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    label: str
    kind: str  # "float" | "int"
    default: Any
    minimum: float
    maximum: float
    step: float
    help: str
    group: str
    neutral: Any
    fn: SamplerFn = field(repr=False, compare=False)

    def validate(self, value: Any) -> Any:
        try:
            v = int(value) if self.kind == "int" else float(value)
        except (TypeError, ValueError) as e:
            raise GenerationError(f"sampler {self.name!r} needs a number, not {value!r}") from e
        if not (self.minimum <= v <= self.maximum):
            raise GenerationError(
                f"sampler {self.name!r} = {v} is out of range",
                hint=f"Use a value from {self.minimum} to {self.maximum}.")
        return v


_NEG_INF = float("-inf")


def _penalty_window(ctx: SamplerContext) -> torch.Tensor:

    rng = int(ctx.settings.get("penalty_range", 1024) or 0)
    h = ctx.history
    return h[-rng:] if rng > 0 else h


def repetition_penalty(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """CTRL-style: divide positive logits (multiply negative ones) of tokens already seen."""
    import torch

    ids = torch.unique(_penalty_window(ctx))
    if ids.numel() == 0:
        return logits
    sel = logits[ids]
    logits[ids] = torch.where(sel > 0, sel / value, sel * value)
    return logits


def presence_penalty(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Subtract a flat amount from every token already seen."""
    import torch

    ids = torch.unique(_penalty_window(ctx))
    if ids.numel():
        logits[ids] -= value
    return logits


def frequency_penalty(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Subtract an amount proportional to how often each token was seen."""
    import torch

    window = _penalty_window(ctx)
    if window.numel():
        counts = torch.bincount(window, minlength=logits.numel())[: logits.numel()]
        logits -= value * counts.to(logits.dtype)
    return logits


def temperature(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    if value <= 0:
        return logits  # greedy: handled by the draw
    return logits / value


def top_k(logits: torch.Tensor, value: int, ctx: SamplerContext) -> torch.Tensor:
    import torch

    k = int(value)
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, _NEG_INF)


def top_p(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    import torch

    if value >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = before >= value
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, _NEG_INF)


def min_p(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    import torch

    if value <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < value * probs.max(), _NEG_INF)


def _spec(name: str, label: str, kind: str, default: Any, lo: float, hi: float, step: float,
          group: str, help: str, fn: SamplerFn, neutral: Any | None = None) -> SamplerSpec:
    return SamplerSpec(name, label, kind, default, lo, hi, step, help, group,
                       default if neutral is None else neutral, fn)


_SPECS = [
    _spec("repetition_penalty", "Repetition penalty", "float", 1.0, 1.0, 3.0, 0.01, "Penalties",
          "Makes tokens that already appeared less likely (1 = off).", repetition_penalty),
    _spec("presence_penalty", "Presence penalty", "float", 0.0, -2.0, 2.0, 0.05, "Penalties",
          "Subtracts a flat amount from every token that already appeared (0 = off).", presence_penalty),
    _spec("frequency_penalty", "Frequency penalty", "float", 0.0, -2.0, 2.0, 0.05, "Penalties",
          "Subtracts an amount per repeat of each token that already appeared (0 = off).", frequency_penalty),
    _spec("temperature", "Temperature", "float", 0.8, 0.0, 5.0, 0.05, "Randomness",
          "Higher is more random, lower more focused; 0 always picks the most likely token.",
          temperature, neutral=1.0),
    _spec("top_k", "Top-K", "int", 0, 0, 1000, 1, "Filters",
          "Keep only the K most likely tokens (0 = off).", top_k),
    _spec("top_p", "Top-P", "float", 1.0, 0.0, 1.0, 0.01, "Filters",
          "Keep the most likely tokens whose probabilities add up to P (1 = off).", top_p),
    _spec("min_p", "Min-P", "float", 0.0, 0.0, 1.0, 0.01, "Filters",
          "Drop tokens less likely than Min-P times the most likely one (0 = off).", min_p),
]

SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in _SPECS}

# Settings that tune samplers but are not samplers themselves.
PENALTY_RANGE_DEFAULT = 1024


def validate_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check names and ranges; return a dict with every sampler present (defaults filled in)."""
    out: dict[str, Any] = {name: spec.default for name, spec in SAMPLERS.items()}
    for name, value in settings.items():
        if name == "penalty_range":
            out[name] = int(value)
            continue
        spec = SAMPLERS.get(name)
        if spec is None:
            raise GenerationError(f"unknown sampler {name!r}",
                                  hint=f"Known samplers: {', '.join(SAMPLERS)}.")
        out[name] = spec.validate(value)
    return out


def is_greedy(settings: Mapping[str, Any]) -> bool:
    return float(settings.get("temperature", 1.0)) <= 0.0


def process_logits(logits: torch.Tensor, settings: Mapping[str, Any], ctx: SamplerContext) -> torch.Tensor:
    """Run the pipeline on one row of logits (float32 copy) and return the filtered logits."""

    x = logits.float().clone()
    for name, spec in SAMPLERS.items():
        value = settings.get(name, spec.default)
        if value == spec.neutral:
            continue
        x = spec.fn(x, value, ctx)
    return x


def sample(logits: torch.Tensor, settings: Mapping[str, Any], ctx: SamplerContext,
           generator: torch.Generator | None) -> int:
    """Pick the next token id from one row of logits."""
    import torch

    if is_greedy(settings):
        x = logits.float().clone()
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            spec = SAMPLERS[name]
            value = settings.get(name, spec.default)
            if value != spec.neutral:
                x = spec.fn(x, value, ctx)
        return int(torch.argmax(x))
    x = process_logits(logits, settings, ctx)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))

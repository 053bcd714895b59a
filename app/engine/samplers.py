"""Samplers: one small function each, plus one declarative spec each.

The GUI's sampler panel, the CLI's `--sampler NAME=VALUE` flags and the server's request schema are
all generated from SAMPLERS. A sampler is added by writing its function and one `SamplerSpec` line.

Order: SAMPLERS is applied in its declared order, on float32 logits of one sequence (the order of
exllamav2 / text-generation-webui; docs/SAMPLERS.md explains each step):

  logit_bias -> banned_tokens -> banned_strings (ids banned here by a rollback) -> min_tokens (no EOS)
  -> repetition / presence / frequency penalties (over penalty_range, fading over penalty_decay)
  -> DRY -> temperature (unless temperature_last or dynamic temperature) -> smoothing (quadratic)
  -> top-k -> top-p -> min-p -> typical-p -> TFS -> top-a -> XTC
  -> temperature_last / dynamic temperature -> skew -> draw (Mirostat v2 when on, else multinomial)

A spec with `fn=None` is a parameter read by another sampler (penalty_range, dry_base, xtc_threshold,
mirostat_tau, ...); it never runs on its own. A sampler is skipped when its value equals the spec's
`neutral`, unless the spec has a `gate` (for samplers switched by other settings, like temperature).
Filters set removed tokens to -inf. Temperature 0 means greedy: the draw takes the argmax after the
token-control and penalty stages, whatever the later stages would have done.

Per-request state (Mirostat's mu, DRY's sequence breakers, ids banned by banned-string rollbacks)
lives in `SamplerState`; the generator creates one per request and passes it in every context.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import GenerationError

if TYPE_CHECKING:  # torch loads on first use, so the GUI can read SAMPLERS at start-up
    import torch

NUMERIC_KINDS = frozenset({"float", "int"})
LIST_KINDS = frozenset({"str_list", "int_list", "dict"})


@dataclass
class SamplerState:
    """What survives from one token to the next within one request."""

    mirostat_mu: float | None = None  # starts at 2 * tau on the first Mirostat draw
    dry_breakers: frozenset[int] = frozenset()  # token ids that end a DRY sequence match
    xtc_protected: frozenset[int] = frozenset()  # newline / EOS: XTC never removes these
    banned_now: frozenset[int] = frozenset()  # ids banned at this position by a banned-string rollback

    @classmethod
    def create(cls, settings: Mapping[str, Any], encode: Callable[[str], list[int]] | None = None,
               eos_ids: Iterable[int] = ()) -> SamplerState:
        """Turn string settings into token ids once per request (as text-generation-webui does,
        a breaker is the last token of encoding "a" + breaker, i.e. the breaker as it ends a word)."""
        breakers: set[int] = set()
        protected = set(eos_ids)
        if encode is not None:
            for text in settings.get("dry_sequence_breakers", SAMPLERS["dry_sequence_breakers"].default):
                ids = encode("a" + text)
                if ids:
                    breakers.add(ids[-1])
            newline = encode("a\n")
            if newline:
                protected.add(newline[-1])
        return cls(dry_breakers=frozenset(breakers), xtc_protected=frozenset(protected))


@dataclass
class SamplerContext:
    """What a sampler may look at besides the logits."""

    history: torch.Tensor  # 1-D int64: prompt + generated token ids (for penalties)
    generated_start: int = 0  # index in history where the completion begins
    settings: Mapping[str, Any] = field(default_factory=dict)
    eos_ids: frozenset[int] = frozenset()  # for min_tokens
    state: SamplerState = field(default_factory=SamplerState)
    generator: torch.Generator | None = None  # seeded RNG for XTC's coin flip (sample() sets it)

    @property
    def generated_count(self) -> int:
        return int(self.history.numel()) - self.generated_start


SamplerFn = Callable[["torch.Tensor", Any, SamplerContext], "torch.Tensor"]
Gate = Callable[[Mapping[str, Any]], bool]


def _parse_list_text(text: str, kind: str) -> Any:
    """JSON, or comma-separated ("1,2,3"; "a,b"; "15:-2.5,16:3" for dicts)."""
    stripped = text.strip()
    if not stripped:
        return {} if kind == "dict" else []
    if stripped[0] in "[{":
        return json.loads(stripped)
    parts = [p for p in (q.strip() for q in stripped.split(",")) if p]
    if kind == "dict":
        pairs = [p.split(":", 1) for p in parts]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("each entry must look like TOKEN_ID:BIAS")
        return {k.strip(): v.strip() for k, v in pairs}
    return parts


@dataclass(frozen=True)
class SamplerSpec:
    """One setting of the registry.

    kind: "float" | "int" (0/1 ints are switches) | "str_list" | "int_list" | "dict" ({token_id: bias}).
    For numeric kinds minimum/maximum bound the value; for int_list they bound each token id, for dict
    each bias, for str_list the number of strings.
    """

    name: str
    label: str
    kind: str
    default: Any
    minimum: float
    maximum: float
    step: float
    help: str
    group: str
    neutral: Any
    fn: SamplerFn | None = field(default=None, repr=False, compare=False)
    gate: Gate | None = field(default=None, repr=False, compare=False)

    def validate(self, value: Any) -> Any:
        if self.kind in LIST_KINDS:
            return self._validate_list(value)
        try:
            v = int(value) if self.kind == "int" else float(value)
        except (TypeError, ValueError) as e:
            raise GenerationError(f"sampler {self.name!r} needs a number, not {value!r}") from e
        if isinstance(v, float) and math.isnan(v):
            raise GenerationError(f"sampler {self.name!r} needs a number, not NaN")
        if not (self.minimum <= v <= self.maximum):
            raise GenerationError(
                f"sampler {self.name!r} = {v} is out of range",
                hint=f"Use a value from {self.minimum} to {self.maximum}.")
        if self.kind == "int" and (v - self.minimum) % self.step:
            raise GenerationError(f"sampler {self.name!r} = {v} is not one of its allowed values",
                                  hint=f"Use {self.minimum} to {self.maximum} in steps of {self.step}.")
        return v

    def _validate_list(self, value: Any) -> Any:
        what = {"str_list": "a list of strings", "int_list": "a list of token ids",
                "dict": "an object of token id -> bias"}[self.kind]
        try:
            if isinstance(value, str):
                value = _parse_list_text(value, self.kind)
            if self.kind == "dict":
                if not isinstance(value, Mapping):
                    raise ValueError
                out: Any = {int(k): float(b) for k, b in value.items()}
                bad = [b for b in out.values() if math.isnan(b) or not self.minimum <= b <= self.maximum]
                ids = list(out)
            else:
                if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                    raise ValueError
                out = [str(x) for x in value] if self.kind == "str_list" else [int(x) for x in value]
                if self.kind == "str_list" and any(not isinstance(x, str) for x in value):
                    raise ValueError
                bad = [] if self.kind == "str_list" else \
                    [x for x in out if not self.minimum <= x <= self.maximum]
                ids = out if self.kind == "int_list" else []
        except (TypeError, ValueError, json.JSONDecodeError) as e:
            raise GenerationError(
                f"sampler {self.name!r} needs {what}, not {value!r}",
                hint='Write JSON (e.g. [1, 2] or {"15": -5}) or comma-separated values (1,2 or 15:-5).') from e
        if any(i < 0 for i in ids):
            raise GenerationError(f"sampler {self.name!r} has a negative token id",
                                  hint="Token ids start at 0.")
        if bad:
            raise GenerationError(f"sampler {self.name!r} has values out of range: {bad[:5]}",
                                  hint=f"Use values from {self.minimum} to {self.maximum}.")
        if self.kind == "str_list" and not self.minimum <= len(out) <= self.maximum:
            raise GenerationError(f"sampler {self.name!r} has {len(out)} strings",
                                  hint=f"Give at most {int(self.maximum)}.")
        return out


_NEG_INF = float("-inf")


def _check_ids(name: str, ids: Iterable[int], vocab: int) -> None:
    """Token ids from the user must exist in this model's vocabulary."""
    too_big = [i for i in ids if i >= vocab]
    if too_big:
        raise GenerationError(f"sampler {name!r} names token id {too_big[0]}, but the model has {vocab} tokens",
                              hint="Use token ids of the loaded model (see `tokenize` in the CLI).")


# --- token control ---------------------------------------------------------------------------------

def logit_bias(logits: torch.Tensor, value: Mapping[int, float], ctx: SamplerContext) -> torch.Tensor:
    """Add a fixed bias to chosen token ids (OpenAI-style; -100 all but bans a token)."""
    _check_ids("logit_bias", value, logits.numel())
    for token, bias in value.items():
        logits[int(token)] += float(bias)
    return logits


def banned_tokens(logits: torch.Tensor, value: list[int], ctx: SamplerContext) -> torch.Tensor:
    """Never pick these token ids."""
    _check_ids("banned_tokens", value, logits.numel())
    logits[list(value)] = _NEG_INF
    return logits


def banned_strings(logits: torch.Tensor, value: list[str], ctx: SamplerContext) -> torch.Tensor:
    """Ids the generator banned at this position after rolling back a banned string."""
    if ctx.state.banned_now:
        logits[sorted(i for i in ctx.state.banned_now if i < logits.numel())] = _NEG_INF
    return logits


def min_tokens(logits: torch.Tensor, value: int, ctx: SamplerContext) -> torch.Tensor:
    """Suppress end-of-sequence tokens until `value` tokens have been generated."""
    if ctx.generated_count < int(value):
        ids = [i for i in ctx.eos_ids if i < logits.numel()]
        if ids:
            logits[ids] = _NEG_INF
    return logits


# --- penalties -------------------------------------------------------------------------------------

def _penalty_weights(ctx: SamplerContext, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (strength of its most recent occurrence, strength-weighted count).

    The last `penalty_range` tokens count fully (0 = the whole history); the `penalty_decay` tokens
    before them fade linearly toward no penalty, as exllamav2's sustain/decay does.
    """
    import torch

    rng = int(ctx.settings.get("penalty_range", PENALTY_RANGE_DEFAULT) or 0)
    decay = int(ctx.settings.get("penalty_decay", 0) or 0) if rng > 0 else 0
    h = ctx.history
    window = h[-(rng + decay):] if rng > 0 else h
    n = window.numel()
    back = torch.arange(n - 1, -1, -1, dtype=torch.float32)  # 0 = most recent
    w = torch.clamp(1.0 - (back - rng + 1).clamp(min=0) / (decay + 1), min=0.0) if rng > 0 else torch.ones(n)
    inside = window < vocab  # ids past the head's size (never sampled) carry no penalty
    window, w = window[inside], w[inside]
    strongest = torch.zeros(vocab).scatter_reduce(0, window, w, "amax", include_self=True)
    counts = torch.zeros(vocab).scatter_add(0, window, w)
    return strongest, counts


def repetition_penalty(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """CTRL-style: divide positive logits (multiply negative ones) of tokens already seen."""
    import torch

    strongest, _ = _penalty_weights(ctx, logits.numel())
    ids = torch.nonzero(strongest > 0).flatten()
    if ids.numel() == 0:
        return logits
    p = 1.0 + (value - 1.0) * strongest[ids]
    sel = logits[ids]
    logits[ids] = torch.where(sel > 0, sel / p, sel * p)
    return logits


def presence_penalty(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Subtract a flat amount from every token already seen."""
    strongest, _ = _penalty_weights(ctx, logits.numel())
    return logits - value * strongest


def frequency_penalty(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Subtract an amount proportional to how often each token was seen."""
    _, counts = _penalty_weights(ctx, logits.numel())
    return logits - value * counts


DRY_MAX_MATCH = 50  # longest match looked for; also keeps base ** length finite


def dry(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """DRY ("don't repeat yourself"): if the text so far ends with a sequence seen earlier, penalize
    the token that followed it then, by multiplier * base ** (match length - allowed length).

    Matching runs backwards from the end and stops at sequence breakers (text-generation-webui's rule).
    """
    s = ctx.settings
    base = float(s.get("dry_base", 1.75))
    allowed = int(s.get("dry_allowed_length", 2))
    rng = int(s.get("dry_range", 0) or 0)
    ids = ctx.history.tolist()
    if rng > 0:
        ids = ids[-rng:]
    if len(ids) < 2:
        return logits
    breakers = ctx.state.dry_breakers
    last = ids[-1]
    if last in breakers:
        return logits
    lengths: dict[int, int] = {}
    for i in range(len(ids) - 1):
        if ids[i] != last:
            continue
        nxt = ids[i + 1]
        if nxt in breakers:
            continue
        n = 1
        while n < DRY_MAX_MATCH and i - n >= 0:
            prev = ids[-(n + 1)]
            if ids[i - n] != prev or prev in breakers:
                break
            n += 1
        lengths[nxt] = max(n, lengths.get(nxt, 0))
    vocab = logits.numel()
    for token, n in lengths.items():
        if n >= allowed and token < vocab:
            logits[token] -= value * base ** (n - allowed)
    return logits


# --- temperature and shaping -----------------------------------------------------------------------

def _dynamic_temperature_on(s: Mapping[str, Any]) -> bool:
    return float(s.get("dynatemp_high", 1.0)) > float(s.get("dynatemp_low", 1.0))


def _late_temperature(s: Mapping[str, Any]) -> bool:
    """Temperature runs after the filters when asked, and always when it is dynamic."""
    return bool(int(s.get("temperature_last", 0))) or _dynamic_temperature_on(s)


def temperature(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    if value <= 0:
        return logits  # greedy: handled by the draw
    return logits / value


def smoothing(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Quadratic sampling: logit -> max - factor * d**2 (+ curve's cubic term), d = logit - max.

    smoothing_curve 1 is the plain quadratic; higher curves keep more of the top tokens' spread.
    """
    import torch

    curve = float(ctx.settings.get("smoothing_curve", 1.0))
    top = logits.max()
    d = logits - top
    k = (3.0 - curve) / 2.0
    s = (curve - 1.0) / 2.0
    shaped = -(k * value * d * d) + (s * value * d * d * d) + top
    return torch.where(torch.isfinite(logits), shaped, logits)


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


def _candidates(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, logits) of the tokens still in play, most likely first. After top-k or min-p this is a
    few dozen tokens, so the sorting samplers below cost little."""
    import torch

    ids = torch.nonzero(torch.isfinite(logits)).flatten()
    values, order = torch.sort(logits[ids], descending=True)
    return ids[order], values


def _keep_only(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    import torch

    out = torch.full_like(logits, _NEG_INF)
    out[ids] = logits[ids]
    return out


def typical_p(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, until
    their probabilities add up to p."""
    import torch

    ids, values = _candidates(logits)
    logp = torch.log_softmax(values, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nansum()
    order = torch.argsort((-logp - entropy).abs(), stable=True)
    cum = torch.cumsum(p[order], dim=-1)
    keep_n = min(int((cum < value).sum()) + 1, ids.numel())
    return _keep_only(logits, ids[order[:keep_n]])


def tfs(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Tail-free sampling: cut where the sorted distribution's second derivative has gathered
    `value` of its total mass (the first token is always kept, the last candidate always cut)."""
    import torch

    ids, values = _candidates(logits)
    n = ids.numel()
    if n < 3:
        return logits
    d2 = torch.softmax(values, dim=-1).diff().diff().abs()
    total = d2.sum()
    if total <= 0:
        return logits
    cdf = torch.cumsum(d2 / total, dim=-1)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[0] = True
    keep[1:n - 1] = cdf <= value
    return _keep_only(logits, ids[keep])


def top_a(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Drop tokens with probability below top_a * (top probability) ** 2."""
    import torch

    probs = torch.softmax(logits, dim=-1)
    top = probs.max()
    return logits.masked_fill(probs < value * top * top, _NEG_INF)


def xtc(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """Exclude Top Choices: with probability `value`, remove every token at or above xtc_threshold
    except the least likely of them. Skipped if that would remove a newline or EOS token."""
    import torch

    device = ctx.generator.device if ctx.generator is not None else "cpu"
    if float(torch.rand(1, generator=ctx.generator, device=device)) >= value:
        return logits
    threshold = float(ctx.settings.get("xtc_threshold", 0.1))
    ids, values = _candidates(logits)
    probs = torch.softmax(values, dim=-1)
    n_top = int((probs >= threshold).sum())
    if n_top < 2:
        return logits
    removed = set(ids[: n_top - 1].tolist())
    if removed & ctx.state.xtc_protected:
        return logits
    return _keep_only(logits, ids[n_top - 1:])


def dynamic_temperature(logits: torch.Tensor, ctx: SamplerContext) -> float:
    """Entropy-scaled temperature: low + (high - low) * (entropy / max entropy) ** exponent, over the
    tokens still in play (text-generation-webui's and exllamav2's formula)."""
    import torch

    s = ctx.settings
    low, high = float(s.get("dynatemp_low", 1.0)), float(s.get("dynatemp_high", 1.0))
    exponent = float(s.get("dynatemp_exponent", 1.0))
    probs = torch.softmax(logits, dim=-1)
    entropy = float(-(probs * torch.log(probs)).nansum())
    valid = int(torch.isfinite(logits).sum())
    max_entropy = math.log(valid) if valid > 1 else 0.0
    normalized = entropy / max_entropy if max_entropy > 0 else 0.0
    return max(low + (high - low) * max(normalized, 0.0) ** exponent, 1e-4)


def late_temperature(logits: torch.Tensor, value: int, ctx: SamplerContext) -> torch.Tensor:
    """temperature_last / dynamic temperature: scale what the filters left."""
    if _dynamic_temperature_on(ctx.settings):
        return logits / dynamic_temperature(logits, ctx)
    t = float(ctx.settings.get("temperature", 1.0))
    return logits / t if t > 0 else logits


def skew(logits: torch.Tensor, value: float, ctx: SamplerContext) -> torch.Tensor:
    """exllamav2's skew: the draw's uniform number r becomes r ** exp(-skew) over the candidates in
    descending order; as a distribution, q_k = C_k ** e - C_(k-1) ** e with e = exp(skew) and C the
    cumulative probabilities. Positive skew favours less likely tokens."""
    import torch

    ids, values = _candidates(logits)
    cum = torch.cumsum(torch.softmax(values, dim=-1), dim=-1).clamp(0.0, 1.0)
    q = torch.diff(cum.pow(math.exp(value)), prepend=torch.zeros(1))
    out = torch.full_like(logits, _NEG_INF)
    out[ids] = torch.where(q > 0, torch.log(q.clamp(min=1e-30)), torch.full_like(q, _NEG_INF))
    return out


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn from `probs` (a probability vector), never one whose probability is zero.

    torch.multinomial on CUDA can return a zero-probability index once in a few thousand draws over a
    large vocabulary (pytorch/pytorch#48841; its exponential race divides 0 by a 0 draw). A grammar
    mask or a banned token must never be broken by that, so such a draw is simply made again: the
    same seed still gives the same tokens, and on the CPU nothing changes."""
    import torch

    p = on_generator_device(probs, generator)
    for _ in range(16):
        pick = torch.multinomial(p, 1, generator=generator)
        index, weight = torch.cat([pick.to(p.dtype), p[pick]]).tolist()  # one host read for both
        if weight > 0:
            return int(index)
    return int(torch.argmax(p))


def on_generator_device(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw where the generator lives: on the GPU for a seeded GPU run (no host copy of the row)."""
    if generator is None:
        return probs if probs.is_cuda else probs.cpu()
    return probs.to(generator.device)


def mirostat_draw(logits: torch.Tensor, settings: Mapping[str, Any], state: SamplerState,
                  generator: torch.Generator | None) -> int:
    """Mirostat v2: keep the tokens whose surprise (-log2 p) is at most mu, draw among them, then move
    mu toward the target surprise tau by eta times the error."""
    import torch

    tau = float(settings.get("mirostat_tau", 5.0))
    eta = float(settings.get("mirostat_eta", 0.1))
    mu = state.mirostat_mu if state.mirostat_mu is not None else 2.0 * tau
    ids, values = _candidates(logits)
    probs = torch.softmax(values, dim=-1)
    keep = max(1, int((-torch.log2(probs) <= mu).sum()))
    kept = probs[:keep] / probs[:keep].sum()
    pick = draw(kept, generator)
    state.mirostat_mu = mu - eta * (-math.log2(float(kept[pick])) - tau)
    return int(ids[pick])


# --- registry --------------------------------------------------------------------------------------

def _spec(name: str, label: str, kind: str, default: Any, lo: float, hi: float, step: float,
          group: str, help: str, fn: SamplerFn | None = None, neutral: Any | None = None,
          gate: Gate | None = None) -> SamplerSpec:
    return SamplerSpec(name, label, kind, default, lo, hi, step, help, group,
                       default if neutral is None else neutral, fn, gate)


TOKEN_ID_MAX = 2**31 - 1
CONTEXT_MAX = 131072

_SPECS = [
    # Token control
    _spec("logit_bias", "Logit bias", "dict", {}, -100.0, 100.0, 0.5, "Token control",
          "Adds a bias to chosen token ids, {token_id: bias}; -100 all but bans a token.", logit_bias),
    _spec("banned_tokens", "Banned tokens", "int_list", [], 0, TOKEN_ID_MAX, 1, "Token control",
          "Token ids that are never picked.", banned_tokens),
    _spec("banned_strings", "Banned strings", "str_list", [], 0, 256, 1, "Token control",
          "Text that must never appear (any case). When it starts to appear, the reply is rolled back "
          "and a different token is chosen.", banned_strings),
    _spec("min_tokens", "Min tokens", "int", 0, 0, 16384, 1, "Token control",
          "The reply cannot end before this many tokens (0 = off).", min_tokens),
    # Penalties
    _spec("repetition_penalty", "Repetition penalty", "float", 1.0, 1.0, 3.0, 0.01, "Penalties",
          "Makes tokens that already appeared less likely (1 = off).", repetition_penalty),
    _spec("presence_penalty", "Presence penalty", "float", 0.0, -2.0, 2.0, 0.05, "Penalties",
          "Subtracts a flat amount from every token that already appeared (0 = off).", presence_penalty),
    _spec("frequency_penalty", "Frequency penalty", "float", 0.0, -2.0, 2.0, 0.05, "Penalties",
          "Subtracts an amount per repeat of each token that already appeared (0 = off).", frequency_penalty),
    _spec("penalty_range", "Penalty range", "int", 1024, 0, CONTEXT_MAX, 1, "Penalties",
          "How many recent tokens the penalties look at (0 = the whole conversation)."),
    _spec("penalty_decay", "Penalty decay", "int", 0, 0, CONTEXT_MAX, 1, "Penalties",
          "Tokens before the range whose penalty fades out gradually (0 = a hard edge)."),
    # DRY
    _spec("dry_multiplier", "DRY multiplier", "float", 0.0, 0.0, 5.0, 0.05, "DRY",
          "Penalizes continuing a sequence that already appeared, more the longer it is (0 = off).", dry),
    _spec("dry_base", "DRY base", "float", 1.75, 1.0, 4.0, 0.05, "DRY",
          "How fast the DRY penalty grows with each extra repeated token."),
    _spec("dry_allowed_length", "DRY allowed length", "int", 2, 1, 20, 1, "DRY",
          "Repeated sequences up to this long are not penalized."),
    _spec("dry_range", "DRY range", "int", 0, 0, CONTEXT_MAX, 1, "DRY",
          "How many recent tokens DRY searches (0 = the whole conversation)."),
    _spec("dry_sequence_breakers", "DRY sequence breakers", "str_list", ["\n", ":", "\"", "*"], 0, 64, 1,
          "DRY", "Text that interrupts a repeated sequence, so names and formatting are not penalized."),
    # Randomness: temperature (early) and smoothing
    _spec("temperature", "Temperature", "float", 0.8, 0.0, 5.0, 0.05, "Randomness",
          "Higher is more random, lower more focused; 0 always picks the most likely token.",
          temperature, neutral=1.0,
          gate=lambda s: not _late_temperature(s) and float(s.get("temperature", 0.8)) not in (1.0, 0.0)),
    _spec("smoothing_factor", "Smoothing factor", "float", 0.0, 0.0, 10.0, 0.01, "Randomness",
          "Quadratic sampling: evens out the top choices and cuts the tail (0 = off).", smoothing),
    _spec("smoothing_curve", "Smoothing curve", "float", 1.0, 1.0, 10.0, 0.1, "Randomness",
          "Shape of the smoothing: 1 is quadratic; higher keeps the top choices further apart."),
    # Filters
    _spec("top_k", "Top-K", "int", 0, 0, 1000, 1, "Filters",
          "Keep only the K most likely tokens (0 = off).", top_k),
    _spec("top_p", "Top-P", "float", 1.0, 0.0, 1.0, 0.01, "Filters",
          "Keep the most likely tokens whose probabilities add up to P (1 = off).", top_p),
    _spec("min_p", "Min-P", "float", 0.0, 0.0, 1.0, 0.01, "Filters",
          "Drop tokens less likely than Min-P times the most likely one (0 = off).", min_p),
    _spec("typical_p", "Typical-P", "float", 1.0, 0.0, 1.0, 0.01, "Filters",
          "Keep the tokens about as surprising as the average, up to this much probability (1 = off).",
          typical_p),
    _spec("tfs", "Tail-free (TFS)", "float", 1.0, 0.0, 1.0, 0.01, "Filters",
          "Cuts the flat tail of unlikely tokens; lower cuts more (1 = off).", tfs),
    _spec("top_a", "Top-A", "float", 0.0, 0.0, 1.0, 0.01, "Filters",
          "Drop tokens less likely than Top-A times the top probability squared (0 = off).", top_a),
    # XTC
    _spec("xtc_probability", "XTC probability", "float", 0.0, 0.0, 1.0, 0.01, "XTC",
          "How often XTC removes the most likely choices, for more original wording (0 = off).", xtc),
    _spec("xtc_threshold", "XTC threshold", "float", 0.1, 0.0, 0.5, 0.01, "XTC",
          "Tokens at least this likely count as top choices; all but the least likely are removed."),
    # Randomness: late temperature, dynamic temperature, skew
    _spec("temperature_last", "Temperature last", "int", 0, 0, 1, 1, "Randomness",
          "1 applies temperature after the filters, so filters see the model's own probabilities.",
          late_temperature, gate=_late_temperature),
    _spec("dynatemp_low", "Dynamic temp. low", "float", 1.0, 0.01, 5.0, 0.01, "Randomness",
          "Dynamic temperature: the temperature when the model is sure of the next token."),
    _spec("dynatemp_high", "Dynamic temp. high", "float", 1.0, 0.01, 5.0, 0.01, "Randomness",
          "Dynamic temperature: the temperature when the model is unsure. Above 'low' turns it on "
          "(it replaces Temperature and runs after the filters)."),
    _spec("dynatemp_exponent", "Dynamic temp. exponent", "float", 1.0, 0.01, 5.0, 0.01, "Randomness",
          "Curve between low and high: above 1 stays near low longer."),
    _spec("skew", "Skew", "float", 0.0, -5.0, 5.0, 0.01, "Randomness",
          "Tilts the final draw: positive favours less likely tokens, negative likelier ones (0 = off).",
          skew),
    # Mirostat (replaces the draw)
    _spec("mirostat_mode", "Mirostat mode", "int", 0, 0, 2, 2, "Mirostat",
          "2 turns on Mirostat v2, which steers the surprise of each token toward Tau (0 = off)."),
    _spec("mirostat_tau", "Mirostat tau", "float", 5.0, 0.0, 10.0, 0.01, "Mirostat",
          "Target surprise: higher is more varied."),
    _spec("mirostat_eta", "Mirostat eta", "float", 0.1, 0.0, 1.0, 0.01, "Mirostat",
          "How fast Mirostat corrects toward Tau."),
]

SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in _SPECS}

PENALTY_RANGE_DEFAULT = 1024
# Stages that still apply in greedy mode (temperature 0): everything before temperature.
GREEDY_STAGES: tuple[str, ...] = tuple(
    name for name in list(SAMPLERS)[: list(SAMPLERS).index("temperature")] if SAMPLERS[name].fn)


def validate_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check names and ranges; return a dict with every sampler present (defaults filled in)."""
    out: dict[str, Any] = {name: spec.default for name, spec in SAMPLERS.items()}
    for name, value in settings.items():
        spec = SAMPLERS.get(name)
        if spec is None:
            raise GenerationError(f"unknown sampler {name!r}",
                                  hint=f"Known samplers: {', '.join(SAMPLERS)}.")
        out[name] = spec.validate(value)
    return out


def is_greedy(settings: Mapping[str, Any]) -> bool:
    return float(settings.get("temperature", 1.0)) <= 0.0


def mirostat_on(settings: Mapping[str, Any]) -> bool:
    return int(settings.get("mirostat_mode", 0)) == 2


def _runs(spec: SamplerSpec, settings: Mapping[str, Any]) -> bool:
    if spec.fn is None:
        return False
    if spec.gate is not None:
        return spec.gate(settings)
    return settings.get(spec.name, spec.default) != spec.neutral


def process_logits(logits: torch.Tensor, settings: Mapping[str, Any], ctx: SamplerContext,
                   stages: Iterable[str] | None = None) -> torch.Tensor:
    """Run the pipeline (or only `stages`) on one row of logits (float32 copy); return the result.

    Mirostat is a way of drawing, not a filter, so it is not part of this. Samplers read their
    parameters (dry_base, xtc_threshold, ...) from ctx.settings, so `settings` becomes ctx.settings."""
    ctx.settings = settings
    x = logits.float().clone()
    names = SAMPLERS if stages is None else stages
    for name in names:
        spec = SAMPLERS[name]
        if _runs(spec, settings):
            x = spec.fn(x, settings.get(name, spec.default), ctx)  # type: ignore[misc]
    return x


def sample(logits: torch.Tensor, settings: Mapping[str, Any], ctx: SamplerContext,
           generator: torch.Generator | None) -> int:
    """Pick the next token id from one row of logits."""
    import torch

    ctx.generator = generator
    if is_greedy(settings):
        return int(torch.argmax(process_logits(logits, settings, ctx, GREEDY_STAGES)))
    x = process_logits(logits, settings, ctx)
    if not bool(torch.isfinite(x).any()):
        raise GenerationError("the samplers removed every token",
                              hint="Loosen the filters or remove some banned tokens/strings.")
    if mirostat_on(settings):
        return mirostat_draw(x, settings, ctx.state, generator)
    probs = torch.softmax(x, dim=-1)
    return draw(probs, generator)



def probabilities(logits: torch.Tensor, settings: Mapping[str, Any], ctx: SamplerContext,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The distribution sample() draws from, as a probability vector (float32, on the logits' device).

    Speculative decoding needs p itself to accept or reject a drafted token. Greedy gives a one-hot
    vector at sample()'s argmax. Mirostat's draw depends on state it updates, so it has no p here."""
    import torch

    ctx.generator = generator
    if is_greedy(settings):
        top = int(torch.argmax(process_logits(logits, settings, ctx, GREEDY_STAGES)))
        p = torch.zeros(logits.numel(), device=logits.device)
        p[top] = 1.0
        return p
    x = process_logits(logits, settings, ctx)
    if not bool(torch.isfinite(x).any()):
        raise GenerationError("the samplers removed every token",
                              hint="Loosen the filters or remove some banned tokens/strings.")
    return torch.softmax(x, dim=-1)

# --- banned strings: text side of the rollback (the generator rewinds the cache) -------------------

class BannedStringGuard:
    """Holds back streamed text while it could still become a banned string (case-insensitive).

    feed() gets each token's new text with the token's index in the completion and answers
    (text safe to release, index to roll back to or None). On a rollback the generator discards
    tokens from that index on, bans the token at that index for that position, and samples again.
    Text is held at token boundaries, so a rollback never takes back text already released.
    """

    def __init__(self, banned: Iterable[str]) -> None:
        self.banned = tuple(dict.fromkeys(s.lower() for s in banned if s))
        self._held = ""
        self._starts: list[tuple[int, int]] = []  # (token index, offset of its text in _held)

    @property
    def held_from(self) -> int | None:
        """Index of the first token whose text is held (logits from there on may be needed)."""
        return self._starts[0][0] if self._starts else None

    def _token_at(self, offset: int) -> int:
        """Position in _starts of the token whose text contains `offset`."""
        pos = 0
        for j, (_, start) in enumerate(self._starts):
            if start <= offset:
                pos = j
        return pos

    def _partial_start(self, low: str) -> int:
        """Earliest offset from which the text could still grow into a banned string."""
        for i in range(len(low)):
            tail = low[i:]
            if any(b.startswith(tail) for b in self.banned):
                return i
        return len(low)

    def feed(self, text: str, index: int) -> tuple[str, int | None]:
        if not self.banned:
            return text, None
        self._starts.append((index, len(self._held)))
        self._held += text
        low = self._held.lower()
        hits = [i for i in (low.find(b) for b in self.banned) if i >= 0]
        if hits:
            j = self._token_at(min(hits))
            token_index, start = self._starts[j]
            self._held = self._held[:start]
            self._starts = self._starts[:j]
            return "", token_index
        cut = self._partial_start(low)
        if cut == len(low):
            out, self._held, self._starts = self._held, "", []
            return out, None
        j = self._token_at(cut)
        start = self._starts[j][1]
        out = self._held[:start]
        self._held = self._held[start:]
        self._starts = [(t, o - start) for t, o in self._starts[j:]]
        return out, None

    def flush(self) -> str:
        """At the end of the reply, held text never became a banned string: release it."""
        out, self._held, self._starts = self._held, "", []
        return out

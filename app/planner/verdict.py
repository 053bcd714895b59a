"""Plain-words fit verdicts and suggestions, for the model browser's badge and pre-load warnings."""

from __future__ import annotations

from dataclasses import dataclass

from .estimate import Estimate, cache_modes, estimate, max_context, with_bpw

FITS = "fits"
FITS_WITH_CHANGES = "fits_with_changes"
DOES_NOT_FIT = "does_not_fit"

MIN_USEFUL_CONTEXT = 512        # below this a chat is not worth suggesting
TIGHT_FRACTION = 0.05           # less spare than this (of free memory) is called tight
SMALLER_CHUNKS = (1024, 512, 256)
COMMON_BPW = (8.0, 6.5, 6.0, 5.0, 4.65, 4.25, 4.0, 3.5, 3.0, 2.5, 2.25)  # usual EXL2 branches
CACHE_LABELS = {"fp16": "FP16", "q8": "Q8", "q6": "Q6", "q4": "Q4"}


def format_bytes(n: int) -> str:
    """Memory as people read it in GPU tools (binary units)."""
    if abs(n) >= 1000 * 1024 ** 2:
        return f"{n / 1024 ** 3:.1f} GiB"
    return f"{n / 1024 ** 2:.0f} MiB"


@dataclass(frozen=True)
class Suggestion:
    kind: str                 # "cache_mode" | "context" | "cache_mode+context" | "chunk_size" | "bpw"
    value: object             # the new setting ("q4", 8192, 512, 4.0 ...)
    text: str
    total_bytes: int          # the estimate with this change


@dataclass(frozen=True)
class Verdict:
    level: str                # FITS | FITS_WITH_CHANGES | DOES_NOT_FIT
    text: str
    needed_bytes: int
    free_bytes: int
    suggestions: tuple[Suggestion, ...] = ()

    @property
    def spare_bytes(self) -> int:
        return self.free_bytes - self.needed_bytes


def _round_context(n: int) -> int:
    """Friendlier numbers: whole multiples of 256 tokens (rounding down keeps it fitting)."""
    return n - n % 256 if n >= 1024 else n


def suggestions(est: Estimate, free_bytes: int) -> list[Suggestion]:
    """Single changes that make the estimate fit, least harmful first."""
    m, o = est.model, est.overheads
    out: list[Suggestion] = []

    def total(**changes: object) -> int:
        args = {"model": m, "context": est.context, "cache_mode": est.cache_mode, "chunk_size": est.chunk_size,
                "batch": est.batch, "overheads": o, **changes}
        return estimate(**args).total  # type: ignore[arg-type]

    modes = cache_modes()
    smaller_modes = modes[modes.index(est.cache_mode) + 1:]
    for mode in smaller_modes:
        t = total(cache_mode=mode)
        if t <= free_bytes:
            out.append(Suggestion("cache_mode", mode, f"Use the {CACHE_LABELS.get(mode, mode)} cache "
                                  f"(needs {format_bytes(t)}).", t))
            break
    for chunk in SMALLER_CHUNKS:
        if chunk < min(est.chunk_size, est.context) and (t := total(chunk_size=chunk)) <= free_bytes:
            out.append(Suggestion("chunk_size", chunk, f"Process the prompt in chunks of {chunk} tokens "
                                  f"(needs {format_bytes(t)}; long prompts start a little slower).", t))
            break
    n = _round_context(max_context(m, free_bytes, est.cache_mode, est.chunk_size, est.batch, o,
                                   limit=est.context - 1))
    if n >= MIN_USEFUL_CONTEXT:
        t = total(context=n)
        out.append(Suggestion("context", n, f"Reduce the context to {n:,} tokens (needs {format_bytes(t)}).", t))
    if smaller_modes and not any(s.kind == "cache_mode" for s in out):
        q = smaller_modes[-1]
        n_q = _round_context(max_context(m, free_bytes, q, est.chunk_size, est.batch, o, limit=est.context - 1))
        if n_q >= MIN_USEFUL_CONTEXT and n_q > n:
            t = total(cache_mode=q, context=n_q)
            out.append(Suggestion("cache_mode+context", (q, n_q), f"Use the {CACHE_LABELS.get(q, q)} cache and a "
                                  f"context of {n_q:,} tokens (needs {format_bytes(t)}).", t))
    for bpw in COMMON_BPW:
        if bpw < m.bits_per_weight - 1e-6:
            t = estimate(with_bpw(m, bpw), est.context, est.cache_mode, est.chunk_size, est.batch, o).total
            if t <= free_bytes:
                out.append(Suggestion("bpw", bpw, f"Use a {bpw:g} bpw quantization of this model "
                                      f"(needs {format_bytes(t)}).", t))
                break
    return out


def verdict(est: Estimate, free_bytes: int) -> Verdict:
    """Does it fit in `free_bytes`, in plain words, and what would make it fit."""
    need = est.total
    if need <= free_bytes:
        spare = free_bytes - need
        tight = spare < TIGHT_FRACTION * free_bytes
        text = (f"{'Fits, but tightly' if tight else 'Fits'}: needs about {format_bytes(need)} of the "
                f"{format_bytes(free_bytes)} free ({format_bytes(spare)} to spare).")
        return Verdict(FITS, text, need, free_bytes)
    found = tuple(suggestions(est, free_bytes))
    short = f"needs about {format_bytes(need)} but only {format_bytes(free_bytes)} is free"
    if found:
        return Verdict(FITS_WITH_CHANGES, f"Does not fit as set up: {short}. It fits with one of these changes.",
                       need, free_bytes, found)
    return Verdict(DOES_NOT_FIT, f"Does not fit: {short}, and no smaller context, cache or quantization makes "
                   "it fit. Choose a smaller model or a GPU with more memory.", need, free_bytes)

"""Speculative decoding: a cheap drafter proposes k tokens, the model checks them in one forward pass.

Used by the one generator (generator.py) through two hooks: `Speculation.pick` replaces the draw of
a token and `Speculation.advance` replaces the one-token forward pass. Everything else in the decode
loop (stop strings, EOS, max_new_tokens, cancel, banned-string rollback, streaming one chunk per
token) runs unchanged, token by token, so it behaves exactly as without speculation.

How a step works: after a token is committed, the drafter proposes d_1..d_k; the model runs once
over [token, d_1..d_k] at the cache's end (T = k+1), which gives its logits at every drafted
position. The loop then draws position by position from those logits with the true history, so
history-dependent samplers (penalties, DRY, min_tokens, banned strings) see exactly what they would
see without speculation:
  * greedy: the token is sample()'s argmax; the draft is accepted when it is the same token, so the
    output is identical to plain decoding;
  * sampling: the draft d ~ q is accepted with probability min(1, p(d)/q(d)), else a token is drawn
    from norm(max(0, p - q)) (Leviathan et al. 2023), where p is the distribution after Kestrel's
    samplers (samplers.probabilities). This preserves p exactly. N-gram drafts are a point mass.
On the first rejected position the drafted tokens after it are dropped from the cache (truncate).
Mirostat's draw updates state from the drawn token's probability among its own truncation, so it has
no fixed p to check against: requests with Mirostat fall back to plain decoding (logged).

Drafters: a draft model sharing the tokenizer (its own KV cache and prefix reuse, via a second
Generator), or n-gram prompt lookup (the latest earlier occurrence of the last n tokens in the
prompt + reply; its continuation is the draft), which needs no second model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .errors import GenerationError, OutOfMemoryError, TokenizerError
from .samplers import (
    SamplerContext,
    SamplerState,
    draw,
    is_greedy,
    mirostat_on,
    probabilities,
    sample,
)

if TYPE_CHECKING:
    from .generator import Generator
    from .loader import Progress
    from .tokenizer import Tokenizer
    from .types import GenerationSettings

log = logging.getLogger(__name__)

MODES = ("draft", "ngram", "off")
DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 64
NGRAM_MAX = 4  # longest suffix looked up in the history
NGRAM_MIN = 2  # shortest; single-token matches propose too much noise


@dataclass
class Proposal:
    """One drafted token and the distribution it was drawn from (None: a point mass)."""

    token: int
    q: torch.Tensor | None = None


# --- the acceptance rule ---------------------------------------------------------------------------

def speculative_pick(p: torch.Tensor, token: int, q: torch.Tensor | None,
                     generator: torch.Generator | None) -> int:
    """Accept drafted `token` ~ q with probability min(1, p/q), else draw from norm(max(0, p - q)).

    The result is distributed exactly as p. q may be longer or shorter than p (a draft head padded
    differently): mass outside p's vocabulary simply never gets accepted, which keeps the rule exact.
    """
    p = p.float().cpu()
    vocab = p.numel()
    if q is None:
        qv = torch.zeros(vocab)
        if token < vocab:
            qv[token] = 1.0
    else:
        q = q.float().cpu()
        qv = q[:vocab] if q.numel() >= vocab else torch.cat([q, torch.zeros(vocab - q.numel())])
    if token < vocab and float(qv[token]) > 0:
        ratio = float(p[token]) / float(qv[token])
        device = generator.device if generator is not None else "cpu"
        if float(torch.rand(1, generator=generator, device=device)) < ratio:
            return token
    residual = (p - qv).clamp(min=0.0)
    if float(residual.sum()) <= 0.0:  # p <= q everywhere but the draw was refused: only by rounding
        residual = p
    return draw(residual, generator)


# --- drafters --------------------------------------------------------------------------------------

class Drafter(Protocol):
    def propose(self, history: torch.Tensor, k: int, spec: Speculation) -> list[Proposal]: ...


def ngram_lookup(history: torch.Tensor, k: int, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> list[int]:
    """Prompt lookup: find the latest earlier place where the last n tokens (longest n first) occur,
    and return up to k tokens that followed them there."""
    h = history.reshape(-1)
    length = h.numel()
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = h[-n:]
        windows = h[:-1].unfold(0, n, 1)  # window i covers i..i+n-1; a continuation follows each
        hits = torch.nonzero((windows == tail).all(dim=1)).flatten()
        if hits.numel():
            start = int(hits[-1]) + n
            return h[start: start + k].tolist()
    return []


class NgramDrafter:
    def propose(self, history: torch.Tensor, k: int, spec: Speculation) -> list[Proposal]:
        return [Proposal(t) for t in ngram_lookup(history, k)]


class DraftModel:
    """A smaller model sharing the target's tokenizer; its own Generator keeps its own KV cache, and
    reuses the cached prefix, so each step only feeds it the tokens committed since the last one."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.path = generator.model.path

    def propose(self, history: torch.Tensor, k: int, spec: Speculation) -> list[Proposal]:
        g = self.generator
        logits = g._prefill(history.tolist())
        out: list[Proposal] = []
        hist = history
        for j in range(k):
            ctx = spec.draft_context(hist)
            try:
                if spec.greedy:
                    prop = Proposal(sample(logits, spec.samplers, ctx, None))
                else:
                    q = probabilities(logits, spec.samplers, ctx, spec.draft_rng).cpu()
                    prop = Proposal(draw(q, spec.draft_rng), q)
            except GenerationError:  # e.g. a logit bias naming an id past the draft's head: stop here
                break
            out.append(prop)
            if j == k - 1 or prop.token in spec.eos_ids:
                break
            hist = torch.cat([hist, torch.tensor([prop.token])])
            logits = g._decode_one(prop.token, len(g._cached_ids))  # a CUDA-graph replay where possible
            g._cached_ids.append(prop.token)
        return out


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer) -> None:
    """A draft proposes token ids, so both models must give every id the same meaning."""
    where = f"draft {draft.folder} vs model {target.folder}"
    if draft.vocab_size != target.vocab_size:
        raise TokenizerError(
            f"the draft model's tokenizer has {draft.vocab_size} tokens, the model's {target.vocab_size} "
            f"({where})", path=draft.folder,
            hint="Pick a draft model of the same family that shares the tokenizer.")
    for i in range(target.vocab_size):
        a, b = target.id_to_token(i), draft.id_to_token(i)
        if a != b:
            raise TokenizerError(
                f"the tokenizers differ at token id {i}: {b!r} in the draft, {a!r} in the model ({where})",
                path=draft.folder, hint="Pick a draft model of the same family that shares the tokenizer.")


def load_draft(path: str, target: Generator, *, backend: str | None = None,
               progress: Progress | None = None) -> DraftModel:
    """Load a draft model onto the target's device, with a cache as long as the target's."""
    from .generator import Generator
    from .loader import load_model
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(path)
    check_same_tokenizer(target.tokenizer, tokenizer)
    model = load_model(path, target.model.device, backend=backend, progress=progress)
    return DraftModel(Generator(model, tokenizer, target.max_seq_len, target.cache_mode))


@dataclass
class Options:
    """Engine-wide speculative decoding: the draft model, and the mode and draft length requests get
    when their GenerationSettings leave them None (mode None: "draft" when a draft is loaded)."""

    draft: DraftModel | None = None
    mode: str | None = None
    draft_tokens: int = DEFAULT_DRAFT_TOKENS


def check(mode: str | None, draft_tokens: int | None) -> None:
    if mode is not None and mode not in MODES:
        raise GenerationError(f"unknown speculative mode {mode!r}", hint=f"Use one of {', '.join(MODES)}.")
    if draft_tokens is not None and not 1 <= int(draft_tokens) <= MAX_DRAFT_TOKENS:
        raise GenerationError(f"draft_tokens = {draft_tokens} is out of range",
                              hint=f"Use 1 to {MAX_DRAFT_TOKENS}.")


# --- one request -----------------------------------------------------------------------------------

class Speculation:
    """One request's speculative state: drafted tokens already in the model's cache, each with the
    model's logits after it, plus acceptance counters."""

    def __init__(self, target: Generator, drafter: Drafter, k: int, samplers: dict, n_prompt: int,
                 state: SamplerState, seed: int | None) -> None:
        self.target = target
        self.drafter = drafter
        self.k = k
        self.samplers = samplers
        self.greedy = is_greedy(samplers)
        self.n_prompt = n_prompt
        self.eos_ids = target.tokenizer.eos_ids
        self.draft_state = dataclasses.replace(state, banned_now=frozenset())
        self.draft_rng = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        self.pending: list[tuple[Proposal, torch.Tensor]] = []  # (draft, model logits after it)
        self.proposed = 0  # drafted tokens checked
        self.accepted = 0  # ... and accepted
        self.passes = 0  # forward passes of the model over drafts
        self._hit = False

    def draft_context(self, history: torch.Tensor) -> SamplerContext:
        return SamplerContext(history=history, generated_start=self.n_prompt, settings=self.samplers,
                              eos_ids=self.eos_ids, state=self.draft_state)

    def pick(self, logits: torch.Tensor, samplers: dict, ctx: SamplerContext,
             generator: torch.Generator | None) -> int:
        """Draw the token at this position: checks the pending draft for it, if there is one."""
        if not self.pending:
            self._hit = False
            return sample(logits, samplers, ctx, generator)
        draft = self.pending[0][0]
        if self.greedy:
            token = sample(logits, samplers, ctx, generator)
        else:
            token = speculative_pick(probabilities(logits, samplers, ctx, generator), draft.token,
                                     draft.q, generator)
        self._hit = token == draft.token  # a refused draft is never redrawn (its residual is 0)
        self.proposed += 1
        self.accepted += self._hit
        return token

    def advance(self, history: torch.Tensor, remaining: int) -> torch.Tensor:
        """The model's logits after history[-1] (just committed): from the pending drafts when it was
        the drafted token, else drop the drafts and run the model over [token, new drafts]."""
        if self.pending and self._hit:
            return self.pending.pop(0)[1]
        g = self.target
        if self.pending:
            keep = len(g._cached_ids) - len(self.pending)
            g.cache.truncate(keep)
            del g._cached_ids[keep:]
            self.pending = []
        pos = len(g._cached_ids)
        # Only drafts the loop can still use: `remaining` draws left, the first needs no draft.
        k = max(0, min(self.k, remaining - 1, g.max_seq_len - pos - 1))
        token = int(history[-1])
        try:
            drafts = self.drafter.propose(history, k, self) if k else []
            ids = [token] + [d.token for d in drafts]
            out = g._decode_many(ids, pos)  # the model over [token, drafts] in one step (a graph per count)
        except torch.cuda.OutOfMemoryError as e:
            raise OutOfMemoryError("the GPU ran out of memory mid-reply (speculative decoding)",
                                   hint="Use a smaller context, a smaller draft or none, or a Q4 cache.") from e
        g._cached_ids.extend(ids)
        self.pending = [(d, out[j + 1]) for j, d in enumerate(drafts)]
        self.passes += bool(drafts)
        return out[0]

    def reset(self) -> None:
        """After a banned-string rollback the generator has cut the cache back itself."""
        self.pending = []
        self._hit = False


def start(target: Generator, settings: GenerationSettings, samplers: dict, n_prompt: int,
          state: SamplerState) -> Speculation | None:
    """This request's Speculation, or None for plain decoding."""
    opts: Options = target.speculation
    draft = opts.draft
    mode = settings.speculative or opts.mode or ("draft" if draft is not None else "off")
    check(mode, settings.draft_tokens)
    if mode == "off":
        return None
    k = int(settings.draft_tokens or opts.draft_tokens)
    if mode == "draft" and draft is None:
        raise GenerationError("speculative decoding with a draft model was asked, but none is loaded",
                              hint="Load one with --draft DIR (or Engine.set_draft), or use 'ngram'.")
    if mirostat_on(samplers):
        log.info("speculative decoding is off for this request: Mirostat's draw has no fixed "
                 "distribution to check drafts against; decoding plainly")
        return None
    drafter: Drafter = draft if mode == "draft" else NgramDrafter()  # type: ignore[assignment]
    return Speculation(target, drafter, k, samplers, n_prompt, state, settings.seed)


def counts(spec: Speculation | None) -> dict[str, int]:
    """The Chunk's counters: drafted tokens checked, and accepted."""
    if spec is None:
        return {}
    return {"draft_proposed": spec.proposed, "draft_accepted": spec.accepted}

"""Per-token log-probabilities for the API's `logprobs` / `top_logprobs` (OpenAI's meaning: the model's
own distribution at that position, before Kestrel's samplers or a grammar reshape it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .types import TokenLogprob

if TYPE_CHECKING:
    import torch

    from .tokenizer import Tokenizer


def token_logprob(tokenizer: Tokenizer, logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The chosen token's logprob plus the `top_n` most likely tokens (ids past the vocab are skipped)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, str, float]] = []
    if top_n > 0:
        values, ids = torch.topk(logp, min(top_n, logp.numel()))
        for i, v in zip(ids.tolist(), values.tolist()):
            if i < tokenizer.vocab_size:
                top.append((i, tokenizer.token_to_piece(i), float(v)))
    return TokenLogprob(token, tokenizer.token_to_piece(token), float(logp[token]), top)

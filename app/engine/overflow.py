"""What happens when a chat no longer fits the context: a policy the user picks, never silent truncation.

  "stop"         refuse with ContextFullError, which says the chat is full and what to do
  "drop_oldest"  leave out the oldest whole turns (a user message and the replies after it) until
                 the rest fits, always keeping the system prompt(s) and the latest turn; the caller
                 is told which messages were left out so it can show it

"Fits" means the prompt plus room for the reply: min(max_new_tokens, context / 4) tokens, at least 1.
Pure functions over a token-counting callback, so the engine, the CLI and tests share one rule.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import ContextFullError, GenerationError

OVERFLOW_POLICIES: dict[str, str] = {
    "stop": "Stop with a message when the chat is full",
    "drop_oldest": "Drop the oldest turns (keeps the system prompt)",
}


def reply_room(max_seq_len: int, max_new_tokens: int) -> int:
    """Tokens kept free for the reply when deciding whether a chat fits."""
    return max(1, min(max_new_tokens, max_seq_len // 4))


def turn_starts(messages: list[dict]) -> list[int]:
    """Indices where a droppable turn begins: each non-system message that follows a system one or
    starts with a user message (assistant messages stay with the user message before them)."""
    starts = []
    for i, m in enumerate(messages):
        if m.get("role") == "system":
            continue
        if m.get("role") == "user" or not starts:
            starts.append(i)
    return starts


def check_policy(policy: str) -> str:
    if policy not in OVERFLOW_POLICIES:
        raise GenerationError(f"unknown context overflow policy {policy!r}",
                              hint=f"Use one of {', '.join(OVERFLOW_POLICIES)}.")
    return policy


def fit_messages(messages: list[dict], count: Callable[[list[dict]], int], max_seq_len: int,
                 max_new_tokens: int, policy: str = "stop") -> tuple[list[dict], list[int]]:
    """Return (messages to send, indices of `messages` left out) under `policy`.

    Raises ContextFullError when the policy is "stop" and the chat is too long, or when even the
    system prompt plus the latest turn alone do not fit.
    """
    check_policy(policy)
    room = reply_room(max_seq_len, max_new_tokens)
    limit = max_seq_len - room
    used = count(messages)
    if used <= limit:
        return messages, []
    if policy == "stop":
        raise ContextFullError(
            f"the chat is full: it takes {used:,} tokens and the context holds {max_seq_len:,} "
            f"(with {room:,} kept for the reply)",
            hint="Start a new chat, delete or shorten earlier messages, switch the context overflow "
                 "setting to 'drop oldest turns', or load the model with a longer context.")
    starts = turn_starts(messages)

    def without_first(k: int) -> tuple[list[dict], list[int]]:
        """Drop the first k turns (k < len(starts))."""
        dropped = list(range(starts[0], starts[k])) if k else []
        dropped = [i for i in dropped if messages[i].get("role") != "system"]
        gone = set(dropped)
        return [m for i, m in enumerate(messages) if i not in gone], dropped

    lo, hi = 1, len(starts) - 1  # smallest k whose remainder fits, searched over 1..len-1
    best: tuple[list[dict], list[int]] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        kept, dropped = without_first(mid)
        if count(kept) <= limit:
            best, hi = (kept, dropped), mid - 1
        else:
            lo = mid + 1
    if best is None:
        kept, _ = without_first(max(0, len(starts) - 1))
        raise ContextFullError(
            f"the latest message does not fit: with the system prompt it takes {count(kept):,} tokens "
            f"and the context holds {max_seq_len:,} (with {room:,} kept for the reply)",
            hint="Shorten the message or the system prompt, or load the model with a longer context.")
    return best

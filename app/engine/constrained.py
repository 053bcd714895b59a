"""Constrained decoding: JSON schema, regular expression or "any JSON object" output, via llguidance.

A Constraint wraps one llguidance matcher for one request. Each step the generator asks it to mask
the logits (tokens the grammar forbids become -inf, before Kestrel's samplers run), then tells it
the sampled token. The mask is computed when apply() is called, which is after the generator has
launched the model's next step: the GPU is still running it, so the mask costs no time of its own
(a worker thread did this before, and its hand-offs cost more than the mask). When the grammar is
complete (a JSON object's closing brace), is_complete turns true and the generator stops as if EOS
had been sampled.

Why llguidance: docs/CONSTRAINED.md (bench/compare_constrained.py) - it compiles every schema of our
set in about a millisecond and covers all of them; outlines-core takes seconds to minutes per schema
and formatron no longer imports with current pydantic.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import GenerationError

if TYPE_CHECKING:
    import torch

    from .tokenizer import Tokenizer

# Compact, deterministic JSON: flexible whitespace lets a small model pad forever with newlines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class ConstraintError(GenerationError):
    """A JSON schema or regular expression cannot be turned into a grammar."""


_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()
MAX_REDRAWS = 16  # draws per step before a refused token ends the request
log = logging.getLogger(__name__)


class _Vocabulary:
    """Our tokenizer as llguidance's TokenizerWrapper reads it: each token's exact bytes, the special
    ids, and an encoder for plain text. llguidance's own reading of a tokenizer.json goes through its
    decoder and pre-tokenizer settings, which differ between converters of one model (the GGUF
    conversion on the H100 gave masks that admitted tokens the parser then refused); these bytes are
    the ones our decoder emits, so mask, parser and the reply agree."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id = min(tokenizer.eos_ids) if tokenizer.eos_ids else None
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes; we take text only
            raise TypeError("text only")
        return self._tokenizer.encode(text, special=False)


def _ll_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of our tokenizer (built once per tokenizer: about a second)."""
    import llguidance

    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(tokenizer)
        if found is None:
            eos = sorted(tokenizer.eos_ids) or None
            wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer))
            try:
                found = llguidance.LLTokenizer(wrapper, eos_token=eos)
            except TypeError:  # llguidance < 1.9 takes a single end-of-sequence id
                found = llguidance.LLTokenizer(wrapper, eos_token=eos[0] if eos else None)
            _TOKENIZERS[tokenizer] = found
        return found


def wants_constraint(settings: Any) -> bool:
    """Whether GenerationSettings ask for constrained output (fields may be absent on old callers)."""
    return bool(getattr(settings, "json_schema", None) is not None or getattr(settings, "regex", None)
                or getattr(settings, "json_object", False))


def grammar_for(*, json_schema: Mapping | bool | None = None, regex: str | None = None,
                json_object: bool = False, origin: str | None = None) -> str:
    """The llguidance grammar for one of the three kinds; bad input raises ConstraintError."""
    import llguidance

    chosen = [k for k, v in (("json_schema", json_schema is not None), ("regex", bool(regex)),
                             ("json_object", json_object)) if v]
    if len(chosen) != 1:
        raise ConstraintError(f"give exactly one of json_schema, regex, json_object (got {chosen or 'none'})",
                              path=origin)
    if regex:
        if not isinstance(regex, str):
            raise ConstraintError(f"the regular expression must be a string, got {type(regex).__name__}",
                                  path=origin)
        return llguidance.LLMatcher.grammar_from_regex(regex)
    schema = ANY_JSON_OBJECT if json_object else json_schema
    if not isinstance(schema, Mapping | bool):
        raise ConstraintError(f"the JSON schema must be a JSON object, got {type(schema).__name__}",
                              path=origin, hint="Give a schema such as {\"type\": \"object\", ...}.")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"the JSON schema cannot be read: {exc}", path=origin,
                              hint="Give a valid JSON Schema object.") from None


def check_grammar(tokenizer: Tokenizer, grammar: str, what: str, origin: str | None = None) -> Any:
    """Build the matcher, turning llguidance's error state into one clear ConstraintError."""
    import llguidance

    matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"the {what} cannot be used for constrained output: {matcher.get_error()}",
                              path=origin,
                              hint=f"Fix the {what}; JSON Schema keywords such as $ref, anyOf, enum, pattern, "
                                   "format, minItems/maxItems are supported.")
    return matcher


def validate_schema(schema: Any, tokenizer: Tokenizer | None = None, origin: str | None = None) -> None:
    """Raise ConstraintError if `schema` cannot be compiled (GUI/CLI check before generating)."""
    import llguidance

    grammar = grammar_for(json_schema=schema, origin=origin)
    if tokenizer is not None:
        check_grammar(tokenizer, grammar, "JSON schema", origin)
        return
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise ConstraintError(f"the JSON schema cannot be used for constrained output: {error}", path=origin,
                              hint="Fix the schema.")


def load_schema_file(path: str) -> dict:
    """A JSON schema from a file (CLI --json-schema), checked so a bad one fails before any work."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as exc:
        raise ConstraintError(f"cannot be read ({exc.strerror or exc})", path=path,
                              hint="Give the path of a JSON schema file.") from None
    except ValueError as exc:
        raise ConstraintError(f"is not valid JSON ({exc})", path=path, hint="Fix the JSON schema file.") from None
    validate_schema(schema, origin=path)
    return schema


class Constraint:
    """One request's grammar state: masks logits, follows sampled tokens, knows when it is complete."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.torch as lt
        import torch

        self._matcher = matcher
        self._lt = lt
        self.vocab_size = vocab_size
        self._bitmask = lt.allocate_token_bitmask(1, vocab_size)
        self._index = torch.empty(self._bitmask.shape[1] * 4, dtype=torch.int32,
                                  pin_memory=self._bitmask.is_pinned())
        self._copied: torch.cuda.Event | None = None  # the last copy of _index to the GPU
        self._stopped = False
        self._bit_tables: dict[Any, torch.Tensor] = {}

    @classmethod
    def from_settings(cls, tokenizer: Tokenizer, settings: Any, origin: str | None = None) -> Constraint | None:
        """A Constraint for GenerationSettings' json_schema / regex / json_object, or None."""
        if not wants_constraint(settings):
            return None
        regex = getattr(settings, "regex", None)
        grammar = grammar_for(json_schema=getattr(settings, "json_schema", None), regex=regex,
                              json_object=bool(getattr(settings, "json_object", False)), origin=origin)
        what = "regular expression" if regex else "JSON schema"
        return cls(check_grammar(tokenizer, grammar, what, origin), tokenizer.vocab_size)

    # --- per step ------------------------------------------------------------------------------

    def _fill(self) -> None:
        self._lt.fill_next_token_bitmask(self._matcher, self._bitmask)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Return `logits` (one row) with every token the grammar forbids set to -inf."""
        import torch

        self._fill()
        if self._matcher.is_error():  # its mask would be meaningless: stop with llguidance's reason
            raise GenerationError(f"constrained decoding stopped: {self._matcher.get_error()}",
                                  hint="Simplify the schema or regular expression.")
        device = logits.device
        table = self._bit_tables.get(device)
        if table is None:  # byte value -> which of its 8 bits are clear (low bit first): one gather
            byte = torch.arange(256, dtype=torch.int32)
            table = ((byte[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).eq(0).to(device)
            self._bit_tables[device] = table
        # the words' bytes in memory order are the tokens' bits in order (little-endian int32); as
        # int32 indices in pinned memory they go to the GPU without a host sync (the sampler's sync
        # comes after, so the buffer is free again by the next step)
        if self._copied is not None:  # normally long done: the sampler has synced since
            self._copied.synchronize()
        self._index.copy_(self._bitmask[0].view(torch.uint8))
        index = self._index.to(device, non_blocking=True)
        if device.type == "cuda":
            self._copied = self._copied or torch.cuda.Event()
            self._copied.record()
        forbidden = table[index].reshape(-1)
        n = logits.shape[-1]
        if forbidden.numel() < n:  # model vocab padded past the tokenizer's: the extra ids never fit
            forbidden = torch.cat([forbidden, forbidden.new_ones(n - forbidden.numel())])
        return logits.masked_fill(forbidden[:n], float("-inf"))

    def pick(self, logits: torch.Tensor, draw: Callable[[torch.Tensor], int]) -> int:
        """draw() over the masked logits, checked against the parser itself: a token the bitmask let
        through but the parser refuses (seen on the H100 with llguidance 1.6: ':' right after '":'
        with ": " as the key separator) is masked out and drawn again, so no request dies of it."""
        masked = self.apply(logits)
        for _ in range(MAX_REDRAWS):
            token = draw(masked)
            if self._matcher.validate_tokens([int(token)]) == 1:
                return token
            log.warning("the grammar's mask admitted token %d, which its parser refuses: drawing again", token)
            masked[token] = float("-inf")
        raise GenerationError("constrained decoding found no token its grammar accepts",
                              hint="Simplify the schema or regular expression.")

    def advance(self, token: int) -> None:
        """Follow the sampled token (the next mask is built by the next apply())."""
        if not self._matcher.consume_token(int(token)):
            raise GenerationError(f"the grammar refused token {token}: {self._matcher.get_error()}",
                                  hint="This is a bug in constrained decoding; please report it.")
        self._stopped = bool(self._matcher.is_stopped())

    def rollback(self, count: int) -> None:
        """Undo the last `count` tokens (banned-string rollback)."""
        if count and not self._matcher.rollback(count):
            raise GenerationError(f"the grammar could not roll back {count} tokens: {self._matcher.get_error()}")
        self._stopped = bool(self._matcher.is_stopped())

    @property
    def is_complete(self) -> bool:
        """True once nothing but EOS can follow (the generator then stops)."""
        return self._stopped

    @property
    def is_accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    def close(self) -> None:
        """Nothing is held between steps; kept so callers need not know that."""

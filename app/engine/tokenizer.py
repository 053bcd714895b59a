"""Tokenizer, streaming detokenizer and stop-string matcher.

The tokenizer itself is HF `tokenizers` (tokenizer.json); this module adds what the generator needs on
top of it: the BOS/EOS ids gathered from every config file a model folder may carry, a streaming
decoder that never emits half a UTF-8 character or a wrong leading space, and a stop-string matcher
that works across chunk boundaries.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from app.engine.errors import TokenizerError

REPLACEMENT_CHAR = "\ufffd"

# End-of-turn / end-of-text tokens used by common chat formats. A model that has one of these as an
# added token ends its turn with it even when its config only names a different EOS id.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>",  # ChatML (Qwen, SmolLM, Hermes)
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<|end_of_text|>",  # Llama 3 base
    "<|endoftext|>",  # GPT-2 style byte-level BPE
    "</s>",  # SentencePiece Llama 2 / Mistral
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
)

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def read_json(path: Path, *, required: bool = False) -> dict[str, Any] | None:
    """Read an optional JSON config file; a present but broken file is an error, not a silent default."""
    if not path.is_file():
        if required:
            raise TokenizerError(
                "file is missing", path=str(path),
                hint="Download the complete model folder (it must contain this file).")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(
            f"is not valid JSON ({exc})", path=str(path),
            hint="Re-download this file from the model's repository.") from exc
    if not isinstance(data, dict):
        raise TokenizerError(
            f"should hold a JSON object, found {type(data).__name__}", path=str(path),
            hint="Re-download this file from the model's repository.")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


def _ids(value: Any) -> list[int]:
    """An `*_token_id` config value: an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@lru_cache(maxsize=1)
def _byte_level_decode_table() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _tokenizer_kind(spec: dict[str, Any]) -> str:
    """'byte_level' (GPT-2/Llama 3/Qwen BPE), 'sentencepiece' (▁ pieces) or 'other'."""
    parts = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer"), spec.get("normalizer")],
                       ensure_ascii=False)
    if '"ByteLevel"' in parts:
        return "byte_level"
    if '"Metaspace"' in parts or "\u2581" in parts:
        return "sentencepiece"
    return "other"


class Tokenizer:
    """A model's tokenizer plus the special-token facts the generator and chat templates need."""

    def __init__(self, hf: HFTokenizer, *, folder: str = "", kind: str = "other",
                 bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 bos_id: int | None = None, eos_ids: Iterable[int] = (), pad_id: int | None = None,
                 add_bos_token: bool = False, model_type: str = "",
                 tokenizer_config: dict[str, Any] | None = None) -> None:
        self._hf = hf
        self._hf_literal: HFTokenizer | None = None  # clone that treats special-token text literally
        self._lock = threading.Lock()
        self.folder = folder
        self.kind = kind
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        self.pad_id = pad_id
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.add_bos_token = add_bos_token  # whether plain-text prompts should start with BOS
        self.model_type = model_type
        self.tokenizer_config: dict[str, Any] = tokenizer_config or {}
        added = hf.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.added_tokens: dict[str, int] = {t.content: i for i, t in added.items()}
        # SentencePiece byte-fallback pieces (<0xE4>): the decoder judges a whole run of them at once.
        self.byte_piece_ids: frozenset[int] = frozenset(
            i for piece, i in hf.get_vocab(with_added_tokens=False).items() if _BYTE_PIECE.match(piece)
        ) if kind == "sentencepiece" else frozenset()

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, folder: str) -> Tokenizer:
        """Load tokenizer.json and gather bos/eos/pad from every config file present in `folder`."""
        root = Path(folder)
        if not root.is_dir():
            raise TokenizerError("model folder does not exist", path=str(root),
                                 hint="Check the path, or download the model again.")
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            extra = " (only a SentencePiece tokenizer.model is present, which Kestrel does not read)" \
                if (root / "tokenizer.model").is_file() else ""
            raise TokenizerError(
                f"no tokenizer.json in this model folder{extra}", path=str(root),
                hint="Download tokenizer.json from the original (unquantized) model's repository into "
                     "this folder.")
        spec = read_json(tok_path, required=True)
        assert spec is not None
        try:
            hf = HFTokenizer.from_str(json.dumps(spec))
        except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
            raise TokenizerError(
                f"could not be loaded by the tokenizers library ({exc})", path=str(tok_path),
                hint="Re-download tokenizer.json, or update the `tokenizers` package.") from exc

        tok_cfg = read_json(root / "tokenizer_config.json") or {}
        special_map = read_json(root / "special_tokens_map.json") or {}
        gen_cfg = read_json(root / "generation_config.json") or {}
        model_cfg = read_json(root / "config.json") or {}

        def token_str(key: str) -> str | None:
            return _token_content(tok_cfg.get(key)) or _token_content(special_map.get(key))

        def known(token: str | None) -> int | None:
            return hf.token_to_id(token) if token else None

        def first_id(key: str) -> int | None:
            for cfg in (gen_cfg, model_cfg):
                for i in _ids(cfg.get(key)):
                    if hf.id_to_token(i) is not None:
                        return i
            return None

        def special(name: str) -> tuple[str | None, int | None]:
            """(token, id) from tokenizer_config's `name`, else from the configs' `name`_id."""
            token = token_str(name)
            token_id = known(token)
            if token_id is None:
                token_id = first_id(f"{name}_id")
                token = hf.id_to_token(token_id) if token_id is not None else None
            return token, token_id

        bos_token, bos_id = special("bos_token")

        eos_token = token_str("eos_token")
        eos: set[int] = set()
        for cfg in (model_cfg, gen_cfg):
            eos.update(i for i in _ids(cfg.get("eos_token_id")) if hf.id_to_token(i) is not None)
        if (i := known(eos_token)) is not None:
            eos.add(i)
        elif eos_token is None and eos:
            eos_token = hf.id_to_token(min(eos))
        added = {t.content: i for i, t in hf.get_added_tokens_decoder().items()}
        eos.update(added[t] for t in END_OF_TURN_TOKENS if t in added)

        pad_token, pad_id = special("pad_token")
        unk_token = token_str("unk_token")

        add_bos = tok_cfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # Llama 2/3 tokenizer.json files add BOS in their post-processor; copy that default.
            post = json.dumps(spec.get("post_processor") or {})
            add_bos = bos_token is not None and f'"{bos_token}"' in post

        return cls(hf, folder=str(root), kind=_tokenizer_kind(spec), bos_token=bos_token,
                   eos_token=eos_token, pad_token=pad_token, unk_token=unk_token, bos_id=bos_id,
                   eos_ids=eos, pad_id=pad_id, add_bos_token=add_bos,
                   model_type=str(model_cfg.get("model_type") or ""), tokenizer_config=tok_cfg)

    # ------------------------------------------------------------------------------- conversion
    def _literal(self) -> HFTokenizer:
        """A clone that reads '<|im_start|>' in user text as plain characters (prompt-injection safe)."""
        with self._lock:
            if self._hf_literal is None:
                clone = HFTokenizer.from_str(self._hf.to_str())
                clone.encode_special_tokens = True
                self._hf_literal = clone
            return self._hf_literal

    def encode(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids for `text`. special=True turns special-token text (from a chat template) into ids."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text, got {type(text).__name__}")
        hf = self._hf if special else self._literal()
        ids = hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        """Text for `ids`, exactly as the tokenizers library decodes it (no space clean-up)."""
        self._check_ids(ids)
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def _check_ids(self, ids: Iterable[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} is outside this tokenizer's vocabulary of {self.vocab_size}",
                    path=self.folder or None,
                    hint="The model and its tokenizer.json do not match; re-download the model.")

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The raw vocabulary entry (with Ġ/▁ markers), or None for an unknown id."""
        return self._hf.id_to_token(token_id)

    def token_to_piece(self, token_id: int) -> str:
        """The text one token stands for, keeping its leading space (for token-by-token displays)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token adds to the text (a byte-level token may hold part of a UTF-8
        character): what a grammar engine must see, whatever the tokenizer.json's decoder says."""
        self._check_ids([token_id])
        raw = self._hf.id_to_token(token_id)
        if raw is None:
            return b""
        if raw in self.added_tokens:
            return raw.encode("utf-8")
        if self.kind == "byte_level":
            table = _byte_level_decode_table()
            if all(c in table for c in raw):
                return bytes(table[c] for c in raw)
        if self.kind == "sentencepiece":
            if match := _BYTE_PIECE.match(raw):
                return bytes([int(match.group(1), 16)])
            return raw.replace("\u2581", " ").encode("utf-8")
        return self._hf.decode([token_id], skip_special_tokens=False).encode("utf-8")  # only the decoder knows

    def stream_decoder(self, *, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Turns generated token ids into text chunks as they arrive.

    It decodes a small sliding window of ids twice (with and without the newest ones) and emits the
    difference, so SentencePiece's "strip the first ▁" rule and byte-level merges behave as in a full
    decode; text that ends in U+FFFD is held back because the next token may complete the character.
    A run of SentencePiece byte pieces is held until it ends: the ByteFallback decoder turns the whole
    run into U+FFFDs if any of it is invalid, so a valid-looking prefix of the run is not final yet.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: already-emitted context that fixes leading-space handling
        self._read = 0  # ids before this index have been emitted
        self._emitted: list[str] = []
        self._in_byte_run = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok._hf.decode(ids, skip_special_tokens=self._skip_special)

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        self._tok._check_ids([token_id])
        self._ids.append(token_id)
        if token_id in self._tok.byte_piece_ids:
            self._in_byte_run = True
        elif not (self._skip_special and token_id in self._tok.special_ids):  # skipped ids join runs
            self._in_byte_run = False
        if self._in_byte_run:
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if (len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR)
                or not full_text.startswith(prefix_text)):
            return ""
        new = full_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._emitted.append(new)
        return new

    def flush(self) -> str:
        """Release held-back text (an incomplete character at the very end decodes as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        emitted = "".join(self._emitted)
        full = self._decode(self._ids)
        if full.startswith(emitted):
            rest = full[len(emitted):]
        else:  # a decoder that is not prefix-stable: best effort from the window
            prefix_text = self._decode(self._ids[self._prefix:self._read])
            rest = self._decode(self._ids[self._prefix:])[len(prefix_text):]
        self._emitted = [emitted + rest]
        self._prefix, self._read = self._read, len(self._ids)
        return rest


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any tail that could begin one."""

    def __init__(self, stop_strings: list[str]) -> None:
        self.stop_strings: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop_strings if s))
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to show now, stopped?). After a stop, further text is discarded."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        first: tuple[int, str] | None = None
        for stop in self.stop_strings:
            index = buffer.find(stop)
            if index >= 0 and (first is None or index < first[0]):
                first = (index, stop)
        if first is not None:
            self.stopped, self.matched, self._held = True, first[1], ""
            return buffer[:first[0]], True
        keep = self._holdback(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """Text held back at the end of the stream (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

"""Tokenizer loading, streaming detokenization and stop strings, on real tokenizers.

The byte-level BPE case is the SmolLM2 fixture's own tokenizer.json; the SentencePiece cases are small
tokenizers trained here with the `tokenizers` library in the two layouts real models ship (Llama 2's
legacy normalizer + BPE with byte fallback, and Mistral-style Metaspace + Unigram with byte fallback).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from app.engine.errors import KestrelError, TokenizerError
from app.engine.tokenizer import StopStringMatcher, Tokenizer

TEXTS = [
    "Hello world",
    "Café crème brûlée, naïve résumé, Ångström, señor.",
    "Emoji: 😀👍🏽🇯🇵 and a family 👨‍👩‍👧!",
    "中文字符和日本語のテキスト、한국어도。",
    "def main():\n    print('hello')\n\n    return  0\n\t# tab\n",
    "  two leading spaces, trailing   ",
    "mixed: x²+y²=z², €100, ½ cup, \u00a0nbsp",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Café crème brûlée, naïve résumé.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Hello there, how are you today? The weather is nice.",
] * 20
SPECIAL = ["<unk>", "<s>", "</s>"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def _llama2_style() -> HFTokenizer:
    """Llama 2's tokenizer.json layout: ▁-normalizer, BPE with byte fallback, Strip decoder."""
    norm = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer_tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    # SentencePiece never merges across a word boundary; train with a splitting pre-tokenizer so the
    # merges look like Llama 2's, then ship the legacy normalizer-only layout.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer_tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, limit_alphabet=60, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + BYTE_PIECES)}
    for tok in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                 fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIAL)
    return tok


def _metaspace_unigram() -> HFTokenizer:
    """Mistral-style layout: Metaspace pre-tokenizer, Unigram with byte fallback."""
    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer_tok = HFTokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = metaspace
    trainer_tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=SPECIAL, unk_token="<unk>", show_progress=False))
    pieces = [(p, s) for p, s in json.loads(trainer_tok.to_str())["model"]["vocab"] if p not in SPECIAL]
    vocab = [(s, 0.0) for s in SPECIAL] + [(b, -100.0) for b in BYTE_PIECES] + pieces
    tok = HFTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                     decoders.Metaspace(replacement="\u2581", prepend_scheme="first")])
    tok.add_special_tokens(SPECIAL)
    return tok


def _write_folder(folder: Path, hf: HFTokenizer, **config: object) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "bos_token_id": 1,
                                                    "eos_token_id": 2, **config}))
    return str(folder)


@pytest.fixture(scope="module")
def smol(smollm2_fp16_dir: str) -> Tokenizer:
    return Tokenizer.from_folder(smollm2_fp16_dir)


@pytest.fixture(scope="module")
def sp_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sp")
    return {"llama2_bpe": _write_folder(root / "llama2_bpe", _llama2_style()),
            "metaspace_unigram": _write_folder(root / "metaspace_unigram", _metaspace_unigram())}


@pytest.fixture(scope="module", params=["smollm2", "llama2_bpe", "metaspace_unigram"])
def any_tok(request: pytest.FixtureRequest, smollm2_fp16_dir: str, sp_folders: dict[str, str]) -> Tokenizer:
    if request.param == "smollm2":
        return Tokenizer.from_folder(smollm2_fp16_dir)
    return Tokenizer.from_folder(sp_folders[request.param])


def _stream(tok: Tokenizer, ids: list[int], *, skip_special: bool = True) -> list[str]:
    decoder = tok.stream_decoder(skip_special=skip_special)
    chunks = [decoder.feed(i) for i in ids]
    chunks.append(decoder.flush())
    return chunks


# ------------------------------------------------------------------------------------- loading
def test_fixture_special_tokens(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.kind == "byte_level"
    assert smol.bos_id == 1 and smol.bos_token == "<|im_start|>"
    assert smol.eos_token == "<|im_end|>"
    im_end, endoftext = smol.token_to_id("<|im_end|>"), smol.token_to_id("<|endoftext|>")
    assert {im_end, endoftext} <= smol.eos_ids
    assert smol.add_bos_token is False


def test_eos_ids_are_the_union_of_all_configs(tmp_path: Path, smollm2_fp16_dir: str) -> None:
    folder = tmp_path / "m"
    shutil.copytree(smollm2_fp16_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = 9
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_folder(str(folder))
    assert {0, 2, 7, 9} <= tok.eos_ids


def test_sentencepiece_folder_reads_config(sp_folders: dict[str, str]) -> None:
    tok = Tokenizer.from_folder(sp_folders["llama2_bpe"])
    assert tok.kind == "sentencepiece"
    assert tok.bos_id == tok.token_to_id("<s>") and tok.bos_token == "<s>"
    assert tok.token_to_id("</s>") in tok.eos_ids
    assert tok.add_bos_token is True


def test_missing_tokenizer_json_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_folder(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)
    assert isinstance(err.value, KestrelError)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_folder(str(tmp_path / "nope"))


@pytest.mark.parametrize("name,content", [
    ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nonsense"}}'),
    ("tokenizer.json", "{truncated"),
    ("tokenizer_config.json", "{not json"),
    ("generation_config.json", "[1, 2]"),
])
def test_broken_file_is_named(tmp_path: Path, smollm2_fp16_dir: str, name: str, content: str) -> None:
    folder = tmp_path / "m"
    shutil.copytree(smollm2_fp16_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / name).write_text(content)
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_folder(str(folder))
    assert str(folder / name) in str(err.value)


# ------------------------------------------------------------------------------- encode/decode
def test_round_trip(any_tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = any_tok.encode(text)
        # Metaspace decoding drops one leading space (SentencePiece's dummy prefix), as real Mistral does.
        expected = text.removeprefix(" ") if any_tok.folder.endswith("metaspace_unigram") else text
        assert any_tok.decode(ids) == expected, text


def test_special_tokens_parsed_only_when_asked(smol: Tokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    parsed = smol.encode(text, special=True)
    literal = smol.encode(text, special=False)
    assert parsed[0] == 1 and 2 in parsed
    assert 1 not in literal and 2 not in literal
    assert smol.decode(literal) == text
    assert smol.decode(parsed, skip_special=True) == "user\nhi"


def test_add_bos_once(any_tok: Tokenizer) -> None:
    assert any_tok.bos_id is not None
    ids = any_tok.encode("Hello world", add_bos=True)
    assert ids[0] == any_tok.bos_id and ids[1] != any_tok.bos_id
    assert ids[1:] == any_tok.encode("Hello world")
    with_bos = any_tok.encode(any_tok.bos_token + "Hello", add_bos=True)
    assert with_bos.count(any_tok.bos_id) == 1


def test_decode_rejects_out_of_range_ids(smol: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="outside"):
        smol.decode([5, smol.vocab_size])
    with pytest.raises(TokenizerError):
        smol.stream_decoder().feed(-1)


def test_token_to_piece_keeps_leading_space(any_tok: Tokenizer) -> None:
    ids = any_tok.encode("Hello world")
    pieces = [any_tok.token_to_piece(i) for i in ids]
    assert "".join(pieces).strip() == "Hello world"
    assert any(p.startswith(" ") and p.strip() for p in pieces[1:])
    newline = any_tok.encode("a\nb")
    assert "\n" in "".join(any_tok.token_to_piece(i) for i in newline)
    assert any_tok.token_to_piece(any_tok.token_to_id(any_tok.eos_token)) == any_tok.eos_token


# ----------------------------------------------------------------------------- stream decoding
def test_stream_equals_full_decode(any_tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = any_tok.encode(text)
        chunks = _stream(any_tok, ids)
        full = any_tok.decode(ids, skip_special=True)
        assert "".join(chunks) == full, text
        if "\ufffd" not in full:
            assert not any("\ufffd" in c for c in chunks), (text, chunks)


def test_stream_holds_back_multi_token_characters(any_tok: Tokenizer) -> None:
    """An emoji that takes several tokens arrives whole, in one chunk, never as U+FFFD."""
    ids = any_tok.encode("ok 😀")
    assert len(ids) > len(any_tok.encode("ok")) + 1, "test needs the emoji to span several tokens"
    chunks = _stream(any_tok, ids)
    assert [c.lstrip(" ") for c in chunks if "😀" in c] == ["😀"]
    assert chunks.count("") >= 2


def test_stream_keeps_leading_spaces(any_tok: Tokenizer) -> None:
    """Decoding token by token loses SentencePiece spaces; the stream decoder must not."""
    text = "Hello there, how are you today?"
    ids = any_tok.encode(text)
    chunks = _stream(any_tok, ids)
    assert "".join(chunks) == text
    assert sum(c.startswith(" ") for c in chunks) == text.count(" ")


def test_stream_of_generated_continuation(any_tok: Tokenizer) -> None:
    """A reply streamed after a prompt decodes like the reply alone (what the generator feeds)."""
    reply = any_tok.encode("Sure! Ça coûte 5 €. 😀\n  done")
    assert "".join(_stream(any_tok, reply)) == any_tok.decode(reply, skip_special=True)


def test_stream_random_token_sequences(any_tok: Tokenizer) -> None:
    """Arbitrary id sequences (what a bad sampler may produce), including lone UTF-8 fragments."""
    rng = random.Random(1234)
    # Bias towards the awkward ids: byte pieces, partial-character tokens and special tokens.
    awkward = sorted(any_tok.byte_piece_ids | any_tok.special_ids | set(any_tok.encode("😀中é€ ")))
    assert len(awkward) > 5
    for _ in range(300):
        ids = [rng.choice(awkward) if rng.random() < 0.6 else rng.randrange(any_tok.vocab_size)
               for _ in range(rng.randrange(1, 25))]
        full = any_tok.decode(ids, skip_special=True)
        chunks = _stream(any_tok, ids)
        assert "".join(chunks) == full
        body = chunks[:-1]
        if "\ufffd" not in full:
            assert not any("\ufffd" in c for c in body)


def test_stream_skips_special_tokens(smol: Tokenizer) -> None:
    ids = smol.encode("Hi!<|im_end|>", special=True)
    assert "".join(_stream(smol, ids)) == "Hi!"
    assert "".join(_stream(smol, ids, skip_special=False)) == "Hi!<|im_end|>"


def test_stream_incomplete_character_released_by_flush(smol: Tokenizer) -> None:
    ids = smol.encode("a😀")[:-1]  # cut inside the emoji's bytes
    decoder = smol.stream_decoder()
    assert "".join(decoder.feed(i) for i in ids) == "a"
    assert decoder.flush() == smol.decode(ids)[1:]
    assert decoder.flush() == ""


# ------------------------------------------------------------------------------- stop strings
def _run_matcher(stops: list[str], chunks: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stops)
    out = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_string_split_across_one_char_chunks() -> None:
    text = "The answer is 4.<|im_end|>junk after"
    matcher = StopStringMatcher(["<|im_end|>"])
    shown = []
    for ch in text:
        part, stopped = matcher.feed(ch)
        assert "<" not in part
        shown.append(part)
        if stopped:
            break
    assert stopped and "".join(shown) == "The answer is 4."
    assert matcher.matched == "<|im_end|>"
    assert matcher.feed("more") == ("", True) and matcher.flush() == ""


def test_stop_held_prefix_released_when_not_a_stop() -> None:
    matcher = StopStringMatcher(["<|im_end|>"])
    assert matcher.feed("a <|im") == ("a ", False)
    assert matcher.feed("age|>") == ("<|image|>", False)
    assert matcher.feed("x <|") == ("x ", False)
    assert matcher.flush() == "<|"


def test_earliest_stop_wins_and_random_chunkings() -> None:
    stops = ["\nUSER:", "</s>", "ab"]
    text = "xx a\nUSE a</s>\nUSER: tail ab"
    expected = text[:text.index("</s>")]
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, 8)))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _run_matcher(stops, chunks) == (expected, True)


def test_overlapping_stop_prefixes() -> None:
    assert _run_matcher(["aab"], list("aaab!")) == ("a", True)
    assert _run_matcher(["abcd", "bc"], list("xabce")) == ("xa", True)
    assert _run_matcher(["stop"], ["no st", "ops here"]) == ("no ", True)
    assert _run_matcher(["stop"], ["nothing to see", " s"]) == ("nothing to see s", False)
    assert _run_matcher([], ["a", "b"]) == ("ab", False)
    assert _run_matcher(["", "zz"], ["a", "b"]) == ("ab", False)

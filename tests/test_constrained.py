"""Constrained output on the real SmolLM2 fixture (CPU): JSON schemas, regular expressions, any JSON
object, bad schemas, logprobs, and a banned-string rollback inside a grammar.

The five schemas in tests/data/schemas are real-world shapes (a CRM person record, an address with
enums and a patterned postal code, a product list with arrays, an event with a date-time and a
referenced nested venue, a tool call's arguments); strings and arrays are bounded so a reply fits in
the token budget on a slow CPU.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import pytest

from app.engine.constrained import Constraint, ConstraintError, validate_schema
from app.engine.errors import GenerationError
from app.engine.session import Engine
from app.engine.types import GenerationSettings

SCHEMA_DIR = Path(__file__).resolve().parent / "data" / "schemas"
SCHEMAS = ("person", "address", "product_list", "event", "tool_args")
SEEDS_PER_SCHEMA = 20  # 5 x 20 = 100 generations


def load_schema(name: str) -> dict:
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    schema.pop("x-examples", None)
    return schema


@pytest.fixture(scope="module")
def engine(smollm2_fp16_dir: str) -> Engine:
    return Engine.load(smollm2_fp16_dir, device="cpu", max_seq_len=1024)


def ask(schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Reply with one JSON object for this schema: {json.dumps(schema)}"}]


@pytest.mark.slow
def test_100_seeded_generations_parse_and_validate(engine: Engine) -> None:
    failures = []
    for name in SCHEMAS:
        schema = load_schema(name)
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        for seed in range(SEEDS_PER_SCHEMA):
            settings = GenerationSettings(max_new_tokens=160, seed=seed, json_schema=schema,
                                          samplers={"temperature": 1.0, "min_p": 0.02})
            text = "".join(c.text for c in engine.stream_chat(ask(schema), settings))
            try:
                validator.validate(json.loads(text))
            except (ValueError, jsonschema.ValidationError) as exc:
                failures.append(f"{name} seed {seed}: {text!r}: {exc}")
    assert not failures, "\n".join(failures)


def test_same_seed_same_json(engine: Engine) -> None:
    schema = load_schema("tool_args")
    settings = GenerationSettings(max_new_tokens=80, seed=7, json_schema=schema, samplers={"temperature": 1.0})
    a = engine.generator.generate(engine.chat_prompt_ids(ask(schema)), settings)
    b = engine.generator.generate(engine.chat_prompt_ids(ask(schema)), settings)
    assert a[0] == b[0]
    assert a[1].finish_reason == "stop"
    jsonschema.validate(json.loads(a[0]), schema)


def test_regex_constraint(engine: Engine) -> None:
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    messages = [{"role": "user", "content": "What is the phone number of the town hall?"}]
    for seed in range(3):
        text = "".join(c.text for c in engine.stream_chat(
            messages, GenerationSettings(max_new_tokens=40, seed=seed, regex=pattern)))
        assert re.fullmatch(pattern, text), text


def test_any_json_object(engine: Engine) -> None:
    messages = [{"role": "user", "content": 'Repeat exactly: {"ok": true, "n": 3}'}]
    text, last = engine.generator.generate(
        engine.chat_prompt_ids(messages),
        GenerationSettings(max_new_tokens=40, json_object=True, samplers={"temperature": 0.0}))
    assert last.finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_mask_allows_exactly_the_grammar(engine: Engine) -> None:
    """The mask for regex 'yes|no' allows 'yes', 'no' and their prefixes, and nothing of ' maybe'."""
    import torch

    c = Constraint.from_settings(engine.tokenizer, GenerationSettings(regex="yes|no"))
    assert c is not None
    masked = c.apply(torch.zeros(engine.model.config.vocab_size))
    allowed = {engine.tokenizer.decode([i]) for i in torch.isfinite(masked).nonzero().flatten().tolist()}
    assert {"yes", "no"} <= allowed
    assert all("yes".startswith(t) or "no".startswith(t) for t in allowed), allowed
    c.advance(engine.tokenizer.encode("yes", special=False)[0])
    c.close()


def test_banned_string_rollback_inside_grammar(engine: Engine) -> None:
    """A banned string rolls the grammar back too: the enum's other value comes out."""
    schema = {"type": "object", "properties": {"pet": {"enum": ["cat", "dog"]}}, "required": ["pet"],
              "additionalProperties": False}
    messages = [{"role": "user", "content": "Which pet? Answer in JSON."}]
    text, _ = engine.generator.generate(
        engine.chat_prompt_ids(messages),
        GenerationSettings(max_new_tokens=30, json_schema=schema,
                           samplers={"temperature": 0.0, "banned_strings": ["cat"]}))
    assert json.loads(text) == {"pet": "dog"}


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "strnig"}, "strnig"),
    ("not a schema", "JSON object"),
])
def test_bad_schema_is_a_clear_error(engine: Engine, schema, words: str) -> None:
    with pytest.raises(ConstraintError, match=words) as info:
        list(engine.stream_chat([{"role": "user", "content": "hi"}],
                                GenerationSettings(max_new_tokens=4, json_schema=schema)))
    assert isinstance(info.value, GenerationError)
    with pytest.raises(ConstraintError):
        validate_schema(schema)


def test_bad_regex_and_two_constraints_are_errors(engine: Engine) -> None:
    with pytest.raises(ConstraintError, match="regular expression"):
        Constraint.from_settings(engine.tokenizer, GenerationSettings(regex="([a-z"))
    with pytest.raises(ConstraintError, match="exactly one"):
        Constraint.from_settings(engine.tokenizer, GenerationSettings(regex="a", json_object=True))


def test_logprobs_of_chosen_and_top_tokens(engine: Engine) -> None:
    import torch

    messages = [{"role": "user", "content": "Say hello."}]
    ids = engine.chat_prompt_ids(messages)
    chunks = list(engine.generator.stream(ids, GenerationSettings(max_new_tokens=6, logprobs=3,
                                                                  samplers={"temperature": 0.0})))
    entries = [e for c in chunks for e in (c.logprobs or [])]
    tokens = [t for c in chunks for t in c.token_ids]
    assert [e.token_id for e in entries] == tokens and len(tokens) == chunks[-1].generated_tokens
    for e in entries:
        assert len(e.top) == 3 and e.top[0][0] == e.token_id  # greedy: the chosen token is the best
        assert [lp for _, _, lp in e.top] == sorted((lp for _, _, lp in e.top), reverse=True)
        assert e.logprob <= 0 and math.isclose(e.logprob, e.top[0][2])
    # the first token's logprob is the model's own log-softmax at the prompt's end
    engine.generator.reset_cache()
    logits = engine.generator._prefill(ids)
    assert math.isclose(entries[0].logprob, float(torch.log_softmax(logits.float(), -1)[tokens[0]]), abs_tol=1e-4)
    none = list(engine.generator.stream(ids, GenerationSettings(max_new_tokens=2)))
    assert all(c.logprobs is None for c in none)


def test_cli_json_schema_and_regex(smollm2_fp16_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from app.cli import main

    schema_file = tmp_path / "answer.json"
    schema_file.write_text(json.dumps({"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
                                       "required": ["answer"], "additionalProperties": False}))
    base = ["generate", "--model", smollm2_fp16_dir, "--device", "cpu", "--chat", "--temperature", "0",
            "--max-new-tokens", "20", "--prompt", "Is the sky blue?"]
    assert main(base + ["--json-schema", str(schema_file)]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] in ("yes", "no")
    assert main(base + ["--regex", "(yes|no), [a-z]{1,8}"]) == 0
    assert re.fullmatch("(yes|no), [a-z]{1,8}", capsys.readouterr().out.strip())

    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}')
    assert main(base + ["--json-schema", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err
    (tmp_path / "broken.json").write_text("{nope")
    assert main(base + ["--json-schema", str(tmp_path / "broken.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_a_token_the_parser_refuses_is_drawn_again(engine: Engine) -> None:
    """Constraint.pick checks each draw with the parser: a token the mask let through but the parser
    refuses (llguidance 1.6 did so on the GPU) is masked out and drawn again; only grammar tokens
    ever reach the matcher."""
    import torch

    tok = engine.generator.tokenizer
    constraint = Constraint.from_settings(tok, GenerationSettings(json_schema={"type": "object"}))
    assert constraint is not None
    refused = tok.encode("x")[0]
    draws: list[int] = []

    def draw(masked: torch.Tensor) -> int:  # first a refused token, as the faulty mask allowed, then argmax
        token = refused if not draws else int(torch.argmax(masked))
        draws.append(token)
        return token

    logits = torch.zeros(tok.vocab_size)
    token = constraint.pick(logits, draw)
    assert draws[0] == refused and token == draws[-1] != refused and len(draws) == 2
    assert tok.decode([token]).lstrip().startswith("{")
    constraint.advance(token)  # the parser takes it
    with pytest.raises(GenerationError, match="no token its grammar accepts"):
        constraint.pick(logits, lambda masked: refused)
    constraint.close()


def test_token_bytes_rebuild_the_text(engine: Engine) -> None:
    """token_bytes of each id, joined, is the UTF-8 of the decoded text (byte-level tokens split
    characters: the bytes still add up)."""
    tok = engine.tokenizer
    text = "Grüße, 東京! <|im_start|> naïve café 🦅"
    ids = tok.encode(text, special=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == tok.decode(ids).encode("utf-8") == text.encode("utf-8")
    assert tok.token_bytes(tok.token_to_id("<|im_end|>")) == b"<|im_end|>"

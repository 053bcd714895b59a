"""Compare constrained-decoding libraries on the real SmolLM2 tokenizer (CPU; no model needed).

For llguidance, outlines-core and formatron it measures:
  * vocabulary setup (once per model), grammar compile time per JSON schema,
  * time to compute the allowed-token mask per decoded token, walking each schema's valid example
    token by token (mask, then advance with the example's token),
  * (all times are CPU time of this process, time.process_time, so a busy shared machine does not
    inflate them; the Rust libraries may use more than one thread while compiling)
  * schema coverage: a schema counts as covered when it compiles, every valid example is accepted
    to the end and every invalid example is refused (a "loose" grammar accepts an invalid one).

Usage:  python bench/compare_constrained.py [TOKENIZER_FOLDER]
(default: the test fixture ~/.cache/kestrel-test/smollm2-fp16). Prints one table per measure.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SCHEMA_DIR = ROOT / "tests" / "data" / "schemas"
DEFAULT_FOLDER = Path.home() / ".cache" / "kestrel-test" / "smollm2-fp16"

# Feature schemas beyond the five real-world ones in tests/data/schemas (same "x-examples" layout).
EXTRA: dict[str, dict] = {
    "anyof_payment": {
        "type": "object",
        "properties": {"method": {"anyOf": [
            {"type": "object", "properties": {"card": {"type": "string", "pattern": "^[0-9]{4}$"}},
             "required": ["card"], "additionalProperties": False},
            {"type": "object", "properties": {"iban": {"type": "string", "maxLength": 8}},
             "required": ["iban"], "additionalProperties": False}]}},
        "required": ["method"], "additionalProperties": False,
        "x-examples": {"valid": [{"method": {"card": "1234"}}, {"method": {"iban": "DE12"}}],
                       "invalid": [{"method": {"card": "12"}}]},
    },
    "oneof_shape": {
        "oneOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer"}},
             "required": ["kind", "r"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}},
             "required": ["kind", "side"], "additionalProperties": False}],
        "x-examples": {"valid": [{"kind": "circle", "r": 2}], "invalid": [{"kind": "circle", "side": 2}]},
    },
    "recursive_tree": {
        "$defs": {"node": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3}},
            "required": ["name", "children"], "additionalProperties": False}},
        "$ref": "#/$defs/node",
        "x-examples": {"valid": [{"name": "a", "children": [{"name": "b", "children": []}]}],
                       "invalid": [{"name": "a", "children": [{"name": "b"}]}]},
    },
    "string_formats": {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}, "day": {"type": "string", "format": "date"},
                       "at": {"type": "string", "format": "time"}},
        "required": ["id", "day", "at"], "additionalProperties": False,
        "x-examples": {"valid": [{"id": "123e4567-e89b-12d3-a456-426614174000", "day": "2024-02-29",
                                  "at": "10:30:00Z"}],
                       "invalid": [{"id": "nope", "day": "2024-02-29", "at": "10:30:00Z"}]},
    },
    "map_additional": {
        "type": "object", "additionalProperties": {"type": "integer"},
        "x-examples": {"valid": [{"apples": 3, "pears": 0}], "invalid": [{"apples": "three"}]},
    },
    "allof_merge": {
        "allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                  {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}],
        "x-examples": {"valid": [{"a": 1, "b": True}], "invalid": [{"a": 1}]},
    },
    "nullable_const": {
        "type": "object",
        "properties": {"version": {"const": 2}, "note": {"type": ["string", "null"], "maxLength": 10}},
        "required": ["version", "note"], "additionalProperties": False,
        "x-examples": {"valid": [{"version": 2, "note": None}, {"version": 2, "note": "hi"}],
                       "invalid": [{"version": 3, "note": None}]},
    },
    "tuple_prefix_items": {
        "type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}], "items": False,
        "x-examples": {"valid": [[1.5, -2]], "invalid": [[1, 2, 3]]},
    },
    "number_bounds": {
        "type": "object", "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1},
                                         "n": {"type": "integer", "exclusiveMinimum": 0}},
        "required": ["ratio", "n"], "additionalProperties": False,
        "x-examples": {"valid": [{"ratio": 0.25, "n": 4}], "invalid": [{"ratio": 1.5, "n": 4}]},
    },
}


def load_schemas() -> dict[str, dict]:
    schemas = {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.json"))}
    schemas.update(copy.deepcopy(EXTRA))
    return schemas


def split(schema: dict) -> tuple[dict, list, list]:
    s = dict(schema)
    ex = s.pop("x-examples", {})
    return s, ex.get("valid", []), ex.get("invalid", [])


def serializations(value: object) -> list[str]:
    return [json.dumps(value, separators=(",", ":")), json.dumps(value)]


class Lib:
    """One library behind the same four calls."""

    name = ""

    def setup(self, folder: Path) -> None: ...
    def compile(self, schema: dict) -> object: ...
    def fresh(self, compiled: object) -> object: ...
    def mask(self, state: object) -> None: ...
    def advance(self, state: object, token: int) -> bool: ...
    def done(self, state: object) -> bool: ...


class LLGuidance(Lib):
    name = "llguidance"

    def setup(self, folder: Path) -> None:
        import llguidance
        import llguidance.torch as lt
        self.llg = llguidance
        self.lt = lt
        self.tok = llguidance.LLTokenizer((folder / "tokenizer.json").read_text(), eos_token=2)
        self.bitmask = lt.allocate_token_bitmask(1, self.tok.vocab_size)

    def compile(self, schema: dict) -> object:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def fresh(self, compiled):
        return compiled.deep_copy()

    def mask(self, state) -> None:
        self.lt.fill_next_token_bitmask(state, self.bitmask)

    def advance(self, state, token: int) -> bool:
        return state.consume_token(token)

    def done(self, state) -> bool:
        return state.is_accepting()


class OutlinesCore(Lib):
    name = "outlines-core"

    def setup(self, folder: Path) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        from app.engine.tokenizer import Tokenizer
        self.oc = outlines_core
        self.build_regex = build_regex_from_schema
        tok = Tokenizer.from_folder(str(folder))
        table: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i not in tok.special_ids:
                table.setdefault(tok.token_bytes(i), []).append(i)
        self.vocab = outlines_core.Vocabulary(2, table)
        self.bitmask = torch.zeros(1, (tok.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict) -> object:
        return self.oc.Index(self.build_regex(json.dumps(schema)), self.vocab)

    def fresh(self, compiled):
        return self.oc.Guide(compiled)

    def mask(self, state) -> None:
        state.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), 4)

    def advance(self, state, token: int) -> bool:
        try:
            state.advance(token)
            return True
        except ValueError:
            return False

    def done(self, state) -> bool:
        return state.is_finished()


class Formatron(Lib):
    name = "formatron"

    def setup(self, folder: Path) -> None:
        import pydantic
        # formatron 0.5.0 does `from pydantic import typing; typing.Type`, which pydantic >= 2.12
        # no longer provides; give it the standard module so it can be measured at all.
        pydantic.typing = typing  # type: ignore[attr-defined]
        import kbnf
        from formatron.formatter import FormatterBuilder
        from formatron.integrations.utils import get_original_characters
        from formatron.schemas.json_schema import create_schema
        from tokenizers import Tokenizer
        self.builder_cls, self.create_schema = FormatterBuilder, create_schema
        hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
        vocab = hf.get_vocab(with_added_tokens=True)
        plain = get_original_characters(vocab)
        self.vocab = kbnf.Vocabulary({k: kbnf.Token(v) for k, v in plain.items()}, {v: k for k, v in vocab.items()})
        self.decode = lambda ids: hf.decode(ids)
        self.count = 0

    def compile(self, schema: dict) -> object:
        self.count += 1
        s = dict(schema, **{"$id": f"https://kestrel.invalid/s{self.count}",
                            "$schema": "https://json-schema.org/draft/2020-12/schema"})
        b = self.builder_cls()
        b.append_str(f"{b.json(self.create_schema(s), capture_name='json')}")
        return b.build(self.vocab, self.decode)

    def fresh(self, compiled):
        compiled.reset()
        return compiled

    def mask(self, state) -> None:
        state.compute_allowed_tokens()

    def advance(self, state, token: int) -> bool:
        try:
            state.accept_token(token)
            return True
        except ValueError:
            return False

    def done(self, state) -> bool:
        return state.is_completed()


def walk(lib: Lib, compiled, ids: list[int], times: list[float] | None) -> bool:
    """Feed `ids`; True when every token is accepted and the grammar is complete at the end."""
    state = lib.fresh(compiled)
    for token in ids:
        t = time.process_time()
        lib.mask(state)
        if times is not None:
            times.append(time.process_time() - t)
        if not lib.advance(state, token):
            return False
    return lib.done(state)


def measure(lib: Lib, schemas: dict[str, dict], encode: Callable[[str], list[int]]) -> dict:
    result: dict = {"compile": {}, "first": {}, "mask_ms": [], "coverage": {}}
    for name, full in schemas.items():
        schema, valid, invalid = split(full)
        t = time.process_time()
        try:
            compiled = lib.compile(schema)
        except Exception as exc:  # noqa: BLE001 - any failure means "not covered"
            result["coverage"][name] = f"error: {type(exc).__name__}: {str(exc)[:60]}"
            continue
        result["compile"][name] = time.process_time() - t
        times: list[float] = []
        first = lib.fresh(compiled)
        t = time.process_time()
        lib.mask(first)  # llguidance builds its lexer lazily: the first mask finishes the compile
        result["first"][name] = result["compile"][name] + time.process_time() - t
        ok_valid = True
        for value in valid:
            accepted = False
            for text in serializations(value):
                try:
                    if walk(lib, compiled, encode(text), times if not accepted else None):
                        accepted = True
                        break
                except Exception:  # noqa: BLE001
                    pass
            ok_valid = ok_valid and accepted
        loose = False
        for value in invalid:
            for text in serializations(value):
                try:
                    if walk(lib, compiled, encode(text), None):
                        loose = True
                except Exception:  # noqa: BLE001
                    pass
        result["mask_ms"].extend(x * 1000 for x in times)
        result["coverage"][name] = "ok" if ok_valid and not loose else (
            "rejects valid" if not ok_valid else "loose (accepts invalid)")
    return result


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FOLDER
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def encode(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    schemas = load_schemas()
    results: dict[str, dict] = {}
    for lib in (LLGuidance(), OutlinesCore(), Formatron()):
        t = time.process_time()
        try:
            lib.setup(folder)
        except Exception as exc:  # noqa: BLE001
            print(f"{lib.name}: cannot be set up: {type(exc).__name__}: {exc}")
            continue
        setup = time.process_time() - t
        results[lib.name] = measure(lib, schemas, encode)
        results[lib.name]["setup"] = setup

    names = list(results)
    print(f"\nTokenizer: {folder / 'tokenizer.json'} ({hf.get_vocab_size()} tokens); {len(schemas)} schemas; CPU\n")
    print(f"| measure | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    row = [f"{results[n]['setup']:.2f} s" for n in names]
    print(f"| vocabulary setup (once per model) | {' | '.join(row)} |")
    row = [f"{statistics.median(results[n]['compile'].values()) * 1000:.1f} ms" if results[n]["compile"] else "-"
           for n in names]
    print(f"| compile, median over schemas | {' | '.join(row)} |")
    row = [f"{max(results[n]['compile'].values()) * 1000:.1f} ms" if results[n]["compile"] else "-"
           for n in names]
    print(f"| compile, slowest schema | {' | '.join(row)} |")
    row = [f"{statistics.median(results[n]['first'].values()) * 1000:.1f} ms" if results[n]["first"] else "-"
           for n in names]
    print(f"| compile + first mask, median | {' | '.join(row)} |")
    print(f"| (schemas compiled) | {' | '.join(str(len(results[n]['compile'])) for n in names)} |")
    for label, fn in (("mask per token, median", statistics.median),
                      ("mask per token, mean", statistics.mean),
                      ("mask per token, p99", lambda xs: sorted(xs)[int(0.99 * (len(xs) - 1))])):
        row = [f"{fn(results[n]['mask_ms']) * 1000:.0f} us" if results[n]["mask_ms"] else "-" for n in names]
        print(f"| {label} | {' | '.join(row)} |")
    row = [f"{sum(v == 'ok' for v in results[n]['coverage'].values())}/{len(schemas)}" for n in names]
    print(f"| schemas fully covered | {' | '.join(row)} |")
    print(f"\n| schema | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for name in schemas:
        print(f"| {name} | {' | '.join(results[n]['coverage'].get(name, '-') for n in names)} |")


if __name__ == "__main__":
    main()

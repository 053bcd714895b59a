"""Chat templates: turn a list of messages into the prompt text a model was trained on.

Templates are Jinja, as in Hugging Face: the model folder's own template when it has one, otherwise a
built-in picked from the vocabulary. They run in an immutable sandbox with the same helpers HF gives
them (raise_exception, strftime_now, tojson); any failure becomes a TokenizerError naming the template.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.engine.errors import TokenizerError
from app.engine.tokenizer import Tokenizer, read_json

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

# Text-spelled turn markers -> stop strings. Used for built-ins and to guess stops for a model's own
# template; special tokens are caught as EOS ids already, these catch them when spelled out as text.
BUILTIN_STOPS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "llama3": ("<|eot_id|>", "<|start_header_id|>"),
    "llama2": ("</s>", "[INST]"),
    "mistral": ("</s>", "[INST]"),
    "zephyr": ("</s>", "<|user|>"),
    "alpaca": ("### Instruction:",),
    "vicuna": ("</s>", "USER:"),
}
_MARKER_STOPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("<|im_end|>", ("<|im_end|>", "<|im_start|>")),
    ("<|eot_id|>", ("<|eot_id|>", "<|start_header_id|>")),
    ("<end_of_turn>", ("<end_of_turn>", "<start_of_turn>")),
    ("<|end|>", ("<|end|>",)),
    ("[INST]", ("[INST]",)),
    ("<|user|>", ("<|user|>",)),
)
_MAX_REPEAT = 1_000_000  # longest string/list a template may build with `*`


class _TemplateRaised(Exception):
    """raise_exception() was called by the template; render() turns it into a TokenizerError."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's tojson: no HTML escaping, non-ASCII kept (Jinja's own filter escapes < > & ')."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _GenerationTag(Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` (assistant-mask marker) and renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The HF sandbox, but touching an unsafe attribute fails loudly instead of printing ''."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: Any) -> NoReturn:  # type: ignore[override]
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """Refuse memory bombs such as `'x' * 10**10` before they are built."""
        if operator == "**" and isinstance(right, int) and abs(right) > 256:
            raise SecurityError("exponent too large in chat template")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (isinstance(seq, str | list | tuple) and isinstance(count, int)
                        and len(seq) * count > _MAX_REPEAT):
                    raise SecurityError("repetition too large in chat template")
        return super().call_binop(context, operator, left, right)


def _environment() -> _StrictSandbox:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check roles and content types; return shallow copies the template may read."""
    if not isinstance(messages, list | tuple):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    checked: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(
                f"message {index} is a {type(message).__name__}, expected a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise TokenizerError(f"message {index} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise TokenizerError(
                f"message {index} ({role}) has content of type {type(content).__name__}; "
                "content must be a string")
        checked.append(dict(message))
    return checked


def guess_builtin(tokenizer: Tokenizer, model_type: str = "") -> str:
    """The built-in format a model most likely uses, judged from its special tokens and architecture."""
    def has(*tokens: str) -> bool:
        return all(tokenizer.token_to_id(t) is not None for t in tokens)

    model_type = model_type or tokenizer.model_type
    if has("<|start_header_id|>", "<|eot_id|>"):
        return "llama3"
    if has("<|im_start|>", "<|im_end|>"):
        return "chatml"
    if has("[INST]", "[/INST]") or model_type in ("mistral", "mixtral"):
        return "mistral"
    if has("<|user|>", "<|assistant|>"):
        return "zephyr"
    if tokenizer.kind == "sentencepiece":
        return "llama2"
    return "alpaca"


def _pick_named(value: Any, origin: str) -> tuple[str, dict[str, str]]:
    """A chat_template value: a string, or HF's list of {name, template}; returns (default, all named)."""
    if isinstance(value, str):
        return value, {"default": value}
    if isinstance(value, list):
        named = {item["name"]: item["template"] for item in value
                 if isinstance(item, dict) and isinstance(item.get("name"), str)
                 and isinstance(item.get("template"), str)}
        if named:
            return named.get("default", next(iter(named.values()))), named
    raise TokenizerError(
        "chat_template must be a string or a list of {name, template} objects", path=origin,
        hint="Fix or remove the chat_template entry; Kestrel then picks a built-in template.")


class ChatTemplate:
    """A compiled chat template plus the stop strings that go with it."""

    BUILTINS: tuple[str, ...] = tuple(BUILTIN_STOPS)

    def __init__(self, source: str, tokenizer: Tokenizer, *, name: str = "model", origin: str | None = None,
                 stops: list[str] | None = None, tool_source: str | None = None) -> None:
        self.name = name
        self.source = source
        self.origin = origin  # the file the template came from, for error messages (None: not a file)
        self._tokenizer = tokenizer
        env = _environment()
        self._template = self._compile(env, source)
        self._tool_template = self._compile(env, tool_source) if tool_source else None
        self._stops = list(stops) if stops is not None else self._guess_stops()

    def _compile(self, env: _StrictSandbox, source: str) -> jinja2.Template:
        try:
            return env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TokenizerError(
                f"chat template {self.name!r} does not compile: {exc}", path=self.origin,
                hint="Fix the template, or choose a built-in one in the model settings.") from exc

    def _guess_stops(self) -> list[str]:
        stops: list[str] = []
        for marker, found in _MARKER_STOPS:
            if marker in self.source:
                stops.extend(s for s in found if s not in stops)
        eos = self._tokenizer.eos_token
        if eos and eos in self.source and eos not in stops:
            stops.append(eos)
        return stops

    # ---------------------------------------------------------------------------- constructors
    @classmethod
    def from_folder(cls, folder: str, tokenizer: Tokenizer) -> ChatTemplate:
        """The model's own template (chat_template.jinja, chat_template.json, tokenizer_config.json),
        else the built-in that matches its vocabulary."""
        root = Path(folder)
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                text = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"cannot be read ({exc})", path=str(jinja_file),
                                     hint="Re-download this file or delete it.") from exc
            return cls(text, tokenizer, origin=str(jinja_file))
        for file in (root / "chat_template.json", root / "tokenizer_config.json"):
            data = read_json(file)
            if data and data.get("chat_template"):
                source, named = _pick_named(data["chat_template"], str(file))
                return cls(source, tokenizer, origin=str(file), tool_source=named.get("tool_use"))
        model_cfg = read_json(root / "config.json") or {}
        return cls.builtin(guess_builtin(tokenizer, str(model_cfg.get("model_type") or "")), tokenizer)

    @classmethod
    def builtin(cls, name: str, tokenizer: Tokenizer) -> ChatTemplate:
        if name not in BUILTIN_STOPS:
            raise TokenizerError(f"there is no built-in chat template named {name!r}",
                                 hint=f"Choose one of: {', '.join(cls.BUILTINS)}.")
        path = TEMPLATES_DIR / f"{name}.jinja"
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenizerError(f"built-in template file is missing ({exc})", path=str(path),
                                 hint="Reinstall Kestrel.") from exc
        return cls(source, tokenizer, name=name, origin=str(path), stops=list(BUILTIN_STOPS[name]))

    @classmethod
    def from_string(cls, source: str, tokenizer: Tokenizer, *, name: str = "custom") -> ChatTemplate:
        """A user-supplied template (e.g. pasted in the model settings)."""
        return cls(source, tokenizer, name=name)

    # ------------------------------------------------------------------------------- rendering
    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra: Any) -> str:
        """The prompt text for `messages` (special tokens spelled out; encode with special=True)."""
        tok = self._tokenizer
        context: dict[str, Any] = {
            "bos_token": tok.bos_token or "", "eos_token": tok.eos_token or "",
            "pad_token": tok.pad_token or "", "unk_token": tok.unk_token or "",
        }
        context.update(extra)
        context.update(messages=validate_messages(messages),
                       add_generation_prompt=add_generation_prompt, tools=tools)
        template = self._tool_template if tools and self._tool_template is not None else self._template
        try:
            return template.render(**context)
        except _TemplateRaised as exc:
            raise TokenizerError(f"chat template {self.name!r} rejected the conversation: {exc}",
                                 path=self.origin,
                                 hint="Change the conversation (e.g. alternate user/assistant turns) "
                                      "or choose another template.") from None
        except SecurityError as exc:
            raise TokenizerError(f"chat template {self.name!r} tried something the sandbox forbids: {exc}",
                                 path=self.origin,
                                 hint="Do not use this template; choose a built-in one.") from None
        except Exception as exc:  # noqa: BLE001 - any template bug must reach the user as one clear error
            raise TokenizerError(f"chat template {self.name!r} failed: {type(exc).__name__}: {exc}",
                                 path=self.origin,
                                 hint="Fix the template, or choose a built-in one in the model settings.") \
                from None

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders a `tools` list itself (else the server writes tools into the
        system message, Hermes-style)."""
        return self._tool_template is not None or "tools" in self.source

    def stop_strings(self) -> list[str]:
        return list(self._stops)

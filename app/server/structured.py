"""Structured output for the OpenAI API: response_format, logprobs and tool calls.

Tools are offered to the model in the Hermes / Qwen style that most open chat models were trained
on: a system block listing the functions as JSON, and calls written as
<tool_call>{"name": ..., "arguments": {...}}</tool_call>. A model whose own chat template renders
`tools` gets them through its template instead. With tool_choice "required" or a named function the
reply is constrained by a JSON schema of the call, so it always parses; with "auto" the reply is
free and calls are parsed out of it when present.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from app.engine.constrained import ConstraintError, validate_schema
from app.engine.types import TokenLogprob

from .config import ApiError

MAX_TOP_LOGPROBS = 20
TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
TOOL_SYSTEM = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call>"
)


# --- response_format ----------------------------------------------------------------------------

def response_format_fields(rf: dict[str, Any] | None) -> dict[str, Any]:
    """GenerationSettings fields for OpenAI's response_format (text | json_object | json_schema)."""
    if not rf:
        return {}
    kind = rf.get("type", "text")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError("response_format.json_schema.schema must be a JSON Schema object",
                           param="response_format.json_schema.schema")
        try:
            validate_schema(schema)
        except ConstraintError as e:
            raise ApiError(str(e), param="response_format.json_schema.schema") from None
        return {"json_schema": schema}
    raise ApiError(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                   param="response_format.type")


# --- logprobs -------------------------------------------------------------------------------------

def logprob_count(enabled: bool | None, top: int | None, param: str = "top_logprobs") -> int | None:
    """GenerationSettings.logprobs for a request: None (off) or the number of alternatives."""
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(f"{param} must be between 0 and {MAX_TOP_LOGPROBS}", param=param)
    if top is not None and not enabled:
        raise ApiError("top_logprobs needs logprobs: true", param=param)
    return (top or 0) if enabled else None


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    if entries is None:
        return None
    return {"content": [dict(_entry(e.token, e.logprob), top_logprobs=[_entry(t, lp) for _, t, lp in e.top])
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI legacy completions shape: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries], "text_offset": offsets}


def merge_logprobs(chunks_entries: list[list[TokenLogprob] | None]) -> list[TokenLogprob] | None:
    if all(e is None for e in chunks_entries):
        return None
    return [x for e in chunks_entries if e for x in e]


# --- tools ----------------------------------------------------------------------------------------

def functions_of(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI tools, checked for a name and an object of parameters."""
    out = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., "
                           "\"parameters\": {...}}}", param=f"tools.{i}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError("function parameters must be a JSON Schema object", param=f"tools.{i}.function.parameters")
        out.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    return out


def chosen_tools(functions: list[dict[str, Any]], tool_choice: Any) -> tuple[str, list[dict[str, Any]]]:
    """(mode, the functions the reply may call): mode is none | auto | required."""
    if not functions or tool_choice == "none":
        return "none", []
    if tool_choice in (None, "auto"):
        return "auto", functions
    if tool_choice == "required":
        return "required", functions
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        named = [f for f in functions if f["name"] == name]
        if not named:
            raise ApiError(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        return "required", named
    raise ApiError("tool_choice must be \"none\", \"auto\", \"required\" or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


def call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call {"name", "arguments"} to any of `functions` (the forced-call grammar)."""
    options = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    try:
        validate_schema(schema)
    except ConstraintError as e:
        raise ApiError(f"a tool's parameters cannot be used: {e}", param="tools") from None
    return schema


def tool_system_text(functions: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return TOOL_SYSTEM.format(tools=listed)


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) \
        + "\n</tool_call>"


def messages_with_tools(messages: list[dict[str, Any]], functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hermes-style plain messages for templates that know nothing of tools: the tool list joins the
    system message, earlier calls become <tool_call> text and tool results <tool_response> user turns."""
    out: list[dict[str, Any]] = []
    if functions:
        text = tool_system_text(functions)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + text})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": text})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            content = ((m.get("content") or "") + "\n" + calls).strip()
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def parse_tool_calls(text: str, forced: bool = False) -> tuple[str | None, list[dict[str, Any]]]:
    """(content left over, OpenAI tool_calls) from a reply; forced replies are one bare call object."""
    bodies = [m.group(1) for m in TOOL_CALL_RE.finditer(text)]
    rest = TOOL_CALL_RE.sub("", text).strip()
    if forced and not bodies:
        bodies, rest = [text], ""
    calls = []
    for body in bodies:
        try:
            obj = json.loads(body)
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    if not calls:
        return text, []
    return (rest or None), calls

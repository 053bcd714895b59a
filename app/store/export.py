"""Conversation export (Markdown for reading, JSON for round trips) and JSON import validation.

Pure functions over the store's records, so they are testable without a database.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from .errors import ImportFormatError
from .models import ROLES, Conversation, Message, Timings

FORMAT = "kestrel.conversation"
FORMAT_VERSION = 1
ROLE_TITLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _timing_line(m: Message) -> str:
    t = m.timings
    parts = []
    if t.prompt_tokens is not None:
        parts.append(f"{t.prompt_tokens} prompt tokens")
    if t.generated_tokens is not None:
        parts.append(f"{t.generated_tokens} tokens generated")
    if t.tokens_per_second is not None:
        parts.append(f"{t.tokens_per_second:.1f} tok/s")
    if m.finish_reason:
        parts.append(f"finished: {m.finish_reason}")
    return " · ".join(parts)


def to_markdown(conv: Conversation, messages: list[Message]) -> str:
    """A human-readable transcript; message text is kept verbatim (it is usually Markdown already)."""
    lines = [f"# {conv.title}", ""]
    meta = [f"Created {_when(conv.created)}"]
    if conv.model_path:
        meta.append(f"model `{conv.model_path}`")
    lines += ["*" + " · ".join(meta) + "*", ""]
    if conv.system_prompt:
        lines += ["**System prompt**", ""]
        lines += [f"> {line}" if line else ">" for line in conv.system_prompt.splitlines()]
        lines.append("")
    for m in messages:
        heading = ROLE_TITLES.get(m.role, m.role)
        if m.role == "assistant" and m.model:
            heading += f" ({m.model})"
        lines += ["---", "", f"### {heading}", "", m.content.rstrip("\n"), ""]
        info = _timing_line(m)
        if info:
            lines += [f"<sub>{info}</sub>", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def to_json(conv: Conversation, messages: list[Message]) -> dict[str, Any]:
    """A self-describing dict (json.dumps-able) that `parse_json` reads back."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "conversation": {
            "title": conv.title, "created": conv.created, "updated": conv.updated,
            "system_prompt": conv.system_prompt, "model_path": conv.model_path,
            "sampler_settings": conv.sampler_settings, "extra": conv.extra,
        },
        "messages": [
            {
                "role": m.role, "content": m.content, "created": m.created, "model": m.model,
                "sampler_settings": m.sampler_settings, "timings": m.timings.to_dict(),
                "finish_reason": m.finish_reason,
            }
            for m in messages
        ],
    }


def _check(cond: bool, what: str, source: str) -> None:
    if not cond:
        raise ImportFormatError(what, path=source,
                                hint="Choose a .json file exported by Kestrel (File ▸ Export ▸ JSON).")


def _opt(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str, where: str) -> Any:
    value = data.get(key)
    _check(value is None or (isinstance(value, kind) and not isinstance(value, bool)),
           f"{where}: field {key!r} has the wrong type ({type(value).__name__})", source)
    return value


def parse_json(data: dict[str, Any] | str, source: str = "conversation JSON"
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate an export; return (conversation fields, message fields) ready for insertion.

    Raises ImportFormatError naming what is wrong, never KeyError/TypeError.
    """
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ImportFormatError(f"is not valid JSON ({e})", path=source,
                                    hint="Choose a .json file exported by Kestrel.") from e
    _check(isinstance(data, dict) and data.get("format") == FORMAT, f"is not a {FORMAT} export", source)
    assert isinstance(data, dict)
    version = data.get("version")
    _check(isinstance(version, int), "has no format version", source)
    if version > FORMAT_VERSION:
        raise ImportFormatError(f"uses format version {version}; this Kestrel reads up to {FORMAT_VERSION}",
                                path=source, hint="Update Kestrel to import it.")
    conv = data.get("conversation")
    msgs = data.get("messages")
    _check(isinstance(conv, dict), "has no 'conversation' object", source)
    _check(isinstance(msgs, list), "has no 'messages' list", source)
    assert isinstance(conv, dict) and isinstance(msgs, list)
    num = (int, float)
    conv_out = {
        "title": _opt(conv, "title", str, source, "conversation") or "Imported chat",
        "created": _opt(conv, "created", num, source, "conversation"),
        "updated": _opt(conv, "updated", num, source, "conversation"),
        "system_prompt": _opt(conv, "system_prompt", str, source, "conversation") or "",
        "model_path": _opt(conv, "model_path", str, source, "conversation"),
        "sampler_settings": _opt(conv, "sampler_settings", dict, source, "conversation") or {},
        "extra": _opt(conv, "extra", dict, source, "conversation") or {},
    }
    msgs_out = []
    for i, m in enumerate(msgs):
        where = f"message {i + 1}"
        _check(isinstance(m, dict), f"{where} is not an object", source)
        _check(m.get("role") in ROLES, f"{where} has role {m.get('role')!r}; expected one of {ROLES}", source)
        _check(isinstance(m.get("content"), str), f"{where} has no text 'content'", source)
        timings = _opt(m, "timings", dict, source, where) or {}
        for key, value in timings.items():
            _check(key in Timings.__dataclass_fields__ and
                   (value is None or (isinstance(value, num) and not isinstance(value, bool))),
                   f"{where}: timing {key!r} is not a known number field", source)
        msgs_out.append({
            "role": m["role"], "content": m["content"],
            "created": _opt(m, "created", num, source, where),
            "model": _opt(m, "model", str, source, where),
            "sampler_settings": _opt(m, "sampler_settings", dict, source, where) or {},
            "timings": Timings.from_dict(timings),
            "finish_reason": _opt(m, "finish_reason", str, source, where),
        })
    return conv_out, msgs_out

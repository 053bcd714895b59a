"""Request bodies of the OpenAI-compatible API (pydantic), with Kestrel's samplers as extensions.

The sampler fields are generated from app.engine.samplers.SAMPLERS: a sampler added to the registry
appears in the API, with its range and help text in /docs, without touching this file. Field names
are the ones TabbyAPI uses (which are also the registry's), with TabbyAPI's aliases accepted.

Unknown fields are refused (400) rather than ignored, so a misspelt sampler does not silently do
nothing; OpenAI fields that do not change the output (`user`, `metadata`, ...) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model

from app.engine.samplers import SAMPLERS, SamplerSpec

# Registry name -> the name TabbyAPI gives the same knob, where it differs (the field's name here).
TABBY_NAMES: dict[str, str] = {
    "typical_p": "typical",
    "penalty_decay": "repetition_decay",
    "dynatemp_low": "min_temp",
    "dynatemp_high": "max_temp",
    "dynatemp_exponent": "temp_exponent",
}
# Registry name -> further names TabbyAPI accepts for it.
TABBY_ALIASES: dict[str, tuple[str, ...]] = {
    "repetition_penalty": ("rep_pen",),
    "penalty_range": ("repetition_range", "repetition_penalty_range"),
    "banned_tokens": ("custom_token_bans",),
}

_STRICT = ConfigDict(extra="forbid", populate_by_name=True)


def api_name(sampler: str) -> str:
    return TABBY_NAMES.get(sampler, sampler)


def _is_switch(spec: SamplerSpec) -> bool:
    return spec.kind == "int" and spec.minimum == 0 and spec.maximum == 1


def _sampler_field(spec: SamplerSpec) -> tuple[Any, Any]:
    """A pydantic field for one registry entry; ranges are checked here so /docs shows them, and
    again by the engine (steps, list contents) before the job is queued."""
    name = api_name(spec.name)
    names = dict.fromkeys((name, spec.name, *TABBY_ALIASES.get(spec.name, ())))
    doc = f"{spec.help} Kestrel default: {spec.default!r}."
    extra: dict[str, Any] = {}
    if _is_switch(spec):
        py_type: Any = bool
    elif spec.kind in ("float", "int"):
        py_type = float if spec.kind == "float" else int
        extra = {"ge": spec.minimum, "le": spec.maximum}
    elif spec.kind == "int_list":
        py_type = list[int]
    elif spec.kind == "str_list":
        py_type = list[str] | str
        doc += f" At most {int(spec.maximum)} strings."
    elif spec.kind == "dict":
        py_type = dict[int, float]
        doc += f" Bias range {spec.minimum}..{spec.maximum}."
    else:  # a kind this server does not know yet: accept any JSON and let the engine judge it
        py_type = Any
    return (py_type | None, Field(None, validation_alias=AliasChoices(*names), description=doc, **extra))


# field name in requests -> registry name
FIELD_TO_SAMPLER: dict[str, str] = {api_name(name): name for name in SAMPLERS}

SamplerFields: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "SamplerFields",
    __config__=_STRICT,
    **{api_name(name): _sampler_field(spec) for name, spec in SAMPLERS.items()},
    ban_eos_token=(bool, Field(False, description="Keep generating past the end-of-sequence token.")),
)


def sampler_values(request: BaseModel) -> dict[str, Any]:
    """The samplers a request set, by registry name (switches as 0/1)."""
    out: dict[str, Any] = {}
    for field_name, sampler in FIELD_TO_SAMPLER.items():
        value = getattr(request, field_name, None)
        if value is not None:
            out[sampler] = int(value) if isinstance(value, bool) else value
    return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(SamplerFields):  # type: ignore[misc, valid-type]
    """Fields shared by chat and text completions."""

    model: str | None = Field(None, description="Ignored: the loaded model answers (see /v1/model).")
    max_tokens: int | None = Field(None, ge=1, validation_alias=AliasChoices("max_tokens", "max_length"))
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validation_alias=AliasChoices("stop", "stop_sequence"))
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    loras: dict[str, float] | None = Field(
        None, description="Kestrel extension: LoRA adapters for this request, name -> scale (see /v1/loras). "
                          "Omitted: every loaded adapter at its load-time scaling; {}: the base model alone.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] = Field(..., description="Text, a one-item list of text, or token ids.")
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class LoadRequest(BaseModel):
    model_config = _STRICT
    model: str = Field(..., min_length=1, validation_alias=AliasChoices("model", "name", "model_name"),
                       description="A model folder inside the server's models folder (name or path).")
    max_seq_len: int | None = Field(None, ge=16)
    device: str | None = None
    cache_mode: Literal["fp16", "q8", "q6", "q4"] | None = Field(
        None, description="KV cache precision (default: the server's --cache-mode).")


class EncodeRequest(BaseModel):
    model_config = _STRICT
    text: str | None = None
    messages: list[ChatMessage] | None = None
    add_bos_token: bool = True
    encode_special_tokens: bool = True


class DecodeRequest(BaseModel):
    model_config = _STRICT
    tokens: list[int] = Field(..., min_length=0)
    decode_special_tokens: bool = True


class LoraChoice(BaseModel):
    model_config = _STRICT
    name: str = Field(..., min_length=1, description="An adapter folder inside the server's LoRA folder.")
    scaling: float = Field(1.0, ge=-10, le=10, description="Default scale for requests that do not pick adapters.")


class LoraLoadRequest(BaseModel):
    """TabbyAPI's shape: {"loras": [{"name": ..., "scaling": ...}]}."""

    model_config = _STRICT
    loras: list[LoraChoice] = Field(..., min_length=1)


class LoraUnloadRequest(BaseModel):
    model_config = _STRICT
    loras: list[str] | None = Field(None, description="Names to unload; omitted: all of them (as TabbyAPI).")

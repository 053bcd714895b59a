"""Structured output through the OpenAI API: response_format (json_schema, json_object), logprobs and a
tool-call round trip, with the official `openai` client against the real server on 127.0.0.1 and the
SmolLM2 fixture on CPU."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from app.engine.session import Engine
from app.server.app import create_app
from app.server.config import ServerConfig
from app.server.structured import messages_with_tools, parse_tool_calls
from tests.test_server import ServerThread

SCHEMA_DIR = Path(__file__).resolve().parent / "data" / "schemas"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def engine(smollm2_fp16_dir: str) -> Engine:
    return Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=1024)


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[openai.OpenAI]:
    with ServerThread(create_app(ServerConfig(device="cpu", max_tokens_limit=500), engine)) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_json_schema_response(client: openai.OpenAI) -> None:
    schema = json.loads((SCHEMA_DIR / "tool_args.json").read_text())
    schema.pop("x-examples")
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather query for Paris as JSON."}], max_tokens=80,
        seed=1, temperature=1.0, response_format={"type": "json_schema",
                                                  "json_schema": {"name": "args", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_json_object_response(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": 'Repeat exactly: {"ok": true, "n": 3}'}], max_tokens=40,
        temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_logprobs_chat_and_completions(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 4
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token
    streamed = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4, temperature=0, logprobs=True, stream=True))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]
    plain = client.completions.create(model="m", prompt="The sky is", max_tokens=3, temperature=0, logprobs=2)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == plain.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2).choices[0].logprobs is None


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER, CLOCK],
                                           tool_choice="required", max_tokens=60, seed=3, temperature=0.7)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    params = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), params)

    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    final = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER, CLOCK], tool_choice="none",
                                           max_tokens=16, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content

    named = client.chat.completions.create(model="m", messages=messages[:1], tools=[WEATHER, CLOCK], max_tokens=40,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=0)
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    streamed = list(client.chat.completions.create(model="m", messages=messages[:1], tools=[WEATHER],
                                                   tool_choice="required", max_tokens=60, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert deltas and deltas[0].tool_calls[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"


def test_tool_prompt_and_parsing(engine: Engine) -> None:
    """Tools reach the prompt Hermes-style; calls and results of earlier turns are rendered back."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}}
    msgs = messages_with_tools([{"role": "user", "content": "Weather?"},
                                {"role": "assistant", "content": None, "tool_calls": [call]},
                                {"role": "tool", "tool_call_id": "call_1", "content": "rainy"}],
                               [WEATHER["function"]])
    prompt = engine.template.render(msgs)
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Oslo"}}\n</tool_call>' in prompt
    assert "<tool_response>\nrainy\n</tool_response>" in prompt
    content, calls = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert content == "Let me check." and calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])

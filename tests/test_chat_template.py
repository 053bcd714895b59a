"""Chat templates: the fixture model's own ChatML template, the built-ins, template discovery and the
sandbox, rendered with real tokenizers."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from app.engine.chat_template import ChatTemplate, guess_builtin
from app.engine.errors import TokenizerError
from app.engine.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module")
def smol(smollm2_fp16_dir: str) -> Tokenizer:
    return Tokenizer.from_folder(smollm2_fp16_dir)


def _copy_tokenizer_only(src: str, dest: Path, *, keep_template: bool = False) -> Path:
    """The fixture folder without weights (and, unless asked, without any chat template)."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.jinja"))
    if keep_template:
        shutil.copy(Path(src) / "chat_template.jinja", dest / "chat_template.jinja")
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return dest


def _word_tokenizer(folder: Path, tokens: list[str], *, sentencepiece: bool,
                    model_type: str = "llama") -> Tokenizer:
    """A tiny real tokenizer whose vocabulary holds `tokens` as special tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "\u2581hello": 4}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if sentencepiece:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        hf.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<unk>", "<s>", "</s>", *tokens])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return Tokenizer.from_folder(str(folder))


# ------------------------------------------------------------------------------ fixture ChatML
def test_fixture_chatml_renders_expected_prompt(smol: Tokenizer, smollm2_fp16_dir: str) -> None:
    template = ChatTemplate.from_folder(smollm2_fp16_dir, smol)
    assert template.name == "model"
    assert template.render(CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert template.render(CONVERSATION, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    assert "<|im_end|>" in template.stop_strings()


def test_fixture_template_inserts_default_system_prompt(smol: Tokenizer, smollm2_fp16_dir: str) -> None:
    prompt = ChatTemplate.from_folder(smollm2_fp16_dir, smol).render([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_rendered_prompt_encodes_turn_markers_as_special_tokens(smol: Tokenizer,
                                                                smollm2_fp16_dir: str) -> None:
    prompt = ChatTemplate.from_folder(smollm2_fp16_dir, smol).render(CONVERSATION)
    ids = smol.encode(prompt)
    im_start, im_end = smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert smol.decode(ids) == prompt


def test_tokenizer_config_template_used_without_jinja_file(tmp_path: Path, smollm2_fp16_dir: str,
                                                           smol: Tokenizer) -> None:
    folder = tmp_path / "m"
    shutil.copytree(smollm2_fp16_dir, folder, ignore=shutil.ignore_patterns("*.safetensors",
                                                                            "chat_template.jinja"))
    template = ChatTemplate.from_folder(str(folder), smol)
    assert template.origin == str(folder / "tokenizer_config.json")
    assert template.render(CONVERSATION) == ChatTemplate.from_folder(smollm2_fp16_dir, smol).render(CONVERSATION)


def test_named_template_list_and_tool_use(tmp_path: Path, smollm2_fp16_dir: str, smol: Tokenizer) -> None:
    folder = _copy_tokenizer_only(smollm2_fp16_dir, tmp_path / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS {{ tools | tojson }} {{ messages[-1].content }}"},
        {"name": "default", "template": "DEFAULT {{ messages[-1].content }}"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    template = ChatTemplate.from_folder(str(folder), smol)
    assert template.render(CONVERSATION) == "DEFAULT What is 2+2?"
    tools = [{"type": "function", "function": {"name": "add", "description": "Adds <numbers> ü"}}]
    assert template.render(CONVERSATION, tools=tools) == (
        'TOOLS [{"type": "function", "function": {"name": "add", "description": "Adds <numbers> ü"}}]'
        " What is 2+2?")


def test_chat_template_json_file(tmp_path: Path, smollm2_fp16_dir: str, smol: Tokenizer) -> None:
    folder = _copy_tokenizer_only(smollm2_fp16_dir, tmp_path / "m")
    (folder / "chat_template.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"}))
    assert ChatTemplate.from_folder(str(folder), smol).render(CONVERSATION) == \
        "[system]You are terse.[user]What is 2+2?"


def test_bad_chat_template_value_names_file(tmp_path: Path, smollm2_fp16_dir: str, smol: Tokenizer) -> None:
    folder = _copy_tokenizer_only(smollm2_fp16_dir, tmp_path / "m")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": 42}))
    with pytest.raises(TokenizerError, match="chat_template.json"):
        ChatTemplate.from_folder(str(folder), smol)


def test_syntax_error_in_model_template_names_file(tmp_path: Path, smollm2_fp16_dir: str,
                                                   smol: Tokenizer) -> None:
    folder = _copy_tokenizer_only(smollm2_fp16_dir, tmp_path / "m")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError) as err:
        ChatTemplate.from_folder(str(folder), smol)
    assert str(folder / "chat_template.jinja") in str(err.value)


# -------------------------------------------------------------------------------- discovery
def test_no_template_falls_back_to_chatml_for_smollm2(tmp_path: Path, smollm2_fp16_dir: str,
                                                      smol: Tokenizer) -> None:
    folder = _copy_tokenizer_only(smollm2_fp16_dir, tmp_path / "m")
    template = ChatTemplate.from_folder(str(folder), smol)
    assert template.name == "chatml"
    assert template.render(CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.parametrize("tokens,sentencepiece,model_type,expected", [
    (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], False, "llama",
     "llama3"),
    (["<|im_start|>", "<|im_end|>"], False, "llama", "chatml"),
    ([], True, "llama", "llama2"),
    ([], True, "mistral", "mistral"),
    (["[INST]", "[/INST]"], True, "llama", "mistral"),
    (["<|user|>", "<|assistant|>"], False, "llama", "zephyr"),
    ([], False, "llama", "alpaca"),
])
def test_builtin_guessed_from_vocab(tmp_path: Path, tokens: list[str], sentencepiece: bool,
                                    model_type: str, expected: str) -> None:
    tok = _word_tokenizer(tmp_path / "t", tokens, sentencepiece=sentencepiece, model_type=model_type)
    assert guess_builtin(tok) == expected
    assert ChatTemplate.from_folder(str(tmp_path / "t"), tok).name == expected


# --------------------------------------------------------------------------------- built-ins
LONG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]
EXPECTED_BUILTINS = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST]",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] 2+2? [/INST]",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n"
              "<|assistant|>\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n"
              "### Response:\n",
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT:",
}


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return _word_tokenizer(tmp_path_factory.mktemp("sp"), [], sentencepiece=True)


def test_builtin_list() -> None:
    assert set(EXPECTED_BUILTINS) <= set(ChatTemplate.BUILTINS)


@pytest.mark.parametrize("name", sorted(EXPECTED_BUILTINS))
def test_each_builtin_renders(name: str, sp_tok: Tokenizer) -> None:
    template = ChatTemplate.builtin(name, sp_tok)
    assert template.name == name
    assert template.render(LONG) == EXPECTED_BUILTINS[name]
    single = template.render([{"role": "user", "content": "Only me"}])
    assert "Only me" in single
    assert template.stop_strings() and all(isinstance(s, str) and s for s in template.stop_strings())


@pytest.mark.parametrize("name", ["chatml", "llama3", "zephyr", "alpaca", "vicuna"])
def test_builtin_generation_prompt_toggle(name: str, sp_tok: Tokenizer) -> None:
    template = ChatTemplate.builtin(name, sp_tok)
    with_prompt = template.render(LONG)
    without = template.render(LONG, add_generation_prompt=False)
    assert with_prompt.startswith(without) and len(with_prompt) > len(without)


def test_builtin_rejects_unsupported_role(sp_tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="no tool role"):
        ChatTemplate.builtin("llama2", sp_tok).render([{"role": "tool", "content": "42"}])


def test_unknown_builtin(sp_tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="chatml"):
        ChatTemplate.builtin("gpt5", sp_tok)


def test_builtins_with_real_fixture_tokenizer(smol: Tokenizer) -> None:
    for name in ChatTemplate.BUILTINS:
        prompt = ChatTemplate.builtin(name, smol).render(CONVERSATION)
        assert "What is 2+2?" in prompt
        assert smol.decode(smol.encode(prompt)) == prompt


# ---------------------------------------------------------------------------- sandbox/errors
@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ messages[0].clear() }}",
    "{{ 'x' * 100000000 }}",
    "{{ 2 ** 100000 }}",
])
def test_sandbox_escape_raises_tokenizer_error(source: str, smol: Tokenizer) -> None:
    template = ChatTemplate.from_string(source, smol)
    with pytest.raises(TokenizerError, match="sandbox forbids"):
        template.render(CONVERSATION)


def test_raise_exception_message_reaches_user(smol: Tokenizer) -> None:
    template = ChatTemplate.from_string(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}"
        "{% endif %}ok", smol)
    with pytest.raises(TokenizerError, match="Conversation must start with user"):
        template.render(CONVERSATION)
    assert template.render(CONVERSATION[1:]) == "ok"


def test_runtime_template_error_is_wrapped(smol: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="failed"):
        ChatTemplate.from_string("{{ messages[0].content + 5 }}", smol).render(CONVERSATION)
    with pytest.raises(TokenizerError, match="failed"):
        ChatTemplate.from_string("{{ undefined_thing.attr.more }}", smol).render(CONVERSATION)


def test_helpers_and_special_tokens_exposed(smol: Tokenizer) -> None:
    template = ChatTemplate.from_string(
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ strftime_now('%Y') }}|"
        "{{ extra | tojson }}|{% for m in messages %}{% generation %}{{ m.role }}{% endgeneration %}"
        "{% if loop.index == 1 %}{% continue %}{% endif %},{% endfor %}", smol)
    out = template.render(CONVERSATION, extra={"k": "é"})
    assert out == (f"<|im_start|>|<|im_end|>|<|im_end|>|<|endoftext|>|{datetime.now().year}|"
                   '{"k": "é"}|systemuser,')


def test_trim_and_lstrip_blocks_like_hf(smol: Tokenizer) -> None:
    template = ChatTemplate.from_string(
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}",
        smol)
    assert template.render(CONVERSATION) == "What is 2+2?\n"


@pytest.mark.parametrize("messages,match", [
    ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
    ([{"role": "user", "content": ["hi"]}], "content must be a string"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ([{"role": "user"}], "content must be a string"),
    (["hello"], "expected a dict"),
    ("hello", "must be a list"),
])
def test_bad_messages(messages: object, match: str, smol: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=match):
        ChatTemplate.builtin("chatml", smol).render(messages)  # type: ignore[arg-type]


def test_template_cannot_mutate_callers_messages(smol: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    template = ChatTemplate.from_string("{% set m = messages[0] %}{{ m.content }}", smol)
    assert template.render(messages) == "hi"
    assert messages == [{"role": "user", "content": "hi"}]


def test_common_real_world_constructs_pass_the_strict_sandbox(smol: Tokenizer) -> None:
    """Constructs used by the Llama 3.1, Qwen 2.5/3 and Mistral templates must keep working."""
    source = (
        "{%- set ns = namespace(last_user=-1, found=false) -%}"
        "{%- for m in messages[::-1] -%}{%- if m.role == 'user' and not ns.found -%}"
        "{%- set ns.last_user = messages | length - 1 - loop.index0 -%}{%- set ns.found = true -%}"
        "{%- break -%}{%- endif -%}{%- endfor -%}"
        "{%- if date_string is not defined -%}{%- set date_string = strftime_now('%d %b %Y') -%}{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m.content is string -%}{{ m.role ~ ':' ~ m.content.split('</think>')[-1].lstrip('\\n').strip() }}"
        "{%- endif -%}{{ '|' if not loop.last }}"
        "{%- endfor -%}"
        "#{{ ns.last_user }}#{{ tools[0] | tojson(indent=2) if tools else 'none' }}"
        "#{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}#{{ date_string | length > 0 }}"
    )
    messages = [{"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "<think>hmm</think>\n\nHello"}]
    out = ChatTemplate.from_string(source, smol).render(messages, tools=[{"name": "f"}])
    assert out == 'user:Hi|assistant:Hello#0#{\n  "name": "f"\n}#a=1#True'

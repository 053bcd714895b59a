"""Markdown rendering, the generated sampler panel, presets and the chat view (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PySide6.QtCore import QUrl
from PySide6.QtGui import QGuiApplication

from app.engine.samplers import SAMPLERS
from app.ui.chat_view import ChatView, MarkdownStack
from app.ui.markdown_render import COPY_SCHEME, render_markdown, split_fences, stable_split, tex_to_html
from app.ui.presets import PresetError, PresetStore, builtin_presets
from app.ui.sampler_panel import SamplerPanel
from app.ui.theme import LIGHT, THEMES, icon_set

CODE = "Intro\n\n```python\nx = 1 < 2\n```\n\nand\n\n```\nplain\n```\n"


def test_code_blocks_get_copy_anchors_with_their_exact_text() -> None:
    r = render_markdown(CODE, LIGHT, "friendly")
    assert r.code_blocks == ("x = 1 < 2", "plain")
    assert f'href="{COPY_SCHEME}:0"' in r.html and f'href="{COPY_SCHEME}:1"' in r.html
    assert "&lt;" in r.html and "style=" in r.html     # highlighted with inline Pygments styles
    shifted = render_markdown(CODE, LIGHT, "friendly", first_code=5)
    assert f'href="{COPY_SCHEME}:5"' in shifted.html


def test_unclosed_fence_renders_as_code_while_streaming() -> None:
    blocks = split_fences("Look:\n```js\nlet a = 1;\n")
    assert [b.kind for b in blocks] == ["prose", "code"] and blocks[1].lang == "js"


def test_raw_html_is_text_and_tables_math_render() -> None:
    r = render_markdown("<b>hi</b> and $x^2$\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", LIGHT, "friendly")
    assert "&lt;b&gt;hi&lt;/b&gt;" in r.html and "<table" in r.html and "<sup>2</sup>" in r.html
    assert tex_to_html(r"\frac{a+b}{2} \le \alpha") == "(a+b)/2 ≤ α"
    assert "$5" in render_markdown("costs $5 and $10", LIGHT, "friendly").html


@pytest.mark.parametrize("text", [CODE, "a\n\nb\n\n1. x\n\n2. y\n\nend", "```\nq\n\nr\n```\n\nz", "$$\na\n\nb\n$$\n\nc"])
def test_stable_split_never_cuts_a_fence_math_or_list(text: str) -> None:
    for end in range(len(text) + 1):
        cut = stable_split(text[:end])
        assert 0 <= cut <= end
        head = text[:cut]
        assert head.count("```") % 2 == 0 and head.count("$$") % 2 == 0
        assert not text[cut:end].startswith(("2.", " "))


def test_streamed_markdown_matches_a_full_render(qtbot) -> None:
    stack = MarkdownStack(THEMES["light"])
    qtbot.addWidget(stack)
    text = CODE * 3
    for end in range(0, len(text), 7):
        stack.set_markdown(text[:end], streaming=True)
    stack.set_markdown(text, streaming=True)
    assert len(stack.parts()) > 1          # stable slices were frozen, only the tail re-renders
    assert stack.code_blocks() == list(render_markdown(text, LIGHT, "friendly").code_blocks)
    plain = "".join(p.toPlainText() for p in stack.parts())
    assert "x = 1 < 2" in plain and "Intro" in plain


def test_copy_link_copies_the_code_block(qtbot) -> None:
    stack = MarkdownStack(THEMES["light"])
    qtbot.addWidget(stack)
    stack.set_markdown(CODE)
    stack.tail._anchor(QUrl(f"{COPY_SCHEME}:1"))
    assert QGuiApplication.clipboard().text() == "plain"


def test_sampler_panel_is_generated_from_the_registry(qtbot, tmp_path: Path) -> None:
    panel = SamplerPanel(PresetStore(tmp_path))
    qtbot.addWidget(panel)
    panel.set_specs(list(SAMPLERS.values()))
    assert set(panel.rows) == set(SAMPLERS)
    for name, spec in SAMPLERS.items():
        row = panel.rows[name]
        assert spec.help in row.spin.toolTip()
        if row.slider is not None:  # numeric kinds; list/dict kinds are a JSON line
            assert row.spin.minimum() == spec.minimum and row.spin.maximum() == spec.maximum
        assert row.value() == spec.default
    groups = [w.text() for w in panel.findChildren(type(panel.loading)) if w.objectName() == "SectionLabel"]
    assert groups == list(dict.fromkeys(s.group.upper() for s in SAMPLERS.values()))
    changes: list[int] = []
    panel.changed.connect(lambda: changes.append(1))
    panel.rows["temperature"].slider.setValue(panel.rows["temperature"].slider.value() + 2)
    assert changes and panel.values()["temperature"] == pytest.approx(SAMPLERS["temperature"].default + 0.1)
    panel.set_values({"top_k": 5})
    assert panel.values()["top_k"] == 5 and panel.values()["temperature"] == SAMPLERS["temperature"].default


def test_presets_builtin_apply_and_user_saved_as_json(qtbot, tmp_path: Path) -> None:
    names = [p.name for p in builtin_presets()]
    assert names[:3] == ["Precise", "Balanced", "Creative"]
    for preset in builtin_presets():
        for name, value in preset.samplers.items():
            SAMPLERS[name].validate(value)           # every built-in value is in range
    panel = SamplerPanel(PresetStore(tmp_path))
    qtbot.addWidget(panel)
    panel.set_specs(list(SAMPLERS.values()))
    panel.apply_preset(builtin_presets()[0])
    assert panel.preset_combo.currentText() == "Precise"
    panel.rows["top_k"].spin.setValue(11)
    assert panel.preset_combo.currentText() == "Custom"
    panel.save_preset("My style")
    saved = json.loads((tmp_path / "presets" / "my-style.json").read_text())
    assert saved["name"] == "My style" and saved["samplers"]["top_k"] == 11
    assert panel.preset_combo.findText("My style") > 0
    with pytest.raises(PresetError):
        PresetStore(tmp_path).save("Balanced", {})
    (tmp_path / "presets" / "broken.json").write_text("{nope")
    assert [p.name for p in PresetStore(tmp_path).user_presets()] == ["My style"]


def _msg(mid: int, role: str, content: str) -> SimpleNamespace:
    from app.store import Timings

    return SimpleNamespace(id=mid, role=role, content=content, model="m", timings=Timings(),
                           finish_reason=None, streaming=False)


def test_long_chats_render_a_page_at_a_time(qtbot) -> None:
    view = ChatView(THEMES["light"], icon_set())
    qtbot.addWidget(view)
    messages = [_msg(i, "user" if i % 2 else "assistant", f"message {i}") for i in range(1, 131)]
    view.set_messages(messages)
    assert len(view.widgets) == 50 and view.earlier.isVisibleTo(view)
    view.show_earlier()
    view.show_earlier()
    assert [w.message_id for w in view.widgets] == list(range(1, 131))
    assert not view.earlier.isVisibleTo(view)

"""The Models window (offscreen) against the real fake Hub on 127.0.0.1 and the real planner, engine
and SQLite store: browse -> pick a branch -> fit badge -> download -> library card -> load into chat
-> first reply. Plus a gated repo (token prompt -> keyring -> download) and resuming an interrupted
download found on disk at startup.

The loadable repo serves a tiny random Llama (2 layers, hidden 64) written with safetensors, beside
the real SmolLM2 tokenizer files from the `smollm2_fp16_dir` fixture: it loads and replies in well
under a second on CPU, where serving the 270 MB SmolLM2 weights would dominate the test's time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QInputDialog

from app.hub.access import KEYRING_SERVICE, KEYRING_USER, HubAccess
from app.hub.download import PARTIAL_DIR, JobState, folder_name
from app.planner.verdict import FITS
from app.store import Store
from app.ui.downloads import DownloadsView
from app.ui.hub_browser import ModelsWindow
from app.ui.main_window import MainWindow
from tests.hubserver import FakeRepo, HubServer, standard_repos

pytestmark = pytest.mark.timeout(120)
CHAT_REPO = "kestrel-test/TinyChat-exl2"
CHAT_BRANCH = "fp16"
TINY = "kestrel-test/TinyLlama-1.1B-exl2"
GATED = "kestrel-test/Gated-Llama-exl2"
GATED_TOKEN = "hf_kestrel_test_token"
NET_MS = 20_000

TINY_CHAT_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 49152, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    "torch_dtype": "float16",
}


def tiny_llama_files(smollm2_dir: str) -> dict[str, bytes]:
    """A random 2-layer Llama with SmolLM2's real tokenizer and chat template (ChatML)."""
    import torch
    from safetensors.torch import save

    c = TINY_CHAT_CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).half()

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h).half()}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {p + "input_layernorm.weight": torch.ones(h).half(),
                    p + "post_attention_layernorm.weight": torch.ones(h).half(),
                    p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                    p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                    p + "mlp.down_proj.weight": rand(h, i)}
    files = {"config.json": json.dumps(c, indent=1).encode(),
             "model.safetensors": save(tensors, metadata={"format": "pt"})}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        path = Path(smollm2_dir, name)
        if path.is_file():
            files[name] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def chat_files(smollm2_fp16_dir: str) -> dict[str, bytes]:
    return tiny_llama_files(smollm2_fp16_dir)


@pytest.fixture
def hub(chat_files):
    server = HubServer()
    standard_repos(server)
    server.add(FakeRepo(CHAT_REPO, branches={
        "main": {"README.md": b"---\nlicense: apache-2.0\n---\n# TinyChat\n\nA **tiny** chat model.\n\n"
                              b"| bpw | file |\n|---|---|\n| 16 | model.safetensors |\n"},
        CHAT_BRANCH: chat_files}, tags=["exl2", "llama"], downloads=42, likes=3))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def access(hub, tmp_path, monkeypatch, memory_keyring):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))   # no token from a real `hf auth login`
    return HubAccess(endpoint=hub.url, cache_dir=str(tmp_path / "hf-cache"))


def test_browse_download_library_load_and_reply(qtbot, tmp_path, hub, access):
    window = MainWindow(Store(tmp_path / "chats.sqlite3", flush_interval=0.1), tmp_path / "config", "light")
    qtbot.addWidget(window)
    window.show()
    library_dir = tmp_path / "models"
    models: ModelsWindow = window.open_models("browse", library_dir=str(library_dir), access=access,
                                              include_hf_cache=False)
    qtbot.waitUntil(lambda: not models.library.scanning, timeout=NET_MS)
    assert models.library.cards == []
    browser = models.browser
    assert models.isVisible() and models.tabs.currentWidget() is browser

    # Search: EXL2 repos only (the plain fp16 repo is not listed), sorted by downloads.
    with qtbot.waitSignal(browser.searched, timeout=NET_MS):
        qtbot.keyClicks(browser.search_edit, "tiny")
        qtbot.keyClick(browser.search_edit, Qt.Key.Key_Return)
    listed = [s.repo_id for s in browser.results]
    assert listed == [TINY, CHAT_REPO]          # 500 downloads before 42
    assert browser.results_list.count() == 2

    # An EXL2 repo: bpw / head bits per branch, a fit badge each, main (no weights) not offered.
    with qtbot.waitSignal(browser.branches_shown, timeout=NET_MS), qtbot.waitSignal(browser.card_shown,
                                                                                    timeout=NET_MS):
        browser.select_repo(TINY)
    names = [browser.branch_table.item(r, 0).text() for r in range(browser.branch_table.rowCount())]
    assert names == ["6_5", "4_0", "3.0bpw_h6"]
    row = browser.row_of("6_5")
    assert browser.branch_table.item(row, 1).text() == "6.5" and browser.branch_table.item(row, 2).text() == "8"
    badge = browser.badge_of("4_0").badge
    assert badge.level == FITS and browser.badge_of("4_0").text() == "Fits"
    assert "4,096 tokens" in badge.tooltip and "Weights" in badge.tooltip and "KV cache" in badge.tooltip
    assert "TinyLlama EXL2" in browser.card_view.toPlainText()
    assert "license: mit" not in browser.card_view.toPlainText()     # YAML front matter stripped

    # The chat repo holds an unquantized branch: hidden until "EXL2 branches only" is unticked.
    with qtbot.waitSignal(browser.branches_shown, timeout=NET_MS), qtbot.waitSignal(browser.card_shown,
                                                                                    timeout=NET_MS):
        browser.select_repo(CHAT_REPO)
    assert browser.branch_table.rowCount() == 0
    assert "<table" in browser.card_view.toHtml() and "tiny" in browser.card_view.toPlainText()
    browser.exl2_only.setChecked(False)
    assert browser.branch_table.rowCount() == 1
    assert browser.badge_of(CHAT_BRANCH).badge.level == FITS

    # Download from the branch row; the Downloads page shows it to the end.
    progress_seen: list[float] = []
    qtbot.mouseClick(browser.download_button(CHAT_BRANCH), Qt.MouseButton.LeftButton)
    assert models.tabs.currentWidget() is models.downloads
    row_widget = models.downloads.row_for(CHAT_REPO, CHAT_BRANCH)
    row_widget.bridge.progress.connect(lambda p: progress_seen.append(p.fraction))
    with qtbot.waitSignal(models.library.scanned, timeout=NET_MS):
        qtbot.waitUntil(lambda: row_widget.state is JobState.COMPLETE, timeout=NET_MS)
    final = library_dir / folder_name(CHAT_REPO, CHAT_BRANCH)
    assert row_widget.bar.value() == row_widget.bar.maximum()
    assert row_widget.state_label.text() == "Finished" and str(final) in row_widget.caption.text()
    assert row_widget.files.topLevelItemCount() == len(hub.repos[CHAT_REPO].branches[CHAT_BRANCH])
    assert progress_seen and progress_seen[-1] == 1.0
    assert not row_widget.pause_button.isVisible() and not row_widget.cancel_button.isVisible()

    # The library lists it with what it is and whether it fits.
    card_widget = models.library.widget_for(str(final))
    assert card_widget is not None
    card = card_widget.card
    assert card.repo_id == CHAT_REPO and card.branch == CHAT_BRANCH and card.supported
    assert card.params and card.size_bytes > 6_000_000
    assert card_widget.badge.badge.level == FITS

    # Load into chat: the main window's own load path, then a first reply.
    qtbot.mouseClick(card_widget.load_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.model_info is not None, timeout=60_000)
    assert os.path.realpath(window.model_info.path) == os.path.realpath(final)
    window.sampler_panel.set_values({"temperature": 0.0}, 8)
    window.send("Hello there")
    qtbot.waitUntil(lambda: window.generation is None, timeout=60_000)
    replies = [m for m in window.store.messages(window.current_id) if m.role == "assistant"]
    assert len(replies) == 1 and replies[0].content

    # Delete asks first; only the Delete button removes the folder.
    box = models.library.confirm_delete(card_widget.card)
    box.button(box.StandardButton.Cancel).click()
    assert final.is_dir()
    window.unload_model()
    box = models.library.confirm_delete(models.library.widget_for(str(final)).card)
    next(b for b in box.buttons() if b.text() == "Delete").click()
    assert not final.exists() and models.library.cards == []
    window.close()
    window.store.close()


def test_gated_download_asks_for_token_and_keeps_it_in_the_keyring(qtbot, tmp_path, access, memory_keyring):
    view = DownloadsView(str(tmp_path / "models"), access)
    qtbot.addWidget(view)
    view.show()
    row = view.start(GATED, "4_0")
    qtbot.waitUntil(lambda: row.token_dialog is not None, timeout=NET_MS)
    assert row.state is JobState.FAILED
    assert "gated" in row.caption.text() and "token" in row.caption.text()
    dialog = row.token_dialog
    assert isinstance(dialog, QInputDialog) and dialog.isVisible()
    dialog.setTextValue(GATED_TOKEN)
    dialog.accept()
    assert memory_keyring.store[(KEYRING_SERVICE, KEYRING_USER)] == GATED_TOKEN
    qtbot.waitUntil(lambda: row.state is JobState.COMPLETE, timeout=NET_MS)
    assert (tmp_path / "models" / folder_name(GATED, "4_0") / "config.json").is_file()


def test_interrupted_download_is_offered_for_resume_at_startup(qtbot, tmp_path, hub, access):
    library = tmp_path / "models"
    weights = "output.safetensors"
    size = len(hub.repos[TINY].branches["4_0"][weights])
    hub.hold(TINY, weights, size // 2)
    first = DownloadsView(str(library), access)
    qtbot.addWidget(first)
    first.show()
    row = first.start(TINY, "4_0")
    partial = library / PARTIAL_DIR / folder_name(TINY, "4_0") / (weights + ".incomplete")
    qtbot.waitUntil(lambda: partial.is_file() and partial.stat().st_size >= size // 2, timeout=NET_MS)
    qtbot.mouseClick(row.pause_button, Qt.MouseButton.LeftButton)
    hub.release(TINY, weights)
    qtbot.waitUntil(lambda: row.state_label.text() == "Paused", timeout=NET_MS)
    assert row.state is JobState.PAUSED and not row.running
    assert row.resume_button.isVisible() and "paused" in row.caption.text()

    # "Restart the app": a new Downloads page finds the partial download and resumes it with Range.
    since = len(hub.requests)
    second = DownloadsView(str(library), access)
    qtbot.addWidget(second)
    second.show()
    found = second.find_pending()
    assert [(r.job.repo_id, r.job.branch) for r in found] == [(TINY, "4_0")]
    resumed = found[0]
    assert resumed.state_label.text() == "Interrupted"
    qtbot.waitUntil(resumed.resume_button.isVisible)      # rows added to a shown page appear on the next loop
    qtbot.mouseClick(resumed.resume_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: resumed.state is JobState.COMPLETE, timeout=NET_MS)
    gets = hub.file_requests(TINY, weights, since)
    assert gets and all(g["range"] and g["range"].startswith("bytes=") for g in gets)
    assert sum(g["sent"] for g in gets) <= size - size // 2
    assert (library / folder_name(TINY, "4_0") / weights).stat().st_size == size

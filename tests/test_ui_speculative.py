"""The model panel's speculative decoding options, and the engine worker loading a draft model."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.ui.model_panel import ModelPanel, RecentModels, describe_model
from app.ui.worker import EngineWorker, LoadRequest

pytestmark = pytest.mark.timeout(600)


def make_panel(qtbot, tmp_path: Path) -> ModelPanel:
    panel = ModelPanel(RecentModels(tmp_path))
    qtbot.addWidget(panel)
    panel.show()
    return panel


def test_draft_picker_and_ngram_toggle(qtbot, tmp_path: Path) -> None:
    panel = make_panel(qtbot, tmp_path)
    panel.set_path("/models/big")
    assert panel.request() == LoadRequest("/models/big", "auto", None)
    panel.draft_edit.setText("  /models/small ")
    r = panel.request()
    assert (r.draft, r.speculative) == ("/models/small", None)
    panel.ngram_check.click()
    assert not panel.draft_edit.isEnabled() and not panel.draft_button.isEnabled()
    r = panel.request()
    assert (r.draft, r.speculative) == (None, "ngram")
    panel.ngram_check.click()
    assert panel.draft_edit.isEnabled() and panel.request().draft == "/models/small"


def test_worker_loads_a_draft_and_the_panel_shows_it(qtbot, tmp_path: Path, smollm2_fp16_dir: str,
                                                     smollm2_exl2_mixed: str) -> None:
    panel = make_panel(qtbot, tmp_path)
    worker = EngineWorker()
    infos, failures = [], []
    worker.loaded.connect(infos.append)
    worker.load_failed.connect(failures.append)
    worker.load(LoadRequest(str(tmp_path / "missing"), "cpu", 256, draft=smollm2_exl2_mixed))
    assert failures and not infos  # a bad target folder is a dialog, not a crash
    worker.load(LoadRequest(smollm2_fp16_dir, "cpu", 256, draft=smollm2_exl2_mixed))
    assert len(infos) == 1, failures
    info = infos[0]
    assert info.draft_model == smollm2_exl2_mixed
    assert ("Draft", Path(smollm2_exl2_mixed).name) in describe_model(info)
    panel.set_loaded(info)
    shown = [panel.details.itemAt(i).widget().text() for i in range(panel.details.count())]
    assert "Draft" in shown
    worker.unload()

"""The quantize wizard (offscreen) driving the real converter on SmolLM2 truncated to 2 layers, on CPU:
setup pages -> run page -> result page with bpw and perplexity; Pause then Resume finishes the job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PySide6.QtCore import Qt

from app.engine import load_model
from app.ui.quantize_wizard import QuantizeWizard
from tests.test_quantize import EXL2_MEASUREMENT, TEXT_FILES, truncate_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny(smollm2_fp16_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return truncate_model(smollm2_fp16_dir, tmp_path_factory.mktemp("wiz") / "smollm2-2l", 2)


def _setup(qtbot, tiny: str, out: Path, measurement: str | None) -> QuantizeWizard:
    torch.set_num_threads(1)
    wizard = QuantizeWizard(library_dirs=[os.path.dirname(tiny)])
    qtbot.addWidget(wizard)
    wizard.show()
    # Source: the library lists the fp16 folder; picking it fills the path and a default output.
    index = wizard.library_combo.findData(tiny)
    assert index > 0
    wizard.library_combo.setCurrentIndex(index)
    assert wizard.source_edit.text() == tiny and wizard.out_edit.text().endswith("smollm2-2l-exl2")
    qtbot.mouseClick(wizard.next_button, Qt.MouseButton.LeftButton)
    assert wizard.page_name() == "target"
    first = wizard.estimate_label.text()
    assert "of weights" in first and "VRAM" in first
    wizard.bpw_spin.setValue(6.0)
    assert wizard.estimate_label.text() != first  # live: more bits, bigger
    wizard.bpw_spin.setValue(4.0)
    wizard.head_combo.setCurrentIndex(wizard.head_combo.findData(16))
    wizard.device_combo.setCurrentText("cpu")
    if measurement:
        wizard.measurement_edit.setText(measurement)
    qtbot.mouseClick(wizard.next_button, Qt.MouseButton.LeftButton)
    assert wizard.page_name() == "calibration"
    wizard.files_edit.setText(str(out.parent / "missing.txt"))
    qtbot.mouseClick(wizard.next_button, Qt.MouseButton.LeftButton)
    assert wizard.page_name() == "calibration" and "not found" in wizard.message.text()
    wizard.files_edit.setText(";".join(TEXT_FILES[:2]))
    wizard.rows_spin.setValue(4)
    wizard.length_spin.setValue(64)
    qtbot.mouseClick(wizard.next_button, Qt.MouseButton.LeftButton)
    assert wizard.page_name() == "output"
    wizard.out_edit.setText(str(out))
    return wizard


def test_wizard_quantizes_to_result_page(qtbot, tiny: str, tmp_path: Path) -> None:
    wizard = _setup(qtbot, tiny, tmp_path / "out", str(EXL2_MEASUREMENT))
    opened: list[str] = []
    wizard.open_in_chat.connect(opened.append)
    qtbot.mouseClick(wizard.next_button, Qt.MouseButton.LeftButton)
    assert wizard.page_name() == "run" and wizard.running()
    qtbot.waitUntil(lambda: wizard.page_name() == "result", timeout=150_000)
    assert wizard.last_error is None
    log = wizard.log.toPlainText()
    assert "strategy" in log and "quantizing layer 2/2" in log and "writing the EXL2 folder" in log
    r = wizard.result
    assert abs(r["bpw"] - 4.0) < 0.1 and r["size"] > 0
    # A 2-layer cut of the model is a poor language model (huge perplexity), but 4 bpw must stay close to it.
    assert r["ppl_before"] > 1.0 and 0.5 < r["ppl_after"] / r["ppl_before"] < 2.0
    assert "bpw" in wizard.result_label.text() and "Perplexity" in wizard.result_label.text()
    assert not os.path.exists(str(tmp_path / "out") + ".job")
    qtbot.mouseClick(wizard.open_button, Qt.MouseButton.LeftButton)
    assert opened == [str(tmp_path / "out")]
    assert load_model(opened[0], "cpu").is_quantized


def test_wizard_pause_and_resume(qtbot, tiny: str, tmp_path: Path) -> None:
    wizard = _setup(qtbot, tiny, tmp_path / "out", str(EXL2_MEASUREMENT))
    # Pause as soon as the first layer is under way: the job stops at its next checkpoint.
    paused = []

    def on_progress(_f: float, message: str) -> None:
        if message.startswith("quantizing layer 1/") and not paused:
            paused.append(message)
            qtbot.mouseClick(wizard.pause_button, Qt.MouseButton.LeftButton)

    wizard.next_button.click()
    wizard.thread.progress.connect(on_progress)
    qtbot.waitUntil(lambda: not wizard.running(), timeout=150_000)
    assert paused and wizard.page_name() == "run" and "paused" in wizard.stage_label.text()
    assert wizard.resume_button.isEnabled() and not wizard.pause_button.isEnabled()
    job = Path(str(tmp_path / "out") + ".job", "job.json")
    assert job.exists()
    assert not (tmp_path / "out").exists()
    qtbot.mouseClick(wizard.resume_button, Qt.MouseButton.LeftButton)
    assert "Resuming" in wizard.log.toPlainText()
    qtbot.waitUntil(lambda: wizard.page_name() == "result", timeout=150_000)
    assert abs(wizard.result["bpw"] - 4.0) < 0.1


def test_main_window_opens_the_wizard(qtbot, tmp_path: Path) -> None:
    from app.store import Store
    from app.ui.main_window import MainWindow

    store = Store(tmp_path / "db.sqlite")
    window = MainWindow(store, tmp_path, "light")
    qtbot.addWidget(window)
    qtbot.mouseClick(window.quantize_button, Qt.MouseButton.LeftButton)
    wizard = window.findChild(QuantizeWizard)
    assert wizard is not None and wizard.isVisible() and wizard.page_name() == "source"
    wizard.close()
    window.close()
    store.close()

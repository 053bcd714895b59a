"""The planner page (offscreen) with the real planner on the real SmolLM2 folder: the bar and the
verdict follow the context slider, the cache mode and a planned bpw, on preset GPUs."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from app.planner.verdict import FITS
from app.ui.planner_view import GpuPicker, PlannerView, bar_segments, gpu_options

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def planner(qtbot, smollm2_fp16_dir):
    view = PlannerView(gpu_picker=GpuPicker(options=gpu_options([])))   # presets only: same on any machine
    qtbot.addWidget(view)
    view.resize(720, 520)
    view.show()
    view.gpu.select_label("4 GB")
    view.set_model_folder(smollm2_fp16_dir)
    return view


def segment(view: PlannerView, label: str) -> int:
    return next(n for name, n, _c in view.bar.segments if name == label)


def test_slider_moves_bar_and_verdict_goes_from_fits_to_not(qtbot, planner):
    assert planner.context_slider.value() == 4096 and planner.context_spin.value() == 4096
    assert planner.verdict.level == FITS and planner.verdict_label.text().startswith("Fits")
    kv_small, total_small = segment(planner, "KV cache"), planner.bar.total
    widths_small = planner.bar.segment_widths(600)
    assert planner.bar.capacity == 4 * 1024 ** 3 and planner.bar.free < planner.bar.capacity
    assert "FP16" in planner.max_context_label.text() and "Q4" in planner.max_context_label.text()
    planner.bar.grab()   # paints

    planner.context_slider.setFocus()
    qtbot.keyClick(planner.context_slider, Qt.Key.Key_End)
    assert planner.context_slider.value() == 131072 and planner.context_spin.value() == 131072
    assert segment(planner, "KV cache") == kv_small * 32
    assert planner.bar.total > planner.bar.free > total_small
    assert planner.bar.segment_widths(600)[1] > widths_small[1]
    assert planner.verdict.level != FITS
    assert planner.verdict_label.text().startswith("Does not fit")
    assert planner.suggestions_label.text()          # what would make it fit
    planner.bar.grab()

    # The Q4 cache shrinks the KV segment; a roomy preset makes it fit again.
    planner.cache_combo.setCurrentIndex(planner.cache_combo.findData("q4"))
    assert segment(planner, "KV cache") < kv_small * 32 / 3
    planner.gpu.select_label("80 GB")
    assert planner.verdict.level == FITS and planner.verdict_label.text().startswith("Fits")


def test_spin_box_and_planned_bpw_update_the_estimate(qtbot, planner):
    planner.context_spin.setValue(2048)
    assert planner.context_slider.value() == 2048 and planner.estimate.context == 2048
    weights_fp16 = segment(planner, "Weights")
    planner.bpw_spin.setValue(4.0)
    planner.bpw_check.setChecked(True)
    assert segment(planner, "Weights") < weights_fp16 * 0.6   # embeddings stay large in a 135M model
    assert planner.estimate.model.source == "parameters x bpw"
    assert planner.estimate.model.bpw == 4.0
    assert [name for name, _n, _c in bar_segments(planner.estimate)] == ["Weights", "KV cache", "Activations",
                                                                          "Overhead"]


def test_broken_folder_is_explained(qtbot, planner, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    planner.set_model_folder(str(tmp_path))
    assert planner.base_spec is None
    assert "config.json" in planner.verdict_label.text()

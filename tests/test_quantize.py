"""The EXL2 quantizer on the real SmolLM2 weights, truncated to 2 layers so it runs on 2 CPU cores.

Checks what must hold for any correct GPTQ/EXL2 converter: stored tensors dequantize bit-exactly to
what the quantizer rounded to, GPTQ beats round-to-nearest on the calibration activations, the
output hits the bpw target, our bit accounting equals exllamav2's, and a SIGKILLed job resumes to
byte-identical output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.engine import load_model
from app.engine.config import ModelConfig
from app.engine.exl2_writer import quantize_rtn
from app.engine.quantize import (
    CalibrationSettings,
    QuantizeError,
    QuantSpec,
    convert,
    load_measurement,
    measure_model,
    optimize,
)
from app.engine.quantize.blocks import BlockRunner, read_layer
from app.engine.quantize.calibration import OPENINGS, rows_from_files, self_generated_rows
from app.engine.quantize.gptq import Hessian, gptq_quantize_many, output_error, prepare
from app.engine.quantize.measure import SPECS, Measurement, Option
from app.engine.safetensors_io import TensorStore
from app.engine.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
EXL2_MEASUREMENT = REPO / "tests" / "data" / "exllamav2_ref" / "exllamav2-measurement-smollm2-135m.json"
TEST_SPECS = [SPECS[3], SPECS[10]]  # ~3 and ~5 bits
TEXT_FILES = tuple(str(REPO / p) for p in ("docs/ARCHITECTURE.md", "app/engine/generator.py",
                                           "app/engine/tokenizer.py", "app/engine/chat_template.py"))


def truncate_model(src: str, dst: Path, layers: int) -> str:
    """Copy an fp16 folder keeping only the first `layers` decoder layers."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    keep = {k: v for k, v in tensors.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in os.listdir(src):
        if name not in ("model.safetensors", "config.json") and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst / name)
    return str(dst)


@pytest.fixture(scope="module")
def tiny(smollm2_fp16_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return truncate_model(smollm2_fp16_dir, tmp_path_factory.mktemp("tiny") / "smollm2-2l", 2)


@pytest.fixture(scope="module")
def calib(tiny: str) -> torch.Tensor:
    rows = rows_from_files(CalibrationSettings(rows=8, length=128, files=TEXT_FILES), Tokenizer.from_folder(tiny))
    return torch.tensor(rows)


def _qkv_hessian(model: str, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    config = ModelConfig.from_folder(model)
    store = TensorStore(model)
    lw = read_layer(store, config, 0)
    x = store.get("model.embed_tokens.weight")[ids].float()
    store.close()
    runner = BlockRunner(config, torch.device("cpu"), ids.shape[1])
    h = Hessian(config.hidden_size, torch.device("cpu"))
    runner.attention(lw, x, runner.dense(lw, ("q_proj", "k_proj", "v_proj", "o_proj")),
                     lambda g, a: h.add(a) if g == "qkv" else None)
    return h.value(), lw.linears


def test_gptq_is_exact_and_beats_rtn(tiny: str, calib: torch.Tensor) -> None:
    torch.set_num_threads(1)
    h, linears = _qkv_hessian(tiny, calib)
    prep = prepare(h)
    specs = [QuantSpec.of([(3, 0.3), (2, 0.7)], 64), QuantSpec.of([(4, 1.0)], 128),
             QuantSpec.of([(8, 0.25), (6, 0.75)], 32)]
    ws = [linears[p] for p in ("q_proj", "v_proj") for _ in specs]
    layouts = [s.layout(576) for _ in ("q_proj", "v_proj") for s in specs]
    results = gptq_quantize_many(ws, prep, layouts)
    for w, groups, q in zip(ws, layouts, results):
        # What the file holds dequantizes to exactly what the quantizer rounded to.
        assert torch.equal(q.tensors.dequantize(w.shape[1], w.shape[0]), q.weight)
        assert [int(b) for b in q.tensors.q_groups[0::2]] == [b for b, _ in groups]
        rtn = quantize_rtn(w, groups, prep.perm).dequantize(w.shape[1], w.shape[0])
        e_gptq, e_rtn = output_error(w, q.weight, h), output_error(w, rtn, h)
        assert e_gptq < 0.9 * e_rtn, (groups[0], e_gptq, e_rtn)
        assert e_gptq < 0.3
    # One weight alone gives the same result as the batched pass.
    alone = gptq_quantize_many([ws[1]], prep, [layouts[1]])[0]
    assert torch.equal(alone.weight, results[1].weight)


def test_bits_match_exllamav2_and_optimizer_hits_target(smollm2_fp16_dir: str) -> None:
    config = ModelConfig.from_folder(smollm2_fp16_dir)
    m = load_measurement(str(EXL2_MEASUREMENT), config)
    shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    blocks = {k: v for k, v in m.blocks.items() if k.startswith("model.layers.")}
    assert len(blocks) == 60
    for opts in blocks.values():
        for o in opts:
            assert o.total_bits == sum(spec.total_bits(*shapes[p]) for p, spec in o.modules.items())
    m.blocks = blocks
    for target in (2.5, 4.0, 6.0):
        s = optimize(m, target)
        assert target - 0.05 <= s.bpw <= target, (target, s.bpw)
        assert s == optimize(m, target)  # deterministic
    lo, hi = optimize(m, 3.0), optimize(m, 5.0)
    assert hi.objective < lo.objective
    with pytest.raises(QuantizeError):
        optimize(m, 1.0)


def test_measurement_round_trip(tmp_path: Path) -> None:
    m = Measurement(info={"model": "x"})
    m.blocks["model.layers.0.mlp"] = [Option(0.0123456789012345, 123456, {"down_proj": SPECS[2], "up_proj": SPECS[9]})]
    m.numel["model.layers.0.mlp"] = 999
    path = str(tmp_path / "m.json")
    m.save(path)
    back = load_measurement(path)
    assert back.blocks == m.blocks and back.numel == m.numel and back.info == m.info
    (tmp_path / "bad.json").write_text('{"blocks": 3}')
    with pytest.raises(QuantizeError):
        load_measurement(str(tmp_path / "bad.json"))


def test_calibration_sources(tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"Sentence number {i} about quantization."}) for i in range(40)))
    rows = rows_from_files(CalibrationSettings(rows=2, length=32, files=(str(jsonl),)), Tokenizer.from_folder(tiny))
    assert [len(r) for r in rows] == [32, 32]
    with pytest.raises(QuantizeError, match="tokens"):
        rows_from_files(CalibrationSettings(rows=50, length=64, files=(str(jsonl),)), Tokenizer.from_folder(tiny))
    # Parquet through pyarrow; without pyarrow, one clear error naming the package.
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    parquet = tmp_path / "c.parquet"
    pq.write_table(pyarrow.table({"text": [f"Row {i} of a parquet calibration file." for i in range(40)]}), parquet)
    from_parquet = rows_from_files(CalibrationSettings(rows=2, length=32, files=(str(parquet),)),
                                   Tokenizer.from_folder(tiny))
    assert [len(r) for r in from_parquet] == [32, 32] and from_parquet != rows
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(QuantizeError, match="pip install pyarrow"):
        rows_from_files(CalibrationSettings(rows=1, length=16, files=(str(parquet),)), Tokenizer.from_folder(tiny))
    with pytest.raises(QuantizeError, match="no string field"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"content": "x"}\n')
        rows_from_files(CalibrationSettings(rows=1, length=16, files=(str(bad),)), Tokenizer.from_folder(tiny))
    # Data-free: seeded, so the same settings give the same rows; rows differ from each other.
    a = self_generated_rows(tiny, CalibrationSettings(rows=2, length=64, seed=3), device="cpu")
    assert len(a) == 2 and all(len(r) == 64 for r in a) and a[0] != a[1]
    assert a == self_generated_rows(tiny, CalibrationSettings(rows=2, length=64, seed=3), device="cpu")
    tok = Tokenizer.from_folder(tiny)
    prompts = [tok.decode(r) for r in a]
    # each row is a chat (template, then the answer) or a plain-text opening the model continues
    assert all(("<|im_start|>user" in p and "<|im_start|>assistant" in p)
               or any(p.lstrip(tok.bos_token or "").startswith(o) for o in OPENINGS) for p in prompts)
    mixed = self_generated_rows(tiny, CalibrationSettings(rows=8, length=32, seed=0), device="cpu")
    kinds = {"<|im_start|>user" in tok.decode(r[:24]) for r in mixed}
    assert kinds == {True, False}  # both kinds occur


def test_measure_model(tiny: str, calib: torch.Tensor, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    path = str(tmp_path / "measurement.json")
    m = measure_model(tiny, path, calibration_ids=calib, specs=TEST_SPECS, device="cpu")
    assert list(m.blocks) == ["model.layers.0.self_attn", "model.layers.0.mlp",
                              "model.layers.1.self_attn", "model.layers.1.mlp"]
    shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    for opts in m.blocks.values():
        assert len(opts) == 2
        low, high = opts
        assert 0 < high.error < low.error < 0.5  # 5 bits beat 3 bits on every block
        for o in opts:
            assert o.total_bits == sum(spec.total_bits(*shapes[p]) for p, spec in o.modules.items())
    back = load_measurement(path)
    assert back.blocks == m.blocks and back.numel == m.numel
    assert not os.path.exists(path + ".job")


RESUME_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from app.engine.quantize import convert
from tests.test_quantize import TEST_SPECS
def slow(fraction, message):
    if message.startswith("quantizing layer"):
        time.sleep(1.5)
ids = torch.load(sys.argv[3])
convert(sys.argv[1], sys.argv[2], 4.0, head_bits=16, measurement=sys.argv[4], calibration_ids=ids,
        device="cpu", progress=slow)
"""


def _files(folder: str) -> dict[str, bytes]:
    return {n: Path(folder, n).read_bytes() for n in sorted(os.listdir(folder))}


def test_convert_and_resume_after_sigkill(tiny: str, calib: torch.Tensor, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out_a = str(tmp_path / "a")
    # exllamav2's own measurement of SmolLM2, mapped onto our options (layers 0-1 are used).
    res = convert(tiny, out_a, 4.0, head_bits=16, measurement=str(EXL2_MEASUREMENT), calibration_ids=calib,
                  device="cpu")
    assert abs(res.bpw - 4.0) <= 0.1 and res.bpw <= 4.0
    cfg = json.loads(Path(out_a, "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "exl2" and cfg["bits"] == 4.0 and cfg["calibration"]["rows"] == 8
    assert not os.path.exists(out_a + ".job")
    model = load_model(out_a, "cpu")
    fp = load_model(tiny, "cpu")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert not torch.equal(fp.dequantized_weight(name), model.dequantized_weight(name))
    ids = calib[:1, :64]
    p_fp = torch.softmax(fp.forward(ids)[0], -1)
    p_q = torch.softmax(model.forward(ids)[0], -1)
    assert (p_fp.argmax(-1) == p_q.argmax(-1)).float().mean() > 0.8

    # A second job with the same measurement, SIGKILLed after its first layer, then resumed.
    out_b = str(tmp_path / "b")
    torch.save(calib, tmp_path / "ids.pt")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, tiny, out_b, str(tmp_path / "ids.pt"),
                             str(EXL2_MEASUREMENT)], env=env, cwd=str(REPO))
    job_json = Path(out_b + ".job", "job.json")
    deadline = time.time() + 60
    while time.time() < deadline:
        if job_json.exists() and json.loads(job_json.read_text()).get("quant_next", 0) >= 1:
            break
        assert proc.poll() is None, "the conversion ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out_b) and Path(out_b + ".job", "layer_0000.safetensors").exists()
    convert(tiny, out_b, 4.0, head_bits=16, measurement=str(EXL2_MEASUREMENT), calibration_ids=calib,
            device="cpu")
    assert _files(out_a) == _files(out_b)
    with pytest.raises(QuantizeError, match="other settings"):
        os.makedirs(out_b + ".job")
        Path(out_b + ".job", "job.json").write_text(json.dumps({"params": {}}))
        convert(tiny, out_b, 4.0, head_bits=16, measurement=str(EXL2_MEASUREMENT), calibration_ids=calib,
                device="cpu")


def test_quantize_cli(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    torch.set_num_threads(1)
    out = str(tmp_path / "q")
    saved = str(tmp_path / "saved-measurement.json")
    args = ["quantize", "--model", tiny, "--bpw", "4.0", "--head-bits", "16", "--out", out,
            "--calibration", TEXT_FILES[0], "--calibration", TEXT_FILES[1], "--rows", "4", "--length", "64",
            "--measurement", str(EXL2_MEASUREMENT), "--save-measurement", saved, "--device", "cpu"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("quantizing layer 1/2" in x for x in lines) and any("quantizing layer 2/2" in x for x in lines)
    assert lines[-1].startswith(f"wrote {out}: ") and "bpw" in lines[-1]
    assert load_model(out, "cpu").is_quantized
    assert load_measurement(saved, ModelConfig.from_folder(tiny)).blocks
    # Bad input: one line on stderr, exit 2.
    for bad in (["--bpw", "9"], ["--calibration", str(tmp_path / "missing.txt")]):
        argv = args[:1] + ["--model", tiny, "--out", str(tmp_path / "x"), "--bpw", "4.0", "--device", "cpu",
                           "--rows", "2", "--length", "32"] + bad
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    os.makedirs(str(tmp_path / "y.job"))
    assert main(args[:1] + ["--model", tiny, "--out", str(tmp_path / "y"), "--bpw", "4.0"]) == 2
    assert "--resume" in capsys.readouterr().err

"""fp16 folder -> EXL2 folder: calibrate, measure, optimize, quantize layer by layer, compile.

All work happens in a job folder (job.json plus per-layer checkpoints), so a job that is killed or
cancelled resumes where it stopped and gives the same bytes as an uninterrupted run. Layers are
quantized in order, each fed with states that went through the already-quantized layers before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..errors import CancelledError
from ..exl2 import EXL2_SUFFIXES, Exl2Tensors
from ..exl2_writer import tensors_of, write_folder
from ..loader import resolve_device
from ..safetensors_io import TensorStore
from .blocks import ATTN, MLP, BlockRunner, LayerWeights, batches, module_name, read_layer
from .calibration import CalibrationSettings, calibration_rows
from .gptq import (
    Hessian,
    QuantizedLinear,
    QuantizeError,
    QuantSpec,
    gptq_quantize,
    gptq_quantize_many,
    prepare,
    stored_bits,
)
from .measure import (
    HEAD_SPECS,
    SPECS,
    Measurement,
    Option,
    _block_numel,
    block_options,
    load_measurement,
    measure_block,
)
from .optimize import optimize

Progress = Callable[[float, str], None]
JOB_VERSION = 1
DEFAULT_CALIBRATION = CalibrationSettings()


@dataclass
class ConvertResult:
    out_folder: str
    target_bpw: float
    bpw: float                  # achieved: stored bits of all decoder-layer linears / their weights
    head_bits: int
    measurement_path: str
    strategy: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


# --- job folder ----------------------------------------------------------------------------------


def _atomic_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _atomic_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path + ".tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class Job:
    """job.json (settings + progress) and the checkpoint files beside it."""

    def __init__(self, folder: str, params: dict) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "job.json")
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.state = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise QuantizeError(f"cannot be read ({e})", path=self.path,
                                    hint="Delete the job folder to start over.") from e
            if self.state.get("params") != params:
                raise QuantizeError("this job folder belongs to a conversion with other settings", path=folder,
                                    hint="Use the same settings to resume, or delete the folder to start over.")
        else:
            self.state = {"version": JOB_VERSION, "params": params, "measure_next": 0, "quant_next": 0}
            self.save()

    def file(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def save(self) -> None:
        _atomic_json(self.path, self.state)

    def advance(self, key: str, value: int, states: torch.Tensor, prefix: str) -> None:
        """Save the states for step `value`, then record it; older state files go afterwards."""
        _atomic_tensors(self.file(f"{prefix}_{value:04d}.safetensors"), {"states": states})
        self.state[key] = value
        self.save()
        old = self.file(f"{prefix}_{value - 1:04d}.safetensors")
        if os.path.exists(old):
            os.remove(old)

    def states(self, prefix: str, step: int) -> torch.Tensor | None:
        path = self.file(f"{prefix}_{step:04d}.safetensors")
        return load_file(path)["states"] if os.path.isfile(path) else None


# --- stages --------------------------------------------------------------------------------------


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("the conversion was cancelled",
                             hint="Run it again with the same settings and job folder to resume.")


def _embed(store: TensorStore, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    emb = store.get("model.embed_tokens.weight")
    return emb[ids].to(device=device, dtype=torch.float32)


def run_measurement(src: str, ids: torch.Tensor, job: Job, device: torch.device,
                    report: Progress, cancel: threading.Event | None, specs: list[QuantSpec]) -> Measurement:
    """Measure every block (resuming from the job's last finished layer)."""
    config = ModelConfig.from_folder(src)
    path = job.file("measurement.json")
    m = load_measurement(path) if os.path.isfile(path) and job.state["measure_next"] > 0 else Measurement()
    m.info = {"model": os.path.basename(os.path.normpath(src)), "num_layers": config.num_layers,
              "calibration": {"rows": int(ids.shape[0]), "length": int(ids.shape[1])}}
    store = TensorStore(src)
    try:
        runner = BlockRunner(config, device, ids.shape[1])
        start = job.state["measure_next"]
        states = _resume_states(job, "measure", start, store, ids, device)
        for i in range(start, config.num_layers):
            lw = read_layer(store, config, i)
            for kind in ("self_attn", "mlp"):
                report(i / config.num_layers, f"measuring layer {i + 1}/{config.num_layers} {kind}")
                opts, states = measure_block(runner, lw, states, kind, block_options(kind, specs), lambda: _check(cancel))
                name = f"model.layers.{i}.{kind}"
                m.blocks[name] = opts
                m.numel[name] = sum(lw.linears[p].numel() for p in (ATTN if kind == "self_attn" else MLP))
            m.save(path)
            job.advance("measure_next", i + 1, states, "measure_states")
    finally:
        store.close()
    return m


def _quantize_group(runner: BlockRunner, lw: LayerWeights, states: torch.Tensor, kind: str,
                    specs: dict[str, QuantSpec], layer: int, done: dict[str, QuantizedLinear]) -> torch.Tensor:
    """Quantize one block's projections in order (later ones see the earlier ones' quantized outputs)."""
    projs = ATTN if kind == "self_attn" else MLP
    order = [("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",))] if kind == "self_attn" \
        else [("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",))]
    weights = runner.dense(lw, projs)
    for group, members in order:
        h = Hessian(lw.linears[members[0]].shape[1], runner.device)

        def tap(g: str, x: torch.Tensor, group: str = group, h: Hessian = h) -> None:
            if g == group:
                h.add(x)

        for sl in batches(states):
            x = states[sl].to(runner.device)
            if kind == "self_attn":
                runner.attention(lw, x, weights, tap, stop_before_o=True)
            else:
                runner.mlp(lw, x, weights, tap, stop_before_down=True)
        prep = prepare(h.value())
        ws = [lw.linears[p] for p in members]
        qs = gptq_quantize_many(ws, prep, [specs[p].layout(w.shape[1]) for p, w in zip(members, ws)],
                                [lw.biases[p] for p in members])
        for proj, q in zip(members, qs):
            done[module_name(layer, proj)] = q
            weights[proj] = q.weight.to(device=runner.device, dtype=torch.float32)
    outs = []
    for sl in batches(states):
        x = states[sl].to(runner.device)
        outs.append(runner.attention(lw, x, weights) if kind == "self_attn" else runner.mlp(lw, x, weights))
    return torch.cat(outs)


def _save_layer(path: str, layers: dict[str, QuantizedLinear]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for key, q in layers.items():
        tensors.update(tensors_of(key, q.tensors))
    _atomic_tensors(path, tensors)


def _load_layers(path: str) -> dict[str, Exl2Tensors]:
    raw = load_file(path)
    keys = sorted({k.rsplit(".", 1)[0] for k in raw})
    return {k: Exl2Tensors(bias=raw.get(f"{k}.bias"), **{s: raw[f"{k}.{s}"] for s in EXL2_SUFFIXES}) for k in keys}


def _resume_states(job: Job, stage: str, start: int, store: TensorStore, ids: torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """Hidden states entering layer `start` of a stage: the checkpoint, or the embeddings at 0."""
    if not start:
        return _embed(store, ids, device)
    states = job.states(f"{stage}_states", start)
    if states is None:
        what = "measurement" if stage == "measure" else "quantization"
        raise QuantizeError(f"the {what} checkpoint is missing", path=job.folder,
                            hint="Delete the job folder to start over.")
    return states.to(device)


def run_quantize(src: str, ids: torch.Tensor, job: Job, chosen: dict[str, Option], head_bits: int,
                 device: torch.device, report: Progress, cancel: threading.Event | None) -> None:
    config = ModelConfig.from_folder(src)
    store = TensorStore(src)
    try:
        runner = BlockRunner(config, device, ids.shape[1])
        start = job.state["quant_next"]
        states = _resume_states(job, "quant", start, store, ids, device)
        n = config.num_layers
        for i in range(start, n):
            _check(cancel)
            lw = read_layer(store, config, i)
            done: dict[str, QuantizedLinear] = {}
            for kind in ("self_attn", "mlp"):
                report(i / n, f"quantizing layer {i + 1}/{n} {kind}")
                states = _quantize_group(runner, lw, states, kind, chosen[f"model.layers.{i}.{kind}"].modules,
                                         i, done)
            _save_layer(job.file(f"layer_{i:04d}.safetensors"), done)
            job.advance("quant_next", i + 1, states, "quant_states")
        if head_bits in HEAD_SPECS and start <= n and not os.path.isfile(job.file("head.safetensors")):
            _check(cancel)
            report(1.0, "quantizing the output head")
            norm = store.get("model.norm.weight").to(device)
            h = Hessian(config.hidden_size, device)
            for sl in batches(states):
                h.add(runner.be.rms_norm(states[sl].to(device), norm.float(), config.rms_norm_eps))
            head = store.get("lm_head.weight") if "lm_head.weight" in store else store.get("model.embed_tokens.weight")
            q = gptq_quantize(head.to(torch.float16), prepare(h.value()),
                              HEAD_SPECS[head_bits].layout(config.hidden_size))
            _save_layer(job.file("head.safetensors"), {"lm_head": q})
    finally:
        store.close()


def compile_folder(src: str, out: str, job: Job, bits: float, head_bits: int, extra: dict,
                   max_shard_bytes: int) -> float:
    """Write the EXL2 folder from the checkpoints; return the achieved bpw of the decoder layers."""
    config = ModelConfig.from_folder(src)
    layers: dict[str, Exl2Tensors] = {}
    for i in range(config.num_layers):
        layers.update(_load_layers(job.file(f"layer_{i:04d}.safetensors")))
    if head_bits in HEAD_SPECS:
        layers.update(_load_layers(job.file("head.safetensors")))
    numel = sum(_block_numel(config, k) for k in ("self_attn", "mlp")) * config.num_layers
    total = sum(stored_bits(t) for k, t in layers.items() if k != "lm_head")

    def plan(module: str, _weight: torch.Tensor) -> Exl2Tensors | None:
        return layers.get(module)

    partial = out.rstrip("/\\") + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    write_folder(src, partial, plan, bits=bits, head_bits=head_bits, quantize_head=head_bits in HEAD_SPECS,
                 extra_config=extra, max_shard_bytes=max_shard_bytes)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(partial, out)
    return total / numel


# --- public entry points -------------------------------------------------------------------------


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _prepare_job(src: str, job_dir: str, params: dict, calibration: CalibrationSettings,
                 calibration_ids: torch.Tensor | None, device: str, report: Progress) -> tuple[Job, torch.Tensor]:
    if calibration_ids is not None:
        params["calibration_ids"] = _ids_digest(calibration_ids)
    job = Job(job_dir, params)
    cal_path = job.file("calibration.safetensors")
    if os.path.isfile(cal_path):
        ids = load_file(cal_path)["input_ids"]
    else:
        if calibration_ids is not None:
            ids = calibration_ids.to(torch.int64).cpu()
        else:
            ids = calibration_rows(src, calibration, device,
                                   lambda f, msg: report(0.05 * f, msg))
        _atomic_tensors(cal_path, {"input_ids": ids})
    return job, ids


def measure_model(src: str, out_json: str, calibration: CalibrationSettings = DEFAULT_CALIBRATION, *,
                  calibration_ids: torch.Tensor | None = None, device: str = "auto", job_dir: str | None = None,
                  progress: Progress | None = None, cancel: threading.Event | None = None,
                  specs: list[QuantSpec] | None = None) -> Measurement:
    """Measure a model once (it does not depend on the target bpw) and save the JSON for reuse."""
    report = progress or (lambda _f, _m: None)
    specs = specs or SPECS
    dev = resolve_device(device)
    job_dir = job_dir or out_json + ".job"
    params = {"kind": "measure", "src": os.path.abspath(src), "calibration": calibration.to_dict(),
              "seed": calibration.seed, "specs": [s.desc for s in specs]}
    job, ids = _prepare_job(src, job_dir, params, calibration, calibration_ids, device, report)
    m = run_measurement(src, ids, job, dev, report, cancel, specs)
    m.save(out_json)
    shutil.rmtree(job_dir, ignore_errors=True)
    return m


def convert(src: str, out: str, bits: float, head_bits: int = 6,
            calibration: CalibrationSettings = DEFAULT_CALIBRATION, measurement: str | None = None, *,
            calibration_ids: torch.Tensor | None = None, progress: Progress | None = None,
            cancel: threading.Event | None = None, device: str = "auto", job_dir: str | None = None,
            keep_job: bool = False, specs: list[QuantSpec] | None = None, norm: float = 2.0, max_shard_bytes: int = 8 * 2**30) -> ConvertResult:
    """Convert an fp16/bf16 Llama-family folder to EXL2 at `bits` average bpw (decoder layers).

    head_bits: 2/3/4/5/6/8 quantize the output head, 16 keeps it fp16. measurement: a saved
    measurement (ours or exllamav2's) to skip measuring. A killed or cancelled job resumes from
    `job_dir` (default: `<out>.job`) when called again with the same settings.
    """
    t0 = time.perf_counter()
    report = progress or (lambda _f, _m: None)
    specs = specs or SPECS
    if head_bits not in HEAD_SPECS and head_bits != 16:
        raise QuantizeError(f"head_bits must be one of {sorted(HEAD_SPECS) + [16]}, not {head_bits}")
    if not 2.0 <= bits <= 8.5:
        raise QuantizeError(f"target bpw {bits} is outside 2.0-8.5", hint="Pick a bpw between 2 and 8.")
    config = ModelConfig.from_folder(src)
    if config.quant is not None:
        raise QuantizeError("is already quantized", path=src, hint="Convert the original fp16/bf16 model folder.")
    dev = resolve_device(device)
    job_dir = job_dir or out.rstrip("/\\") + ".job"
    params = {"kind": "convert", "src": os.path.abspath(src), "bits": bits, "head_bits": head_bits,
              "calibration": calibration.to_dict(), "seed": calibration.seed, "norm": norm,
              "measurement": os.path.abspath(measurement) if measurement else None,
              "specs": [s.desc for s in specs]}
    job, ids = _prepare_job(src, job_dir, params, calibration, calibration_ids, device, report)
    _check(cancel)

    m_path = job.file("measurement.json")
    if measurement:
        m = load_measurement(measurement, config)
        if job.state["measure_next"] == 0:
            m.save(m_path)
            job.state["measure_next"] = config.num_layers
            job.save()
    elif job.state["measure_next"] < config.num_layers:
        m = run_measurement(src, ids, job, dev, lambda f, msg: report(0.05 + 0.45 * f, msg), cancel, specs)
    else:
        m = load_measurement(m_path)
    wanted = [f"model.layers.{i}.{k}" for i in range(config.num_layers) for k in ("self_attn", "mlp")]
    absent = [w for w in wanted if w not in m.blocks]
    if absent:
        raise QuantizeError(f"the measurement has no entry for {absent[0]}", path=measurement or m_path,
                            hint="The measurement belongs to another model; measure this one.")
    m.blocks = {w: m.blocks[w] for w in wanted}
    strategy = optimize(m, bits, norm)
    chosen = {name: m.blocks[name][j] for name, j in strategy.choice.items()}
    report(0.5, f"strategy: {strategy.bpw:.3f} bpw planned")

    run_quantize(src, ids, job, chosen, head_bits, dev, lambda f, msg: report(0.5 + 0.45 * f, msg), cancel)
    _check(cancel)
    report(0.96, "writing the EXL2 folder")
    extra = {"calibration": calibration.to_dict() if calibration_ids is None else
             {"rows": int(ids.shape[0]), "length": int(ids.shape[1]),
              "dataset": calibration.dataset if calibration.files else "token ids given by the caller"}}
    bpw = compile_folder(src, out, job, bits, head_bits, extra, max_shard_bytes)
    kept = os.path.join(out, "measurement.json")  # beside the model, for reuse at other bitrates
    shutil.copyfile(m_path if not measurement else measurement, kept)
    if not keep_job:
        shutil.rmtree(job_dir, ignore_errors=True)
    report(1.0, f"done: {bpw:.3f} bpw")
    return ConvertResult(out, bits, bpw, head_bits, kept, strategy.choice, time.perf_counter() - t0)

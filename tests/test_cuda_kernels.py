"""Our CUDA kernels against the PyTorch reference (needs an NVIDIA GPU and the built extension).

Test data comes from our own EXL2 writer (quantize_rtn / split_groups): every bit width, mixed
groups in one matrix, act order, shapes whose K is not a whole number of 32-row groups and whose N is
not a multiple of 8. Run on the device with KESTREL_JIT=1 (bench/device_cuda.sh) or after
`pip install -e .` built the extension.

With KESTREL_GEMV_EXACT=0 one row of x goes to the half2 gemv (fp16 products and partial sums):
tests of the linear layer allow H2_TOL for it, 1e-3 for the exact fp32 kernel.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from app.engine.backend import Linear, TorchBackend
from app.engine.exl2 import Exl2Tensors, unpack_codes, unpack_scales
from app.engine.exl2_writer import quantize_rtn, split_groups
from app.engine.rope import apply_rope, inv_freq_for, rope_tables

pytestmark = pytest.mark.gpu

MIXES = {
    "b8": [(8, 1.0)], "b6": [(6, 1.0)], "b5": [(5, 1.0)], "b4": [(4, 1.0)], "b3": [(3, 1.0)], "b2": [(2, 1.0)],
    "mixed": [(8, 0.1), (6, 0.2), (5, 0.2), (4, 0.2), (3, 0.2), (2, 0.1)],
}
SHAPES = [(576, 1536), (1536, 576), (200, 100), (100, 200), (14336, 576), (576, 14336)]  # (K, N)
H2_TOL = 2e-3  # relative error of the output norm allowed to the half2 (batch-1) gemv


@pytest.fixture(scope="module")
def backend():
    from app.engine.cuda_backend import CudaBackend, extension_status

    ok, why = extension_status()
    if not ok:
        pytest.fail(f"CUDA extension unavailable on a GPU machine: {why}")
    return CudaBackend(torch.device("cuda"), torch.float16)


@functools.cache
def _quantized(k: int, n: int, mix: str, seed: int, act_order: bool, bias: bool):
    """Quantize once per parameter set (the writer runs on the CPU); tests share the result."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, :: max(1, k // 7)] *= 4  # a few outlier features, so the scales differ per group
    perm = torch.randperm(k, generator=gen) if act_order else None
    b = (torch.randn(n, generator=gen) * 0.1).half() if bias else None
    t = quantize_rtn(w, split_groups(k, MIXES[mix]), perm, b)
    return t, t.dequantize(k, n), b


def make_layer(k: int, n: int, mix: str, seed: int, act_order: bool = True, bias: bool = False):
    """A fresh Linear (prepare_linear consumes it) plus the reference fp16 weight and bias."""
    t, ref, b = _quantized(k, n, mix, seed, act_order, bias)
    t = Exl2Tensors(t.q_weight, t.q_invperm, t.q_scale, t.q_scale_max, t.q_groups, t.bias)
    return Linear(f"test.{k}x{n}.{mix}", k, n, exl2=t), ref, b


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def gemv_tol(backend, rows: int) -> float:
    """Tolerance of rel_err for a linear of `rows` rows: the half2 path serves exactly one row."""
    return H2_TOL if rows == 1 and not backend.gemv_exact else 1e-3


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("k,n", SHAPES)
def test_dequant_bit_exact(backend, k: int, n: int, mix: str) -> None:
    lin, ref, _ = make_layer(k, n, mix, seed=k + 3 * n)
    backend.prepare_linear(lin)
    assert backend.packed(lin) is not None, "layer fell back to the dense path"
    got = backend.dequantized_weight(lin).cpu()
    assert got.dtype == torch.float16 and got.shape == (n, k)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("rows", [1, 3, 8, 32])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("k,n", SHAPES)
def test_gemv_matches_fp32_reference(backend, k: int, n: int, mix: str, rows: int) -> None:
    lin, ref_w, _ = make_layer(k, n, mix, seed=k + 3 * n)
    backend.prepare_linear(lin)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).half()
    ref = x.float() @ ref_w.float().t()
    out = backend.linear(x.cuda(), lin).cpu()
    assert out.shape == (rows, n) and out.dtype == torch.float16
    assert rel_err(out, ref) < gemv_tol(backend, rows)
    # twice in a row: the shared workspace must come back zeroed
    out2 = backend.linear(x.cuda(), lin).cpu()
    assert rel_err(out2, ref) < gemv_tol(backend, rows)


@pytest.mark.parametrize("rows", [1, 8, 40, 300])
def test_linear_with_bias_and_3d_input(backend, rows: int) -> None:
    lin, ref_w, b = make_layer(1536, 200, "mixed", seed=5, bias=True)
    backend.prepare_linear(lin)
    x = torch.randn(1, rows, 1536, generator=torch.Generator().manual_seed(1)).half()
    ref = x.float() @ ref_w.float().t() + b.float()
    out = backend.linear(x.cuda(), lin).cpu()
    assert out.shape == (1, rows, 200)
    assert rel_err(out, ref) < gemv_tol(backend, rows)


@pytest.mark.parametrize("mix", ["b4", "mixed"])
def test_prefill_path_matches(backend, mix: str) -> None:
    lin, ref_w, _ = make_layer(576, 1536, mix, seed=11)
    backend.prepare_linear(lin)
    x = torch.randn(77, 576, generator=torch.Generator().manual_seed(2)).half()
    ref = x.float() @ ref_w.float().t()
    out = backend.linear(x.cuda(), lin).cpu()
    assert rel_err(out, ref) < 1e-3


def test_prefill_path_column_chunks(backend, monkeypatch) -> None:
    """A temp-buffer cap smaller than the layer forces the column-chunked dequant + matmul."""
    import app.engine.cuda_backend as cb

    lin, ref_w, b = make_layer(200, 14336, "mixed", seed=12, bias=True)
    backend.prepare_linear(lin)
    monkeypatch.setattr(cb, "DEQUANT_TEMP_ELEMS", 200 * 1000)
    x = torch.randn(64, 200, generator=torch.Generator().manual_seed(3)).half()
    ref = x.float() @ ref_w.float().t() + b.float()
    assert rel_err(backend.linear(x.cuda(), lin).cpu(), ref) < 1e-3


def test_identity_order_layer(backend) -> None:
    lin, ref_w, _ = make_layer(1536, 576, "b4", seed=13, act_order=False)
    backend.prepare_linear(lin)
    assert backend.packed(lin).perm.numel() == 0
    x = torch.randn(3, 1536, generator=torch.Generator().manual_seed(4)).half()
    assert rel_err(backend.linear(x.cuda(), lin).cpu(), x.float() @ ref_w.float().t()) < 1e-3


def unrounded_weight(t: Exl2Tensors, k: int, n: int) -> torch.Tensor:
    """float64 (n, k): (q - 2^(bits-1)) * scale without dequantize's final rounding to fp16 (what the
    gemv kernels multiply by: they apply the fp16 group scale to fp32 sums of x * (q - zero))."""
    s = unpack_scales(t.q_scale, n).double()
    smax = (t.q_scale_max.to(torch.float16).float() / 256.0).to(torch.float16).double()
    scales = ((s * s).to(torch.float16).double() * smax.unsqueeze(1)).to(torch.float16).double()
    w = torch.empty(k, n, dtype=torch.float64)
    for gi, (bits, row, rows, qrow) in enumerate(t.groups(k)):
        codes = unpack_codes(t.q_weight[qrow: qrow + -(-rows * bits // 32), :n], bits, rows)
        w[row: row + rows] = (codes.double() - (1 << (bits - 1))) * scales[gi]
    return w[t.q_invperm.to(torch.int64)].t().contiguous()


def fp16_ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing of fp16 numbers at |v| (2^-24 below the normal range)."""
    _, e = torch.frexp(v.double().abs())
    return torch.pow(2.0, (e - 11).clamp(min=-24).double())


def raw_gemv(backend, fn: str, x: torch.Tensor, lin: Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One extension gemv call (bypassing the backend's choice of kernel)."""
    p = backend.packed(lin)
    out = torch.empty(x.shape[0], p.out_features, dtype=torch.float16, device="cuda")
    b = bias.cuda() if bias is not None else torch.empty(0, dtype=torch.float16, device="cuda")
    getattr(backend.ext, fn)(x.cuda().contiguous(), p.perm, p.qweight, p.qscale, p.step, p.tiles, b,
                             backend._acc, backend._counters, out)
    return out.cpu()


H2_SHAPES = [*SHAPES, (736, 1000), (4128, 1032), (1504, 24)]  # K, N not multiples of 64/128/256


def test_half2_gemv_is_built_and_chosen_as_configured(backend) -> None:
    import app.engine.cuda_backend as cb

    assert hasattr(backend.ext, "exl2_gemv_half2"), "the built extension predates the half2 gemv: rebuild it"
    assert backend.gemv_exact == cb.GEMV_EXACT


@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("k,n", H2_SHAPES)
def test_half2_gemv_matches_reference(backend, k: int, n: int, mix: str, act_order: bool, scale: float) -> None:
    """The half2 gemv against the float64 product with the dequantized weight, within fp16 accumulation
    error; scale 300 (with outliers of 1e4) would overflow fp16 partial sums without the x pre-scaling."""
    lin, ref_w, _ = make_layer(k, n, mix, seed=k + 3 * n, act_order=act_order)
    backend.prepare_linear(lin)
    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(1, k, generator=gen) * scale
    if scale > 100:
        x[0, :: max(1, k // 5)] = 1e4
    x = x.half()
    ref = x.double() @ ref_w.double().t()
    for _ in range(2):  # twice: the shared workspace must come back zeroed
        out = raw_gemv(backend, "exl2_gemv_half2", x, lin)
        assert out.shape == (1, n) and torch.isfinite(out).all()
        assert rel_err(out.double(), ref) < H2_TOL
        assert (out.double() - ref).abs().max().item() < 5e-3 * ref.abs().max().item()
    exact = raw_gemv(backend, "exl2_gemv", x, lin)
    assert rel_err(out.double(), exact.double()) < H2_TOL


@pytest.mark.parametrize("fn", ["exl2_gemv", "exl2_gemv_half2"])
@pytest.mark.parametrize("k,n", [(14336, 576), (576, 14336), (4128, 1032)])
def test_gemv_gives_the_same_bits_on_every_run(backend, fn: str, k: int, n: int) -> None:
    """Many K-split blocks add into one workspace in whatever order they finish; the 64-bit fixed-point
    sum makes the result independent of that order (fp32 atomics made graph and eager decoding, and
    two runs with one seed, part ways at near-ties). Rows checked together (speculative drafts) get the
    one-row result bit for bit."""
    lin, _, _ = make_layer(k, n, "mixed", seed=5 + k, act_order=True)
    backend.prepare_linear(lin)
    gen = torch.Generator().manual_seed(k * 7 + n)
    x = (torch.randn(5, k, generator=gen) * 3).half()
    x[:, :: max(1, k // 9)] = 40.0  # outliers: large partial sums of both signs
    first = raw_gemv(backend, fn, x[:1], lin)
    for _ in range(40):
        assert torch.equal(raw_gemv(backend, fn, x[:1], lin), first)
    if fn == "exl2_gemv":
        rows = raw_gemv(backend, fn, x, lin)
        for r in range(5):
            assert torch.equal(rows[r:r + 1], raw_gemv(backend, fn, x[r:r + 1], lin))


@pytest.mark.parametrize("rows", [1, 3, 8, 12])
@pytest.mark.parametrize("k,ns", [(576, (576, 192, 192)), (4128, (1032, 200)), (1504, (24, 1000, 8))])
def test_linear_many_is_one_launch_of_every_matrix(backend, k: int, ns: tuple[int, ...], rows: int) -> None:
    """q/k/v (or gate/up) as one gemv launch: each output against the float64 product with its own
    dequantized weight and bias (act order, mixed bits), every row alike whatever the row count, and
    the same bits on every run."""
    made = [make_layer(k, n, "mixed", seed=k + 31 * n + i, act_order=True, bias=i == 1) for i, n in enumerate(ns)]
    lins = tuple(lin for lin, _, _ in made)
    for lin in lins:
        backend.prepare_linear(lin)
    backend.reserve_group(lins)
    assert backend.gemv_many, "the built extension predates exl2_gemv_many: rebuild it"
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + k)) * 2).half().cuda()
    outs = backend.linear_many(x, lins)
    for out, (lin, ref_w, b) in zip(outs, made, strict=True):
        ref = x.cpu().double() @ ref_w.double().t() + (b.double() if b is not None else 0)
        assert out.shape == (rows, lin.out_features)
        assert rel_err(out.cpu().double(), ref) < 1e-3
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(backend.linear_many(x, lins), outs, strict=True))
    if rows <= 8:
        for r in range(rows):
            one = backend.linear_many(x[r:r + 1], lins)
            assert all(torch.equal(a, b[r:r + 1]) for a, b in zip(one, outs, strict=True))


def test_half2_gemv_bias_and_backend_path(backend, monkeypatch) -> None:
    lin, ref_w, b = make_layer(1536, 200, "mixed", seed=5, bias=True)
    backend.prepare_linear(lin)
    monkeypatch.setattr(backend, "gemv_exact", False)
    x = torch.randn(1, 1, 1536, generator=torch.Generator().manual_seed(7)).half()
    ref = x.double() @ ref_w.double().t() + b.double()
    out = backend.linear(x.cuda(), lin).cpu()
    assert out.shape == (1, 1, 200)
    assert rel_err(out.double(), ref) < H2_TOL
    # the backend's one-row path is the half2 kernel (equal up to the K chunks' atomic add order)
    assert rel_err(out[0].double(), raw_gemv(backend, "exl2_gemv_half2", x[0], lin, b).double()) < 1e-4


@pytest.mark.parametrize("mix", ["b8", "b4", "b3", "mixed"])
@pytest.mark.parametrize("k,n", [(576, 1536), (14336, 576), (4128, 1032)])
def test_exact_gemv_when_forced(backend, monkeypatch, k: int, n: int, mix: str) -> None:
    """KESTREL_GEMV_EXACT (backend.gemv_exact): one row goes to the fp32 kernel, whose result is the
    float64 product with the unrounded dequantized weight rounded to fp16, up to fp32 summation
    order: at most one fp16 ulp apart, plus 1e-4 of the output's rms for outputs near zero. The half2
    kernel's error is several times that slack, so this also shows which kernel ran."""
    t, _, _ = _quantized(k, n, mix, k + 3 * n, True, False)
    lin, _, _ = make_layer(k, n, mix, seed=k + 3 * n)
    backend.prepare_linear(lin)
    monkeypatch.setattr(backend, "gemv_exact", True)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).half()
    ref = x.double() @ unrounded_weight(t, k, n).t()
    out = backend.linear(x.cuda(), lin).cpu().double()
    slack = fp16_ulp(torch.maximum(out.abs(), ref.abs())) + 1e-4 * ref.pow(2).mean().sqrt()
    assert ((out - ref.half().double()).abs() <= slack).all()
    half2 = raw_gemv(backend, "exl2_gemv_half2", x, lin).double()
    assert not ((half2 - ref.half().double()).abs() <= slack).all(), "half2 as exact as fp32: suspicious"


def test_gemv_exact_env_is_read_at_import() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch, app.engine.cuda_backend as cb; "
            "print(cb.GEMV_EXACT, cb.CudaBackend(torch.device('cuda'), torch.float16).gemv_exact)")
    for value, want in (("1", "True True"), ("0", "False False")):
        env = {**os.environ, "KESTREL_GEMV_EXACT": value}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                              cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == want


@pytest.mark.parametrize("dim", [64, 576, 4096, 5000])
@pytest.mark.parametrize("wdtype", [torch.float16, torch.float32])
def test_rms_norm(backend, dim: int, wdtype: torch.dtype) -> None:
    ref_be = TorchBackend(torch.device("cuda"), torch.float16)
    gen = torch.Generator().manual_seed(dim)
    x = (torch.randn(3, 5, dim, generator=gen) * 3).half().cuda()
    w = (torch.rand(dim, generator=gen) + 0.5).to(wdtype).cuda()
    got = backend.rms_norm(x, w, 1e-5)
    want = ref_be.rms_norm(x, w, 1e-5)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    r = torch.randn(3, 5, dim, generator=gen).half().cuda()
    x2 = x.clone()
    new_x, y = backend.add_rms_norm(x2, r, w, 1e-5)
    torch.testing.assert_close(new_x, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, ref_be.rms_norm(x + r, w, 1e-5), rtol=2e-3, atol=2e-3)


def test_silu_mul(backend) -> None:
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(2, 3, 1536, generator=gen) * 4).half().cuda()
    u = torch.randn(2, 3, 1536, generator=gen).half().cuda()
    want = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(backend.mlp_act(g, u), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}])
def test_rope(backend, scaling) -> None:
    d = 128
    inv, attn = inv_freq_for(d, 500000.0, scaling, 131072)
    cos, sin = rope_tables(inv, attn, 600, "cuda", torch.float16)
    x = torch.randn(2, 7, 5, d, generator=torch.Generator().manual_seed(9)).half().cuda()
    got = backend.rope(x, cos[500:507], sin[500:507])
    want = apply_rope(x, cos[500:507], sin[500:507])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (32, 8, 128), (4, 4, 96)])
@pytest.mark.parametrize("s", [1, 7, 300, 5000])
def test_decode_attention(backend, h: int, hkv: int, d: int, s: int) -> None:
    gen = torch.Generator().manual_seed(s + h)
    cache_k = torch.randn(2, s + 50, hkv, d, generator=gen).half().cuda()  # views into a larger cache
    cache_v = torch.randn(2, s + 50, hkv, d, generator=gen).half().cuda()
    q = torch.randn(2, 1, h, d, generator=gen).half().cuda()
    k, v = cache_k[:, :s], cache_v[:, :s]
    want = TorchBackend(torch.device("cuda"), torch.float16).attention(q, k, v, s - 1)
    got = backend.attention(q, k, v, s - 1)
    assert got.shape == want.shape == (2, 1, h * d)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
    if s > 5:  # sliding window (Mistral): only the last 5 keys
        want_w = TorchBackend(torch.device("cuda"), torch.float16).attention(q, k, v, s - 1, 5)
        torch.testing.assert_close(backend.attention(q, k, v, s - 1, 5).float(), want_w.float(), rtol=2e-3, atol=2e-3)


def _greedy(model, ids: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    cache = model.allocate_cache(ids.shape[1] + steps + 1)
    logits = model.forward(ids.cuda(), cache, 0, last_only=True)
    first = logits[0, -1].clone()
    out = []
    pos = ids.shape[1]
    for _ in range(steps):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        logits = model.forward(torch.tensor([[tok]], device="cuda"), cache, pos)
        pos += 1
    return out, first


def test_model_greedy_tokens_match_torch_backend(backend, smollm2_exl2_mixed, reference_dir) -> None:
    from app.engine import load_model

    ids = torch.tensor(np.load(reference_dir / "prompt_ids.npy"))[:1]
    ref_model = load_model(smollm2_exl2_mixed, device="cuda", backend="torch")
    want, want_logits = _greedy(ref_model, ids, 32)
    del ref_model
    model = load_model(smollm2_exl2_mixed, device="cuda", backend="cuda")
    assert model.backend.name == "cuda"
    got, got_logits = _greedy(model, ids, 32)
    assert (got_logits - want_logits).abs().max().item() < 0.05 * want_logits.abs().max().item()
    # Both backends read the same continuation (teacher forcing), so one near-tie flip cannot
    # cascade: every position's choice must agree but for rare near-ties (fp32 sums in another order).
    seq = torch.cat([ids[0], torch.tensor(want)])[None].cuda()
    a = load_model(smollm2_exl2_mixed, device="cuda", backend="torch").forward(seq)[0]
    b = model.forward(seq)[0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.97, agree
    assert got[:8] == want[:8]
    # the quantized head and a mixed layer dequantize exactly like the reference
    for name in ("lm_head", "model.layers.4.mlp.down_proj"):
        from app.engine.safetensors_io import TensorStore

        store = TensorStore(smollm2_exl2_mixed)
        try:
            t = Exl2Tensors(**{s: store.get(f"{name}.{s}") for s in
                               ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")})
        finally:
            store.close()
        lin = model.linears()[name]
        assert torch.equal(model.dequantized_weight(name), t.dequantize(lin.in_features, lin.out_features))


@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (32, 8, 128), (5, 1, 80)])
def test_rope_cache_decode(backend, h: int, hkv: int, d: int) -> None:
    """One kernel for RoPE at device-side positions plus the k/v cache write, rows at other positions."""
    gen = torch.Generator().manual_seed(h * d)
    inv, attn = inv_freq_for(d, 10000.0, None, 4096)
    cos, sin = rope_tables(inv, attn, 1000, "cuda", torch.float16)
    q = torch.randn(2, 1, h, d, generator=gen).half().cuda()
    k = torch.randn(2, 1, hkv, d, generator=gen).half().cuda()
    v = torch.randn(2, 1, hkv, d, generator=gen).half().cuda()
    pos = torch.tensor([3, 997], dtype=torch.int32, device="cuda")
    ref = TorchBackend(torch.device("cuda"), torch.float16)
    caches = [torch.zeros(2, 1000, hkv, d, dtype=torch.float16, device="cuda") for _ in range(4)]
    want_q = ref.rope_cache_decode(q, k, v, cos, sin, pos, caches[0], caches[1])
    got_q = backend.rope_cache_decode(q, k, v, cos, sin, pos, caches[2], caches[3])
    torch.testing.assert_close(got_q, want_q, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(caches[2], caches[0], rtol=1e-3, atol=2e-3)
    assert torch.equal(caches[3], caches[1])
    assert caches[2][0, 3].abs().sum() > 0 and caches[2][0, 4].abs().sum() == 0


@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (32, 8, 128), (4, 4, 96)])
@pytest.mark.parametrize("lengths", [(1, 37), (300, 1000), (4999, 5000)])
@pytest.mark.parametrize("window", [None, 5, 700])
def test_attention_cached(backend, h: int, hkv: int, d: int, lengths: tuple[int, int], window) -> None:
    """Attention over the first lengths[b] keys of a 5000-slot cache, read from the device."""
    gen = torch.Generator().manual_seed(h + lengths[1])
    kc = torch.randn(2, 5000, hkv, d, generator=gen).half().cuda()
    vc = torch.randn(2, 5000, hkv, d, generator=gen).half().cuda()
    q = torch.randn(2, 1, h, d, generator=gen).half().cuda()
    n = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    want = TorchBackend(torch.device("cuda"), torch.float16).attention_cached(q, kc, vc, n, window)
    got = backend.attention_cached(q, kc, vc, n, window)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
    # and the same as the eager decode attention on the valid span of each row
    for b, s in enumerate(lengths):
        eager = backend.attention(q[b:b + 1], kc[b:b + 1, :s], vc[b:b + 1, :s], s - 1, window)
        torch.testing.assert_close(got[b:b + 1].float(), eager.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend_name", ["cuda", "torch"])
def test_graph_decode_gives_the_eager_tokens(smollm2_exl2_mixed, reference_dir, monkeypatch,
                                             backend_name: str) -> None:
    """The captured decode step replays to the same greedy tokens as eager decoding."""
    from app.engine import Engine
    from app.engine.types import GenerationSettings

    ids = [int(t) for t in np.load(reference_dir / "prompt_ids.npy")[0]]
    settings = GenerationSettings(max_new_tokens=48, samplers={"temperature": 0.0}, stop_on_eos=False)
    engine = Engine.load(smollm2_exl2_mixed, "cuda", backend=backend_name, max_seq_len=1024)
    graph_text, graph_last = engine.generator.generate(ids, settings)
    assert engine.generator._graph is not None, "the decode step was not captured"
    monkeypatch.setenv("KESTREL_CUDA_GRAPHS", "0")
    eager = Engine.load(smollm2_exl2_mixed, "cuda", backend=backend_name, max_seq_len=1024)
    eager_text, eager_last = eager.generator.generate(ids, settings)
    assert eager.generator._graph is None
    assert graph_last.generated_tokens == eager_last.generated_tokens == 48
    assert graph_text == eager_text
    # a second request on the same cache (prompt caching) replays the same graph
    again, _ = engine.generator.generate(ids, settings)
    assert again == graph_text


def test_regenerate_with_one_seed_gives_one_reply(smollm2_exl2_mixed, reference_dir) -> None:
    """The second request finds the prompt cached and recomputes only its last token; that token goes
    through the decode step in the first request too, and the gemv's sum does not depend on block
    order, so a sampled reply with one seed comes back token for token."""
    from app.engine import Engine
    from app.engine.types import GenerationSettings

    ids = [int(t) for t in np.load(reference_dir / "prompt_ids.npy")[0]]
    settings = GenerationSettings(max_new_tokens=64, seed=11, samplers={"temperature": 1.0}, stop_on_eos=False)
    engine = Engine.load(smollm2_exl2_mixed, "cuda", backend="cuda", max_seq_len=1024)
    first, _ = engine.generator.generate(ids, settings)
    # several cache slots: the prompt is a small share of the first slot's tokens, so it counts as
    # another conversation and is read afresh into a new slot
    again, _ = engine.generator.generate(ids, settings)
    assert engine.generator.last_prefill_tokens == len(ids)
    assert again == first
    engine.generator.set_cache_slots(1)  # one slot: the cached prompt, only its last token recomputed
    for _ in range(2):
        again, last = engine.generator.generate(ids, settings)
        assert last.prompt_tokens == len(ids) and engine.generator.last_prefill_tokens == 1
        assert again == first


def _quant_caches(bits: int, d: int, dtype: torch.dtype, s: int = 400):
    """Two one-layer quantized caches on the GPU with real RoPE tables: one for QuantKVCache.update (the
    reference), one for the decode-step kernel."""
    from app.engine.kv_quant import QuantKVCache

    inv, attn = inv_freq_for(d, 10000.0, None, 4096)
    cos, sin = rope_tables(inv, attn, s, "cuda", dtype)

    def rope(start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cos[start:start + length], sin[start:start + length]

    made = [QuantKVCache(1, 3, d, s, bits, f"q{bits}", "cuda", dtype, rope=rope) for _ in range(2)]
    return made[0], made[1], cos, sin


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_quantized_cache_decode_kernel_matches_update(backend, bits: int, d: int, dtype: torch.dtype) -> None:
    """csrc/kv_quant.cu against QuantKVCache.update, token by token after a prefill longer than the
    ring, and across a truncate: the same read-back (exact positions bit-equal, quantized ones within
    rounding), the same stored codes and scales."""
    gen = torch.Generator().manual_seed(bits * d)
    ref, dev, cos, sin = _quant_caches(bits, d, dtype)
    k = (torch.randn(1, 320, 3, d, generator=gen) + 2 * torch.randn(1, 1, 3, d, generator=gen)).to(dtype).cuda()
    v = torch.randn(1, 320, 3, d, generator=gen).to(dtype).cuda()
    for c in (ref, dev):
        c.update(0, 0, k[:, :150], v[:, :150])
    steps = list(range(150, 190)) + list(range(170, 200))  # the second run follows a truncate to 170
    for i, pos in enumerate(steps):
        if i == 40:
            ref.truncate(pos)
            dev.truncate(pos)
        t = 250 + i if i >= 40 else pos  # other tokens after the truncate
        exact = list(range(4)) + list(range(max(4, pos - 64, ref.ring_lo[0]), pos + 1))
        want_k, want_v = ref.update(0, pos, k[:, t:t + 1], v[:, t:t + 1])
        assert dev.decode_ready(pos)
        kb, vb = dev.decode_target(0)
        kb[:, pos], vb[:, pos] = k[:, t], v[:, t]
        backend.kv_quant_decode(dev, 0, torch.tensor([pos], dtype=torch.int32, device="cuda"), cos, sin)
        dev.decoded(pos)
        got_k, got_v = kb[:, :pos + 1], vb[:, :pos + 1]
        assert torch.equal(got_k[:, exact], want_k[:, exact]) and torch.equal(got_v[:, exact], want_v[:, exact])
        for got, want in ((got_k, want_k), (got_v, want_v)):
            diff = (got.float() - want.float()).abs()
            assert diff.mean() < 1e-3 * want.float().abs().mean(), f"step {i}: mean difference {diff.mean()}"
            assert (diff > 0.05 * want.float().abs().max()).sum() == 0
    n = 200
    same = (dev.keys[0][:, :n] == ref.keys[0][:, :n]).float().mean().item()
    assert same > 0.995, f"stored key codes agree at {same:.4f}"
    torch.testing.assert_close(dev.key_scales[0][:, :n], ref.key_scales[0][:, :n], rtol=1e-3, atol=0)
    torch.testing.assert_close(dev.value_scales[0][:, :n], ref.value_scales[0][:, :n], rtol=1e-3, atol=0)
    assert dev.ring_lo == ref.ring_lo and dev.ring_end == ref.ring_end


@pytest.mark.parametrize("mode", ["q4", "q8"])
def test_graph_decode_with_a_quantized_cache(smollm2_exl2_mixed, reference_dir, mode: str) -> None:
    """A quantized cache decodes in the captured graph (csrc/kv_quant.cu) to the greedy tokens of the
    eager path (QuantKVCache.update in PyTorch ops), across a second request that reuses the prefix."""
    from app.engine import Engine
    from app.engine.types import GenerationSettings

    ids = [int(t) for t in np.load(reference_dir / "prompt_ids.npy")[0]]
    settings = GenerationSettings(max_new_tokens=64, samplers={"temperature": 0.0}, stop_on_eos=False)
    graph = Engine.load(smollm2_exl2_mixed, "cuda", backend="cuda", max_seq_len=1024, cache_mode=mode)
    eager = Engine.load(smollm2_exl2_mixed, "cuda", backend="cuda", max_seq_len=1024, cache_mode=mode)
    eager.generator._graph_failed = True  # never captures: every step runs QuantKVCache.update
    got, _ = graph.generator.generate(ids, settings)
    assert graph.generator._graph is not None, "the quantized-cache decode step was not captured"
    want, _ = eager.generator.generate(ids, settings)
    assert eager.generator._graph is None
    assert got == want
    again, _ = graph.generator.generate(ids + [42], settings)  # prompt caching: a longer prompt
    assert again == eager.generator.generate(ids + [42], settings)[0]


def test_speculative_drafts_are_checked_in_a_graph(smollm2_exl2_mixed, reference_dir) -> None:
    """n-gram drafts are checked by a graph of k+1 rows over the one cache (graphs.SharedRows): the
    greedy reply is the plain one (the EXL2 gemv sums each row alike, attention splits like one row)."""
    from app.engine import Engine
    from app.engine.types import GenerationSettings

    ids = [int(t) for t in np.load(reference_dir / "prompt_ids.npy")[0]] * 3  # repeats: n-grams match
    plain_settings = GenerationSettings(max_new_tokens=64, samplers={"temperature": 0.0}, stop_on_eos=False)
    spec_settings = GenerationSettings(max_new_tokens=64, samplers={"temperature": 0.0}, stop_on_eos=False,
                                       speculative="ngram", draft_tokens=4)
    engine = Engine.load(smollm2_exl2_mixed, "cuda", backend="cuda", max_seq_len=1024)
    plain, _ = engine.generator.generate(ids, plain_settings)
    fast, last = engine.generator.generate(ids, spec_settings)
    assert any(rows > 1 for rows in engine.generator._graphs), "no drafts' check was captured"
    assert last.draft_proposed > 0
    assert fast == plain

"""The EXL2 layout, checked against an independent bit-by-bit reading written here in plain Python."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.errors import ModelFormatError
from app.engine.exl2 import pack_codes, pack_scales, unpack_codes, unpack_scales
from app.engine.exl2_writer import quantize_rtn, split_groups


def reference_unpack(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Read each column as one little-endian bit stream: code i is bits [i*bits, (i+1)*bits)."""
    out = np.zeros((rows, words.shape[1]), dtype=np.int64)
    for col in range(words.shape[1]):
        stream = 0
        for i, w in enumerate(words[:, col].astype(np.int64).tolist()):
            stream |= (int(w) & 0xFFFFFFFF) << (32 * i)
        for r in range(rows):
            out[r, col] = (stream >> (r * bits)) & ((1 << bits) - 1)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("rows", [32, 64, 96, 16, 5])
def test_pack_matches_bitstream_and_round_trips(bits: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + rows)
    codes = torch.randint(0, 1 << bits, (rows, 7), generator=gen)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (-(-rows * bits // 32), 7)
    assert np.array_equal(reference_unpack(words.numpy(), bits, rows), codes.numpy())
    assert torch.equal(unpack_codes(words, bits, rows), codes.to(torch.int32))


def test_scale_codes_low_nibble_first() -> None:
    s = torch.arange(1, 17).reshape(2, 8)
    packed = pack_scales(s)
    assert (packed[0, 0].item() & 0xF) == 0  # s=1 stored as 0
    assert ((packed[0, 0].item() >> 28) & 0xF) == 7
    assert torch.equal(unpack_scales(packed, 8), s.to(torch.int32))


def fp16_dequant_reference(weight: torch.Tensor, t, in_f: int, out_f: int) -> torch.Tensor:
    """Dequantize with numpy float16 arithmetic, one group at a time, from the stored tensors."""
    groups = t.q_groups.numpy().astype(np.int64).reshape(-1, 2)
    s = unpack_scales(t.q_scale, out_f).numpy()
    smax = t.q_scale_max.numpy().astype(np.float16)
    rows_out = np.zeros((in_f, out_f), dtype=np.float16)
    row = 0
    for gi, (bits, qrow) in enumerate(groups):
        nxt = groups[gi + 1][1] if gi + 1 < len(groups) else t.q_weight.shape[0]
        rows = (nxt - qrow) * 32 // bits if gi + 1 < len(groups) else in_f - row
        codes = reference_unpack(t.q_weight.numpy()[int(qrow):int(nxt)], int(bits), int(rows))
        scale = (s[gi] * s[gi]).astype(np.float16) * (smax[gi] * np.float16(1 / 256))
        rows_out[row: row + rows] = (codes - (1 << (bits - 1))).astype(np.float16) * scale.astype(np.float16)
        row += rows
    return torch.from_numpy(rows_out[t.q_invperm.numpy()].T.copy())


def test_dequantize_matches_reference_arithmetic_and_error_bound() -> None:
    gen = torch.Generator().manual_seed(3)
    out_f, in_f = 40, 200  # sizes that are not multiples of 32/64/128
    w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(torch.float16)
    groups = split_groups(in_f, [(8, 0.2), (5, 0.3), (3, 0.3), (2, 0.2)])
    perm = torch.randperm(in_f, generator=gen)
    t = quantize_rtn(w, groups, perm)
    dq = t.dequantize(in_f, out_f)
    assert dq.dtype == torch.float16 and dq.shape == (out_f, in_f)
    assert torch.equal(dq, fp16_dequant_reference(w, t, in_f, out_f))
    # Every weight lands near the original (2-bit groups have only four levels, hence the loose max).
    err = (dq.float() - w.float()).abs()
    assert err.max() < 0.12 and err.mean() < 0.02


def test_groups_must_cover_the_input() -> None:
    w = torch.randn(8, 64).half()
    t = quantize_rtn(w, [(4, 64)])
    t.q_groups = torch.tensor([4, 0, 2, 4], dtype=torch.int16)  # a second group beyond the data
    with pytest.raises(ModelFormatError):
        t.dequantize(64, 8)
    t.q_groups = torch.tensor([7, 0], dtype=torch.int16)
    with pytest.raises(ModelFormatError, match="bit width 7"):
        t.dequantize(64, 8)

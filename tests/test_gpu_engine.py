"""The pure-PyTorch path on the GPU agrees with the CPU path (run on the device; CI skips)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine import load_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("folder", ["smollm2_fp16_dir", "smollm2_exl2_mixed"])
def test_torch_path_on_cuda_matches_cpu(folder, request, reference_dir) -> None:
    path = request.getfixturevalue(folder)
    ids = torch.tensor(np.load(reference_dir / "prompt_ids.npy"))
    cpu = load_model(path, "cpu").forward(ids)[0]
    gpu = load_model(path, "cuda", backend="torch").forward(ids.cuda())[0].float().cpu()
    assert (cpu.argmax(-1) == gpu.argmax(-1)).float().mean() >= 0.95
    overlap = np.mean([len(set(cpu[i].topk(20).indices.tolist()) & set(gpu[i].topk(20).indices.tolist()))
                       for i in range(cpu.shape[0])])
    assert overlap >= 18


def test_dequantized_weights_identical_on_cpu_and_gpu(smollm2_exl2_mixed) -> None:
    a = load_model(smollm2_exl2_mixed, "cpu", backend="torch")
    b = load_model(smollm2_exl2_mixed, "cuda", backend="torch")
    for key in ("model.layers.0.mlp.down_proj", "lm_head"):
        assert torch.equal(a.dequantized_weight(key), b.dequantized_weight(key))

"""On the GPU machine: compare Kestrel's loader with exllamav2 0.3.2 on real EXL2 files.

1. exllamav2's own converter output (`--ref DIR`, made by exllamav2.conversion.convert_exl2 from the
   fp16 SmolLM2 fixture): dequantized weights must be bit-exact, the forward pass over the reference
   prompt must give the same argmax at every position (and top-20 overlap), perplexity over the
   reference ids (8 x 512, each row alone) must agree within 0.5%.
2. An EXL2 folder written by Kestrel's writer (`--ours DIR`): exllamav2 must load it and reconstruct
   the same fp16 weights bit for bit.
Writes a JSON summary, plus the packed tensors of a few reference modules with the sha256 of
exllamav2's reconstruction, so CI can check bit-exact reading without the whole folder.

usage: python bench/device_reference.py --ref DIR --ours DIR --ids-dir DIR --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.loader import load_model  # noqa: E402

MODULES = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
MODULES += ["model.layers.29.mlp.down_proj", "lm_head"]
SAVE_PACKED = MODULES[:-1]  # the head's packed tensors are too large to keep in the repo


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def exl2_load(path: str, max_seq_len: int = 2048):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    cfg = ExLlamaV2Config(path)
    cfg.max_seq_len = max_seq_len
    model = ExLlamaV2(cfg)
    model.load()
    return model


def exl2_dq(model, key: str) -> torch.Tensor:
    return model.modules_dict[key].get_weight_tensor_dq().t().contiguous()  # (out, in)


@torch.inference_mode()
def exl2_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.forward(ids.cpu()).float()


def ppl_from_logits(logit_rows: list[torch.Tensor], rows: np.ndarray) -> float:
    nll, n = 0.0, 0
    for lg, row in zip(logit_rows, rows):
        target = torch.tensor(row[1:], device=lg.device)
        logp = torch.log_softmax(lg[:-1].float(), dim=-1)
        nll -= logp.gather(1, target[:, None]).sum().item()
        n += len(row) - 1
    return float(np.exp(nll / n))


def compare_reference(ref: str, ids_dir: str, out: str) -> dict:
    res: dict = {"folder": ref}
    prompt = torch.tensor(np.load(os.path.join(ids_dir, "prompt_ids.npy")))
    rows = np.load(os.path.join(ids_dir, "ppl_ids.npy"))
    ex = exl2_load(ref)
    ours = load_model(ref, "cuda", backend="torch")
    exact, packed, hashes = {}, {}, {}
    from safetensors import safe_open
    files = [os.path.join(ref, f) for f in os.listdir(ref) if f.endswith(".safetensors")]
    for key in MODULES:
        a = exl2_dq(ex, key)
        b = ours.dequantized_weight(key)
        exact[key] = bool(torch.equal(a.cpu(), b.cpu()))
        hashes[key] = sha(a)
        if not exact[key]:
            d = (a.float().cpu() - b.float().cpu()).abs()
            res.setdefault("dq_mismatch", {})[key] = {"max": d.max().item(), "count": int((d > 0).sum())}
        if key in SAVE_PACKED:
            for f in files:
                with safe_open(f, "pt") as h:
                    for name in h.keys():
                        if name.startswith(key + "."):
                            packed[name] = h.get_tensor(name)
    res["dq_bit_exact"] = exact
    if packed:
        from safetensors.torch import save_file
        save_file(packed, os.path.join(out, "exllamav2_ref_tensors.safetensors"),
                  metadata={k: v for k, v in hashes.items()})
    with open(os.path.join(out, "exllamav2_ref_dq_sha256.json"), "w") as f:
        json.dump(hashes, f, indent=2)
    # forward over the reference prompt
    a = exl2_logits(ex, prompt)[0].cpu()
    b = ours.forward(prompt.cuda())[0].float().cpu()
    res["prompt_argmax_equal"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    overlap = [len(set(a[i].topk(20).indices.tolist()) & set(b[i].topk(20).indices.tolist()))
               for i in range(a.shape[0])]
    res["top20_overlap_mean"] = float(np.mean(overlap))
    res["exllamav2_top20"] = a.topk(20).indices.tolist()
    # perplexity, each row alone
    t0 = time.time()
    res["ppl_exllamav2"] = ppl_from_logits([exl2_logits(ex, torch.tensor(r[None]))[0] for r in rows], rows)
    res["ppl_exllamav2_s"] = time.time() - t0
    t0 = time.time()
    res["ppl_kestrel_torch"] = ppl_from_logits([ours.forward(torch.tensor(r[None]).cuda())[0] for r in rows], rows)
    res["ppl_kestrel_torch_s"] = time.time() - t0
    res["ppl_rel_diff"] = abs(res["ppl_kestrel_torch"] / res["ppl_exllamav2"] - 1)
    del ex
    torch.cuda.empty_cache()
    return res


def compare_ours(path: str, ids_dir: str) -> dict:
    res: dict = {"folder": path}
    ex = exl2_load(path)
    ours = load_model(path, "cuda", backend="torch")
    exact = {}
    for key in ours.linears():
        exact[key] = bool(torch.equal(exl2_dq(ex, key).cpu(), ours.dequantized_weight(key).cpu()))
    res["layers"] = len(exact)
    res["dq_bit_exact_all"] = all(exact.values())
    res["dq_not_exact"] = [k for k, v in exact.items() if not v][:10]
    res.update(compare_forward(ex, ours, ids_dir))
    del ex
    torch.cuda.empty_cache()
    return res


def compare_forward(ex, ours, ids_dir: str) -> dict:
    """Argmax agreement and top-20 overlap on the prompt, perplexity of both engines on the ids."""
    prompt = torch.tensor(np.load(os.path.join(ids_dir, "prompt_ids.npy")))
    rows = np.load(os.path.join(ids_dir, "ppl_ids.npy"))
    a = exl2_logits(ex, prompt)[0].cpu()
    b = ours.forward(prompt.cuda())[0].float().cpu()
    overlap = [len(set(a[i].topk(20).indices.tolist()) & set(b[i].topk(20).indices.tolist()))
               for i in range(a.shape[0])]
    return {
        "prompt_argmax_equal": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "top20_overlap_mean": float(np.mean(overlap)),
        "ppl_exllamav2": ppl_from_logits([exl2_logits(ex, torch.tensor(r[None]))[0] for r in rows], rows),
        "ppl_kestrel_torch": ppl_from_logits([ours.forward(torch.tensor(r[None]).cuda())[0] for r in rows], rows),
    }


def compare_fp16(path: str, ids_dir: str) -> dict:
    """exllamav2 also runs plain fp16 folders: tells its quantized kernels apart from the rest."""
    ex = exl2_load(path)
    ours = load_model(path, "cuda", backend="torch")
    res = {"folder": path, **compare_forward(ex, ours, ids_dir)}
    del ex
    torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref")
    ap.add_argument("--ours", action="append", default=[])
    ap.add_argument("--fp16")
    ap.add_argument("--ids-dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    summary: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if a.ref:
        summary["reference"] = compare_reference(a.ref, a.ids_dir, a.out)
    if a.fp16:
        summary["fp16"] = compare_fp16(a.fp16, a.ids_dir)
    summary["ours"] = [compare_ours(p, a.ids_dir) for p in a.ours]
    with open(os.path.join(a.out, "device_reference.json"), "w") as f:
        json.dump(summary, f, indent=2)
    brief = json.loads(json.dumps(summary))
    if "reference" in brief:
        brief["reference"].pop("exllamav2_top20", None)
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""exllamav2 0.3.2, measured the same way as Kestrel in the same run (device only).

exllamav2 is installed from its PyPI wheel carried to the device; none of its code is in our tree.
Decode: the dynamic generator (paged=False), batch 1, greedy, a `prompt_len`-token prompt and
`new_tokens` new tokens; tok/s counts tokens after the first over the time after the first.
Prefill: one forward over `prefill_len` tokens into the cache. Peak VRAM: torch's peak allocation
counter around load + both runs (exllamav2 allocates through torch).
"""

from __future__ import annotations

import time

import torch


def measure(path: str, prompt_len: int = 128, new_tokens: int = 256, prefill_len: int = 2048,
            repeats: int = 3) -> dict:
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    torch.cuda.reset_peak_memory_stats()
    cfg = ExLlamaV2Config(path)
    need = max(prefill_len, prompt_len + new_tokens) + 16
    cfg.max_seq_len = -(-need // 256) * 256  # exllamav2's cache wants a multiple of 256
    cfg.max_input_len = prefill_len
    cfg.max_attention_size = prefill_len ** 2
    model = ExLlamaV2(cfg)
    cache = ExLlamaV2Cache(model, max_seq_len=cfg.max_seq_len, lazy=True)
    model.load_autosplit(cache)
    tokenizer = ExLlamaV2Tokenizer(cfg)
    gen = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=False)
    vocab = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    settings = ExLlamaV2Sampler.Settings.greedy()

    def decode_once() -> float:
        ids = torch.randint(100, vocab - 100, (1, prompt_len), generator=g)
        job = ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=new_tokens, gen_settings=settings,
                                  stop_conditions=[], decode_special_tokens=True)
        gen.enqueue(job)
        t_first, n = None, 0
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r.get("stage") == "streaming":
                    k = r["token_ids"].shape[-1] if "token_ids" in r else 1
                    if t_first is None and k:
                        torch.cuda.synchronize()
                        t_first = time.perf_counter()
                        n = k - 1
                    else:
                        n += k
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t_first)

    decode_once()  # warm-up
    decode = sorted(decode_once() for _ in range(repeats))[repeats // 2]

    def prefill_once() -> float:
        ids = torch.randint(100, vocab - 100, (1, prefill_len), generator=g)
        cache.current_seq_len = 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.forward(ids, cache, preprocess_only=True)
        torch.cuda.synchronize()
        return prefill_len / (time.perf_counter() - t0)

    prefill_once()
    prefill = sorted(prefill_once() for _ in range(repeats))[repeats // 2]
    peak = torch.cuda.max_memory_allocated()
    model.unload()
    gen = cache = model = None  # noqa: F841 - release before empty_cache
    torch.cuda.empty_cache()
    return {"engine": "exllamav2", "decode_tok_s": decode, "prefill_tok_s": prefill, "peak_vram_bytes": peak}

"""Terminal commands: the same engine from a shell.

  python main.py                       the desktop app
  python main.py chat --model DIR      streaming chat with history
  python main.py generate --model DIR --prompt TEXT [--chat] ...   completion only on stdout
  python main.py perplexity --model DIR --ids FILE.npy             last line: "perplexity: <value>"
  python main.py doctor                GPU, driver, CUDA, torch, extension, flash-attn
  python main.py quantize --model DIR --bpw 4.0 --out DIR [--calibration FILE | --data-free] [--resume] ...
  python main.py serve --model DIR [--host 127.0.0.1] [--port 5000] [--api-key KEY]   OpenAI-compatible API

Errors print as one line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


def _sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--sampler", action="append", default=[], metavar="NAME=VALUE",
                   help="any sampler from the registry, repeatable")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="start from a sampler preset (built-in or saved in the app); flags override it")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable")
    p.add_argument("--json-schema", default=None, metavar="FILE", help="constrain the reply to this JSON schema")
    p.add_argument("--regex", default=None, help="constrain the reply to this regular expression")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (EXL2 or fp16/bf16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--max-seq-len", type=int, default=None, help="context size to allocate")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "cuda"])
    p.add_argument("--lora", action="append", default=[], metavar="DIR[:SCALE]",
                   help="apply a PEFT LoRA adapter folder at SCALE (default 1), repeatable")

    p.add_argument("--cache-mode", default="fp16", choices=["fp16", "q8", "q6", "q4"],
                   help="KV cache precision: q8/q6/q4 fit 2-4x longer chats in the same memory")
    p.add_argument("--rope-scale", type=float, default=None,
                   help="linear RoPE scale (positions / scale), on top of the model's config")
    p.add_argument("--rope-alpha", type=float, default=None,
                   help="NTK RoPE alpha (base *= alpha^(d/(d-2))), to stretch the context without fine-tuning")


def _speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="draft model for speculative decoding (same tokenizer, smaller); turns it on")
    p.add_argument("--speculative", default=None, choices=["draft", "ngram", "off"],
                   help="speculative decoding: with --draft's model, n-gram prompt lookup, or off")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="N", help="tokens drafted per step (4)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kestrel", description="Kestrel: chat with EXL2 language models.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    sub = ap.add_subparsers(dest="command")

    p = sub.add_parser("chat", help="chat in the terminal")
    _model_args(p)
    _sampler_args(p)
    _speculative_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--overflow", default="stop", choices=["stop", "drop_oldest"],
                   help="when the chat outgrows the context: stop with a message, or drop the oldest turns")

    p = sub.add_parser("generate", help="complete one prompt")
    _model_args(p)
    _sampler_args(p)
    _speculative_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None)

    p = sub.add_parser("perplexity", help="score rows of token ids")
    _model_args(p)
    p.add_argument("--ids", required=True, help=".npy file with a 2-D integer array, one row per sample")

    sub.add_parser("doctor", help="what this machine can run")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (docs at /docs)")
    _model_args(p)
    _speculative_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback needs --api-key")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--api-key", default=os.environ.get("KESTREL_API_KEY"),
                   help="key clients must send as 'Authorization: Bearer KEY' (or set KESTREL_API_KEY)")
    p.add_argument("--models-dir", default=None,
                   help="folder /v1/model/load may load from (default: the folder holding --model)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB")
    p.add_argument("--cache-tokens", type=int, default=None,
                   help="KV cache shared by concurrent requests, in tokens (default: 4 x the context)")

    from app.quantize_cli import add_parser as add_quantize_parser

    add_quantize_parser(sub)
    return ap


def _settings(args: argparse.Namespace) -> Any:
    from app.engine.types import GenerationSettings

    samplers: dict[str, Any] = {"temperature": 0.8}
    if args.preset:
        samplers.update(_preset(args.preset))
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        v = getattr(args, name)
        if v is not None:
            samplers[name] = v
    for item in args.sampler:
        name, sep, value = item.partition("=")
        if not sep:
            from app.engine.errors import GenerationError
            raise GenerationError(f"--sampler {item!r} must look like NAME=VALUE")
        samplers[name.strip().replace("-", "_")] = value.strip()
    schema = None
    if args.json_schema:
        from app.engine.constrained import load_schema_file
        schema = load_schema_file(args.json_schema)
    return GenerationSettings(max_new_tokens=args.max_new_tokens, samplers=samplers, seed=args.seed,
                              stop_strings=list(args.stop), json_schema=schema, regex=args.regex or None)


def _preset(name: str) -> dict[str, Any]:
    """A preset's samplers by name (case-insensitive): built-in ones, then the app's saved ones."""
    from app.engine.errors import GenerationError
    from app.ui.presets import PresetStore, default_config_dir

    presets = PresetStore(default_config_dir()).all()
    for preset in presets:
        if preset.name.lower() == name.strip().lower():
            return dict(preset.samplers)
    raise GenerationError(f"no sampler preset named {name!r}",
                          hint=f"Pick one of: {', '.join(p.name for p in presets)}.")


def parse_lora(spec: str) -> tuple[str, float]:
    """DIR[:SCALE] -> (DIR, SCALE); a colon not followed by a number is part of the path (C:\\...)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _load(args: argparse.Namespace) -> Any:
    from app.engine.session import Engine

    return Engine.load(args.model, args.device, max_seq_len=args.max_seq_len, backend=args.backend,
                       cache_mode=args.cache_mode, rope_scale=args.rope_scale, rope_alpha=args.rope_alpha,
                       **_speculative_options(args))


def _speculative_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in ("draft", "speculative", "draft_tokens")}


def _with_loras(engine: Any, args: argparse.Namespace, settings: Any) -> Any:
    """Load each --lora adapter and select it, at its scale, for every request."""
    for spec in args.lora:
        path, scale = parse_lora(spec)
        settings.loras[engine.load_lora(path).name] = scale
    return settings


def _stats(chunk: Any) -> str:
    spec = (f", {chunk.draft_accepted}/{chunk.draft_proposed} drafted tokens accepted"
            if chunk.draft_proposed else "")
    return (f"[{chunk.prompt_tokens} prompt tokens at {chunk.prefill_tokens_per_second:.1f} tok/s, "
            f"{chunk.generated_tokens} new at {chunk.tokens_per_second:.1f} tok/s{spec}, {chunk.finish_reason}]")


def cmd_generate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _load(args)
    _with_loras(engine, args, settings)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        stream = engine.stream_chat(messages + [{"role": "user", "content": args.prompt}], settings)
    else:
        stream = engine.stream_text(args.prompt, settings)
    last = None
    for chunk in stream:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if last is not None:
        print(_stats(last), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from app.engine.errors import ContextFullError

    settings = _settings(args)
    engine = _load(args)
    _with_loras(engine, args, settings)
    info = engine.info
    print(f"Kestrel chat: {info.name} ({info.architecture}, {info.backend} on {info.device}). "
          "Commands: /reset, /quit. Ctrl+C stops a reply.", file=sys.stderr)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply, last = [], None
        try:
            stream = engine.stream_chat(history, settings, overflow=args.overflow)
        except ContextFullError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        try:
            for chunk in stream:
                if last is None and chunk.dropped_messages:
                    print(f"\n(context full: left out the {len(chunk.dropped_messages)} oldest messages; "
                          "the system prompt is kept)", file=sys.stderr)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                reply.append(chunk.text)
                last = chunk
        except KeyboardInterrupt:
            engine.cancel()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
        if last is not None:
            print(_stats(last), file=sys.stderr)


def cmd_perplexity(args: argparse.Namespace) -> int:
    import numpy as np

    from app.engine.errors import KestrelError

    try:
        arr = np.load(args.ids, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise KestrelError(f"cannot be read as a .npy array ({e})", path=args.ids,
                           hint="Give a .npy file holding a 2-D integer array.") from e
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.shape[1] < 2:
        raise KestrelError(f"holds a {arr.dtype} array of shape {arr.shape}", path=args.ids,
                           hint="Give a 2-D integer array with at least 2 tokens per row.")
    engine = _load(args)
    vocab = engine.model.config.vocab_size
    if arr.min() < 0 or arr.max() >= vocab:
        raise KestrelError(f"has token ids outside 0..{vocab - 1}", path=args.ids,
                           hint="The ids belong to another tokenizer.")
    rows = arr.astype("int64").tolist()
    loras = {engine.load_lora(path).name: scale for path, scale in map(parse_lora, args.lora)}
    t0 = time.perf_counter()
    ppl = engine.generator.perplexity(rows, loras)
    print(f"rows: {len(rows)} x {arr.shape[1]} tokens, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"perplexity: {ppl:.4f}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from app.engine.doctor import report

    for key, value in report():
        print(f"{key:>18}: {value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.server.config import ServerConfig, check_bind

    check_bind(args.host, args.api_key)  # before loading anything: refuse unsafe binds at once
    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key, model_dir=args.model,
        models_root=args.models_dir or os.path.dirname(os.path.abspath(args.model)),
        device=args.device, max_seq_len=args.max_seq_len, backend=args.backend, cache_mode=args.cache_mode,
        rope_scale=args.rope_scale, rope_alpha=args.rope_alpha,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_tokens_limit=args.max_tokens_limit,
        loras=tuple(parse_lora(spec) for spec in args.lora),
        cache_tokens=args.cache_tokens,
        **_speculative_options(args))
    from app.server.app import run_server

    run_server(config)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from app.quantize_cli import run

    return run(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "perplexity": cmd_perplexity, "doctor": cmd_doctor,
            "serve": cmd_serve, "quantize": cmd_quantize}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("--self-test") or argv[0] in ("--gui",):
        from app.ui.app import run

        return run(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        build_parser().print_help()
        return EXIT_USER_ERROR
    from app.engine.errors import KestrelError

    try:
        return COMMANDS[args.command](args)
    except KestrelError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, never a traceback
        if os.environ.get("KESTREL_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (set KESTREL_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_INTERNAL

"""LoRA on the CLI (--lora DIR[:SCALE], --preset) and the server (request field, /v1/loras,
/v1/lora/load, /v1/lora/unload), with a real adapter folder on the real SmolLM2 fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.cli import _settings, build_parser, parse_lora
from app.engine.errors import GenerationError
from app.engine.session import Engine
from app.server.app import create_app
from app.server.config import ServerConfig
from tests.lora_fixtures import write_adapter
from tests.test_server import ServerThread

REPO = Path(__file__).resolve().parent.parent
BASE_REPLY = "The capital of France is Paris."


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, smollm2_fp16_dir) -> Path:
    root = tmp_path_factory.mktemp("lora-library")
    write_adapter(root / "tone", smollm2_fp16_dir, seed=7, strength=4.0)
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True,
                          env=env, timeout=600)


# --- CLI ----------------------------------------------------------------------------------------


def test_parse_lora_spec() -> None:
    assert parse_lora("/m/tone:0.5") == ("/m/tone", 0.5)
    assert parse_lora("/m/tone") == ("/m/tone", 1.0)
    assert parse_lora("C:\\m\\tone") == ("C:\\m\\tone", 1.0)
    assert parse_lora("C:\\m\\tone:-1") == ("C:\\m\\tone", -1.0)


def test_preset_and_sampler_flags() -> None:
    p = build_parser()
    for command in ("chat", "generate"):
        extra = ["--prompt", "x"] if command == "generate" else []
        args = p.parse_args([command, "--model", "m", *extra, "--preset", "Precise", "--sampler", "top_k=7",
                             "--lora", "a:0.5", "--lora", "b"])
        s = _settings(args)
        assert s.samplers["temperature"] == 0.2 and s.samplers["min_p"] == 0.05  # from the preset
        assert s.samplers["top_k"] == "7"  # --sampler overrides it
        assert args.lora == ["a:0.5", "b"]
    args = p.parse_args(["generate", "--model", "m", "--prompt", "x", "--preset", "precise", "--temperature", "1.1"])
    assert _settings(args).samplers["temperature"] == 1.1
    with pytest.raises(GenerationError, match="no sampler preset named 'Nope'.*Balanced"):
        _settings(p.parse_args(["chat", "--model", "m", "--preset", "Nope"]))
    assert p.parse_args(["serve", "--model", "m", "--lora", "x:2"]).lora == ["x:2"]


def test_generate_with_lora(smollm2_fp16_dir, lora_root) -> None:
    common = ["generate", "--model", smollm2_fp16_dir, "--prompt", "What is the capital of France?", "--chat",
              "--temperature", "0", "--device", "cpu", "--max-new-tokens", "8"]
    r = run_cli(*common, "--lora", f"{lora_root / 'tone'}:0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."[: len(r.stdout.strip())]
    r = run_cli(*common, "--lora", str(lora_root / "tone"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and not BASE_REPLY.startswith(r.stdout.strip())


def test_cli_bad_lora_is_one_line(smollm2_fp16_dir, tmp_path) -> None:
    r = run_cli("generate", "--model", smollm2_fp16_dir, "--prompt", "hi", "--device", "cpu",
                "--lora", str(tmp_path / "missing-adapter"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "missing-adapter" in r.stderr and "is not a folder" in r.stderr


# --- server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(smollm2_fp16_dir, lora_root) -> Iterator[ServerThread]:
    engine = Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=256)
    config = ServerConfig(models_root=str(Path(smollm2_fp16_dir).parent), loras_root=str(lora_root),
                          device="cpu", max_seq_len=256)
    with ServerThread(create_app(config, engine)) as s:
        yield s


def chat(http: httpx.Client, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 6,
            "temperature": 0, **extra}
    return http.post("/v1/chat/completions", json=body)


def test_server_lora_routes_and_request_field(server) -> None:
    with httpx.Client(base_url=server.url, timeout=300) as http:
        assert http.get("/v1/loras").json() == {"object": "list", "data": []}
        base = chat(http).json()["choices"][0]["message"]["content"]
        assert BASE_REPLY.startswith(base)

        r = http.post("/v1/lora/load", json={"loras": [{"name": "tone", "scaling": 1.0}]})
        assert r.status_code == 200, r.text
        assert r.json() == {"success": ["tone"], "failure": []}
        listed = http.get("/v1/loras").json()["data"]
        assert [(d["id"], d["scaling"], d["rank"]) for d in listed] == [("tone", 1.0, 4)]

        tuned = chat(http).json()["choices"][0]["message"]["content"]  # omitted: loaded adapters apply
        assert tuned != base
        assert chat(http, loras={"tone": 1.0}).json()["choices"][0]["message"]["content"] == tuned
        assert chat(http, loras={}).json()["choices"][0]["message"]["content"] == base
        r = http.post("/v1/completions", json={"prompt": "Paris is", "max_tokens": 3, "temperature": 0,
                                               "loras": {"tone": 0.0}})
        assert r.status_code == 200, r.text

        r = chat(http, loras={"nope": 1.0})
        assert r.status_code == 400 and r.json()["error"]["code"] == "lora_not_found"
        assert http.post("/v1/lora/load", json={"loras": [{"name": "../x"}]}).status_code == 403
        r = http.post("/v1/lora/load", json={"loras": [{"name": "absent"}]})
        assert r.status_code == 404 and "adapter_config.json" in r.json()["error"]["message"]
        r = http.post("/v1/lora/load", json={"loras": [{"name": "tone"}]})
        assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]

        assert http.post("/v1/lora/unload").json() == {"unloaded": ["tone"]}
        assert http.get("/v1/loras").json()["data"] == []
        assert chat(http).json()["choices"][0]["message"]["content"] == base


# --- library ------------------------------------------------------------------------------------


def test_library_lists_adapter_folders(tmp_path, smollm2_fp16_dir) -> None:
    from app.hub.adapters import scan_adapters

    write_adapter(tmp_path / "org" / "style", smollm2_fp16_dir, rank=8, alpha=16, rslora=True,
                  targets=("q_proj", "v_proj"), layers=range(1))
    write_adapter(tmp_path / ".hidden" / "x", smollm2_fp16_dir, layers=range(1))
    pickled = tmp_path / "old"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    (pickled / "adapter_model.bin").write_bytes(b"never opened")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    cards = {c.name: c for c in scan_adapters([str(tmp_path), str(tmp_path / "org")])}
    assert sorted(cards) == ["broken", "old", "style"]
    style = cards["style"]
    assert (style.rank, style.alpha, style.rslora, style.targets) == (8, 16.0, True, ("q_proj", "v_proj"))
    assert style.problem is None and style.base_model == smollm2_fp16_dir
    assert "safetensors" in cards["old"].problem
    assert "cannot be read" in cards["broken"].problem

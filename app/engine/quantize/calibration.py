"""Calibration data: token rows from the user's own files, or text the model writes itself.

No corpus ships with Kestrel. Users point at .txt / .jsonl / .parquet files; without any, the model
generates its calibration text from a fixed, seeded list of diverse prompts (data-free), so a
conversion is reproducible from (model, seed, rows, length) alone.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..tokenizer import Tokenizer
from .gptq import QuantizeError

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class CalibrationSettings:
    """rows x length tokens; files empty means data-free (self-generated)."""

    rows: int = 32
    length: int = 512
    files: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0
    text_field: str = "text"

    @property
    def dataset(self) -> str:
        return ", ".join(os.path.basename(f) for f in self.files) if self.files else "self-generated"

    def to_dict(self) -> dict:
        return {"rows": self.rows, "length": self.length, "dataset": self.dataset}


TOPICS = [
    "the history of the Roman Empire", "how vaccines train the immune system", "writing a Python web scraper",
    "the water cycle", "a recipe for sourdough bread", "the causes of the First World War",
    "black holes and general relativity", "how to negotiate a salary", "photosynthesis in plants",
    "the rules of chess", "a short story about a lighthouse keeper", "sorting algorithms in C",
    "the French Revolution", "climate change and ocean currents", "how a car engine works",
    "the life of Marie Curie", "SQL joins explained with examples", "the geography of Japan",
    "a poem about autumn rain", "how interest rates affect inflation", "the structure of DNA",
    "training a neural network", "the plot of Hamlet", "how to learn a foreign language",
    "the Apollo moon landings", "linear algebra for beginners", "a letter to a friend about moving abroad",
    "the economics of renewable energy", "ancient Egyptian mythology", "how the internet routes packets",
    "tips for running a marathon", "the causes of earthquakes", "writing unit tests in JavaScript",
    "the history of jazz", "probability puzzles", "medieval castle architecture",
]
TASKS = [
    "Write a detailed essay about {t}.", "Explain {t} to a curious teenager.",
    "Give a step-by-step guide to {t}.", "Write a long, well-structured article on {t}.",
    "Describe {t} with concrete examples.", "Answer as an expert: what should everyone know about {t}?",
]

# Openings of plain text (no chat template) the model continues in their own style: documentation,
# code, prose, tables, data. Chat answers alone are one register; quantized models meet all of these.
OPENINGS = [
    "Chapter 1\n\n", "# Installation\n\n", "def ", "import numpy as np\n", "class ", "#include <stdio.h>\n",
    "SELECT ", "<!DOCTYPE html>\n<html>\n", "Abstract\n\n", "1. Introduction\n\n", "The ", "In 1887, ",
    "Q: ", "| Name | Value |\n|---|---|\n", "{\n  \"", "Dear ", "Once upon a time, ", "Theorem 1. ",
    "Usage:\n  ", "Note: ", "Syntax\n******\n\n", ">>> ", "Step 1: ", "fn main() {\n", "$ ", "WASHINGTON — ",
    "Ingredients:\n- ", "The following example shows how to ", "Section 3.2 ", "---\ntitle: ", "/**\n * ",
    "According to the report, ",
]
PLAIN_SHARE = 0.5  # the share of self-generated rows that start from a plain-text opening, not a chat


def _read_texts(path: str, text_field: str) -> list[str]:
    if not os.path.isfile(path):
        raise QuantizeError("calibration file not found", path=path, hint="Check the path.")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".jsonl", ".json"):
            texts = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    obj = json.loads(line)
                    value = obj.get(text_field) if isinstance(obj, dict) else obj
                    if not isinstance(value, str):
                        raise QuantizeError(f"line {n} has no string field {text_field!r}", path=path,
                                            hint="Each line must be a JSON object with a text field.")
                    texts.append(value)
            return texts
        if ext == ".parquet":
            try:
                import pyarrow.parquet as pq  # optional: only needed for Parquet calibration files
            except ImportError as e:
                raise QuantizeError("reading Parquet needs the pyarrow package, which is not installed",
                                    path=path, hint="Run `pip install pyarrow`, or convert the file to JSONL.") from e
            table = pq.read_table(path, columns=[text_field])
            return [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]
        with open(path, encoding="utf-8") as f:  # anything else is plain UTF-8 text
            return [f.read()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantizeError(f"cannot be read ({e})", path=path,
                            hint="Calibration files must be UTF-8 text, JSONL or Parquet.") from e
    except OSError as e:
        raise QuantizeError(f"cannot be read ({e})", path=path, hint="Check the file's permissions.") from e


def rows_from_files(settings: CalibrationSettings, tokenizer: Tokenizer) -> list[list[int]]:
    """Tokenize the files' texts (EOS between documents) and cut rows x length tokens."""
    sep = sorted(tokenizer.eos_ids)[:1]
    stream: list[int] = []
    need = settings.rows * settings.length
    for path in settings.files:
        for text in _read_texts(path, settings.text_field):
            stream += tokenizer.encode(text, special=False) + sep
            if len(stream) >= need:
                break
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise QuantizeError(
            f"the calibration files hold {len(stream)} tokens, {settings.rows} rows x {settings.length} need {need}",
            path=settings.files[0], hint="Add more text, or lower the calibration rows or length.")
    return [stream[i * settings.length:(i + 1) * settings.length] for i in range(settings.rows)]


def self_generated_rows(model_folder: str, settings: CalibrationSettings, device: str = "auto",
                        progress: Progress | None = None) -> list[list[int]]:
    """Data-free calibration: the model answers seeded chat prompts or continues seeded plain-text
    openings (about half each); each row is such prompts and what the model wrote after them.

    All rows advance together one position per step (batch = rows), so no padding or masks are
    needed: a row whose prompt is not yet consumed is fed its next prompt token, otherwise the
    sampled one; after an end-of-sequence it starts a fresh prompt. `length` batched decode steps
    instead of rows x length single ones is what makes this fast on a GPU.
    """
    from ..session import Engine

    engine = Engine.load(model_folder, device, max_seq_len=settings.length)
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    eos = set(engine.tokenizer.eos_ids)
    n, length = settings.rows, settings.length
    model = engine.model

    def prompt() -> deque[int]:
        if rng.random() < PLAIN_SHARE:
            return deque(engine.tokenizer.encode(rng.choice(OPENINGS), add_bos=True, special=False))
        text = rng.choice(TASKS).format(t=rng.choice(TOPICS))
        return deque(engine.chat_prompt_ids([{"role": "user", "content": text}]))

    try:
        cache = model.allocate_cache(length, batch=n)
        queues = [prompt() for _ in range(n)]
        nxt = [q.popleft() for q in queues]
        rows: list[list[int]] = [[] for _ in range(n)]
        for pos in range(length):
            for r in range(n):
                rows[r].append(nxt[r])
            if pos == length - 1:
                break
            logits = model.forward(torch.tensor(nxt, device=model.device).view(n, 1), cache, pos)[:, -1]
            sampled = _sample(logits.float().cpu(), gen, temperature=0.8, top_p=0.95)
            for r in range(n):
                if queues[r]:
                    nxt[r] = queues[r].popleft()
                else:
                    nxt[r] = sampled[r]
                    if nxt[r] in eos:
                        queues[r] = prompt()
            if progress and (pos + 1) % 32 == 0:
                progress((pos + 1) / length, f"generating calibration text: {pos + 1}/{length} tokens x {n} rows")
    finally:
        engine.unload()
    return rows


def _sample(logits: torch.Tensor, gen: torch.Generator, temperature: float, top_p: float) -> list[int]:
    """Nucleus sampling of one token per row of logits (rows, vocab), seeded, among the top 256."""
    top, order = torch.topk(logits, min(256, logits.shape[-1]), dim=-1)  # sorted, descending
    sorted_p = torch.softmax(top / temperature, dim=-1)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the top token is always kept
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p, 1, generator=gen)
    return order.gather(1, pick).view(-1).tolist()


def calibration_rows(model_folder: str, settings: CalibrationSettings, device: str = "auto",
                     progress: Progress | None = None) -> torch.Tensor:
    """int64 (rows, length) token ids for calibrating `model_folder`."""
    if settings.rows < 1 or settings.length < 16:
        raise QuantizeError(f"calibration needs at least 1 row of 16 tokens, got {settings.rows} x {settings.length}",
                            hint="Raise the calibration rows/length.")
    if settings.files:
        rows = rows_from_files(settings, Tokenizer.from_folder(model_folder))
    else:
        rows = self_generated_rows(model_folder, settings, device, progress)
    return torch.tensor(rows, dtype=torch.int64)

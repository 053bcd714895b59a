"""LoRA adapters in the local library: folders holding adapter_config.json (PEFT), listed the way
app.hub.library lists models. Only the JSON config is read here (no torch); the engine checks the
weights against the loaded model when the adapter is loaded."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

SCAN_DEPTH = 3  # as deep as app.hub.library looks; not imported from it, which costs the GUI start-up 0.1 s

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterCard:
    name: str
    path: str
    rank: int | None = None
    alpha: float | None = None
    rslora: bool = False
    targets: tuple[str, ...] = ()
    base_model: str | None = None
    problem: str | None = None  # why it will not load (no safetensors weights, unreadable config)


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_card(path: str) -> AdapterCard:
    path = os.path.abspath(path)
    name = os.path.basename(os.path.normpath(path))
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return AdapterCard(name, path, problem=f"{ADAPTER_CONFIG} cannot be read ({e})")
    problem = None
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        problem = f"no {ADAPTER_WEIGHTS} (only safetensors adapters load)"
    targets = cfg.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
    try:
        rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", cfg.get("r", 8)))
    except (TypeError, ValueError):
        rank, alpha, problem = None, None, problem or "r / lora_alpha are not numbers"
    return AdapterCard(name, path, rank, alpha, bool(cfg.get("use_rslora")), targets,
                       cfg.get("base_model_name_or_path"), problem)


def find_adapter_folders(root: str, depth: int = SCAN_DEPTH) -> list[str]:
    """Adapter folders under `root` (itself included), skipping hidden folders."""
    if not os.path.isdir(root):
        return []
    if is_adapter_folder(root):
        return [os.path.abspath(root)]
    if depth <= 0:
        return []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return []
    found: list[str] = []
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
            found.extend(find_adapter_folders(entry.path, depth - 1))
    return found


def scan_adapters(folders: list[str]) -> list[AdapterCard]:
    """Every adapter in the library folders, each listed once, sorted by name."""
    cards: dict[str, AdapterCard] = {}
    for folder in folders:
        for path in find_adapter_folders(os.path.expanduser(folder)):
            cards.setdefault(os.path.realpath(path), read_adapter_card(path))
    return sorted(cards.values(), key=lambda c: (c.name.lower(), c.path))

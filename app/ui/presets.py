"""Sampler presets: built-in ones are data (resources/presets.json); user ones are JSON files in the
platform config folder (one file per preset, so a broken file only loses that preset).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.engine.errors import KestrelError

log = logging.getLogger(__name__)
# Not theme.RESOURCES: the CLI's --preset reads presets too, without importing Qt.
BUILTIN_FILE = Path(__file__).resolve().parents[2] / "resources" / "presets.json"


class PresetError(KestrelError):
    """A preset file cannot be read or written."""


@dataclass(frozen=True)
class Preset:
    name: str
    samplers: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    builtin: bool = False


def _parse(data: Any, source: str, builtin: bool) -> Preset:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"].strip():
        raise PresetError("is not a preset (needs a \"name\" and a \"samplers\" object)", path=source,
                          hint="Delete the file or fix it by hand.")
    samplers = data.get("samplers", {})
    if not isinstance(samplers, dict) or not all(isinstance(v, (int, float, list, dict)) for v in samplers.values()):
        raise PresetError("has a \"samplers\" entry that is not an object of numbers", path=source,
                          hint="Delete the file or fix it by hand.")
    return Preset(data["name"].strip(), dict(samplers), str(data.get("description", "")), builtin)


def builtin_presets() -> list[Preset]:
    data = json.loads(BUILTIN_FILE.read_text(encoding="utf-8"))
    return [_parse(p, str(BUILTIN_FILE), True) for p in data["presets"]]


def default_config_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("Kestrel", appauthor=False))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "preset"


class PresetStore:
    """User presets in `<config dir>/presets/*.json`."""

    def __init__(self, config_dir: Path) -> None:
        self.folder = Path(config_dir) / "presets"

    def user_presets(self) -> list[Preset]:
        found = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                found.append(_parse(json.loads(path.read_text(encoding="utf-8")), str(path), False))
            except (OSError, ValueError, PresetError) as e:
                log.warning("skipping preset %s: %s", path, e)
        return found

    def all(self) -> list[Preset]:
        return builtin_presets() + self.user_presets()

    def save(self, name: str, samplers: dict[str, Any]) -> Path:
        name = name.strip()
        if not name:
            raise PresetError("a preset needs a name", hint="Type a name for the preset.")
        if name.lower() in {p.name.lower() for p in builtin_presets()}:
            raise PresetError(f"{name!r} is a built-in preset", hint="Pick another name.")
        path = self.folder / f"{_slug(name)}.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"name": name, "samplers": samplers}, indent=2), encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            raise PresetError(f"cannot be written ({e.strerror})", path=str(path),
                              hint="Check that the config folder is writable.") from e
        return path

    def delete(self, name: str) -> bool:
        path = self.folder / f"{_slug(name)}.json"
        if path.exists():
            path.unlink()
            return True
        return False

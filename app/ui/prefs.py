"""Small UI preferences (theme, panel visibility) in `<config dir>/ui.json`. Never fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Prefs:
    def __init__(self, config_dir: Path) -> None:
        self.path = Path(config_dir) / "ui.json"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.data = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        except OSError as e:
            log.warning("cannot save UI preferences to %s: %s", self.path, e)

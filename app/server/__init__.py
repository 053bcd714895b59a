"""Local OpenAI-compatible HTTP server over one Engine (FastAPI + uvicorn).

Public API: `create_app(ServerConfig(...), engine=None)` and `ServerConfig`; `python main.py serve`
runs it. FastAPI/uvicorn load only when the server is used, so the GUI and CLI stay light.
"""

from __future__ import annotations

from .config import ServerConfig

__all__ = ["ServerConfig"]

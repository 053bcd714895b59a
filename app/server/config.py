"""Server settings and the server's own exception types (no FastAPI import: the CLI checks these
before starting anything heavy)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from app.engine.errors import KestrelError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TOKENS_LIMIT = 4096


class ServerConfigError(KestrelError):
    """The server was asked to start with unsafe or impossible settings."""


class ApiError(KestrelError):
    """A request the server refuses; carries the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    model_dir: str | None = None  # folder loaded at start-up (None: start with no model)
    models_root: str | None = None  # /v1/model/load only loads folders inside this one
    device: str = "auto"
    max_seq_len: int | None = None
    backend: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    loras: tuple[tuple[str, float], ...] = ()  # (adapter folder, default scale) loaded at start-up
    loras_root: str | None = None  # /v1/lora/load only loads folders inside this one (default: models_root)
    cache_tokens: int | None = None  # paged KV cache shared by concurrent requests (None: 4 contexts)
    draft: str | None = None  # speculative decoding for the start-up model (cli --draft / --speculative)
    speculative: str | None = None
    draft_tokens: int | None = None
    cache_mode: str = "fp16"  # KV cache precision for every load: fp16 | q8 | q6 | q4
    rope_scale: float | None = None
    rope_alpha: float | None = None

    def load_options(self) -> dict:
        """Engine.load keyword arguments shared by every load this server does."""
        return {"backend": self.backend, "cache_mode": self.cache_mode, "rope_scale": self.rope_scale,
                "rope_alpha": self.rope_alpha, "draft": self.draft, "speculative": self.speculative,
                "draft_tokens": self.draft_tokens}


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0-like spelling we cannot prove is local


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose the model beyond this machine without a key: anyone on the network could
    otherwise use the GPU, read tokens and load models."""
    if not is_loopback(host) and not (api_key and api_key.strip()):
        raise ServerConfigError(
            f"refusing to listen on {host} without an API key",
            hint="Pass --api-key KEY (clients send 'Authorization: Bearer KEY'), or bind 127.0.0.1.")
    if api_key is not None and len(api_key.strip()) < 8:
        raise ServerConfigError("the API key is shorter than 8 characters",
                                hint="Use a longer random key, e.g. from `python -c \"import secrets; "
                                     "print(secrets.token_urlsafe(24))\"`.")

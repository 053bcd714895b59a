"""The engine's own exception types.

Every message says which file, what is wrong and what to do, so the CLI can print it on one line
and the GUI can show it in a dialog without a traceback.
"""

from __future__ import annotations


class KestrelError(Exception):
    """Base class: anything a user can act on."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        self.path = path
        self.hint = hint
        parts = [f"{path}: {message}" if path else message]
        if hint:
            parts.append(hint)
        super().__init__(" ".join(parts))


class ModelFormatError(KestrelError):
    """A model folder or file is missing, truncated, inconsistent or of an unknown kind."""


class ConfigError(ModelFormatError):
    """config.json is missing fields, has wrong values or names an unsupported architecture."""


class UnsupportedArchitectureError(ConfigError):
    """The model's architecture is not one the engine implements."""


class TokenizerError(KestrelError):
    """Tokenizer files or chat template are missing or broken."""


class GenerationError(KestrelError):
    """A generation request is invalid (bad sampler value, prompt too long, ...)."""


class ContextFullError(GenerationError):
    """A chat does not fit the model's context under the chosen overflow policy (see overflow.py)."""


class OutOfMemoryError(KestrelError):
    """The device ran out of memory while loading or generating."""


class CancelledError(KestrelError):
    """A job was cancelled by the user."""

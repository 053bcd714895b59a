"""The store's exception types (KestrelError subclasses, so the GUI shows them without a traceback)."""

from __future__ import annotations

from app.engine.errors import KestrelError


class StoreError(KestrelError):
    """The chat database cannot be opened or used, or a request to it is malformed."""


class NotFoundError(StoreError):
    """A conversation or message id that does not exist (any more)."""


class ImportFormatError(StoreError):
    """A conversation JSON file that is not a Kestrel export or is damaged."""

"""The planner's exception type."""

from __future__ import annotations

from app.engine.errors import KestrelError


class PlannerError(KestrelError):
    """A planning request is invalid (bad context, unknown cache mode, no weight files, ...)."""

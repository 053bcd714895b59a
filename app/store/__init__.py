"""SQLite persistence for chats (no Qt, no torch). See store.py for the threading and crash-safety design."""

from .errors import ImportFormatError, NotFoundError, StoreError
from .export import parse_json, to_json, to_markdown
from .models import ROLES, Conversation, Endpoint, Message, SearchHit, Timings
from .schema import MIGRATIONS, SCHEMA_VERSION
from .store import DEFAULT_FLUSH_INTERVAL, Store, default_db_path

__all__ = [
    "DEFAULT_FLUSH_INTERVAL", "MIGRATIONS", "ROLES", "SCHEMA_VERSION", "Conversation", "Endpoint",
    "ImportFormatError",
    "Message", "NotFoundError", "SearchHit", "Store", "StoreError", "Timings", "default_db_path", "parse_json",
    "to_json", "to_markdown",
]

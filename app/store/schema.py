"""Schema and migrations. `PRAGMA user_version` holds how many MIGRATIONS have been applied.

To change the schema, append a migration (never edit an old one): each is a tuple of SQL statements
run in one transaction together with the version bump, so a crash mid-migration leaves the old
schema intact. Full-text search is not a migration: it depends on the SQLite build (FTS5), so it is
added idempotently by `ensure_fts` whenever the build supports it.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[tuple[str, ...]] = [
    (  # 1: conversations and messages
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            system_prompt TEXT NOT NULL DEFAULT '',
            model_path TEXT,
            sampler_settings TEXT NOT NULL DEFAULT '{}',
            extra TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX conversations_updated ON conversations(updated DESC)",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            parent_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            model TEXT,
            sampler_settings TEXT NOT NULL DEFAULT '{}',
            prompt_tokens INTEGER,
            generated_tokens INTEGER,
            prefill_s REAL,
            decode_s REAL,
            tokens_per_second REAL,
            finish_reason TEXT,
            streaming INTEGER NOT NULL DEFAULT 0,
            UNIQUE (conversation_id, position)
        )""",
        "CREATE INDEX messages_parent ON messages(parent_id)",
        "CREATE INDEX messages_streaming ON messages(streaming) WHERE streaming = 1",
    ),
    (  # 2: remote OpenAI-compatible endpoints; a chat records the endpoint it used (model_path then
       # holds the model's id on that endpoint). API keys live in the OS keyring, never here.
        """CREATE TABLE endpoints (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            base_url TEXT NOT NULL,
            created REAL NOT NULL
        )""",
        "ALTER TABLE conversations ADD COLUMN endpoint_id INTEGER REFERENCES endpoints(id) ON DELETE SET NULL",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)

FTS_STATEMENTS: tuple[str, ...] = (
    "CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id', "
    "tokenize='unicode61 remove_diacritics 2')",
    "CREATE VIRTUAL TABLE conversations_fts USING fts5(title, content='conversations', content_rowid='id', "
    "tokenize='unicode61 remove_diacritics 2')",
    """CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END""",
    """CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); END""",
    """CREATE TRIGGER messages_fts_au AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END""",
    """CREATE TRIGGER conversations_fts_ai AFTER INSERT ON conversations BEGIN
        INSERT INTO conversations_fts(rowid, title) VALUES (new.id, new.title); END""",
    """CREATE TRIGGER conversations_fts_ad AFTER DELETE ON conversations BEGIN
        INSERT INTO conversations_fts(conversations_fts, rowid, title) VALUES ('delete', old.id, old.title); END""",
    """CREATE TRIGGER conversations_fts_au AFTER UPDATE OF title ON conversations BEGIN
        INSERT INTO conversations_fts(conversations_fts, rowid, title) VALUES ('delete', old.id, old.title);
        INSERT INTO conversations_fts(rowid, title) VALUES (new.id, new.title); END""",
    # Index whatever was stored before search existed (or while running on a build without FTS5).
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
    "INSERT INTO conversations_fts(conversations_fts) VALUES ('rebuild')",
)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this database lacks; return the version it had before.

    The caller handles a version newer than ours (made by a newer Kestrel).
    """
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    for number in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the write lock: another process may have migrated meanwhile.
            (current,) = conn.execute("PRAGMA user_version").fetchone()
            if current >= number:
                conn.execute("COMMIT")
                continue
            for statement in MIGRATIONS[number - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return version


def fts5_available(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.kestrel_fts_probe USING fts5(x)")
        conn.execute("DROP TABLE temp.kestrel_fts_probe")
        return True
    except sqlite3.OperationalError:
        return False


def has_fts(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages_fts'").fetchone()
    return row is not None


def ensure_fts(conn: sqlite3.Connection) -> bool:
    """Create the full-text index if this SQLite has FTS5 and the database lacks it; True if usable."""
    if has_fts(conn):
        return fts5_available(conn)
    if not fts5_available(conn):
        return False
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not has_fts(conn):
            for statement in FTS_STATEMENTS:
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True

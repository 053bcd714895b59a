"""The chat database: conversations, messages and crash-safe streaming of replies.

Threading: one SQLite connection per thread (created on first use, closed by `close()` or when its
thread has ended). The database runs in WAL mode, so the GUI thread reads while a worker writes
without either waiting on the other; writers are serialised by SQLite itself (busy timeout). We chose
per-thread connections over one shared connection + lock because a lock would make every GUI read
wait behind a worker's write transaction.

Streaming: `append_reply` only appends to an in-memory buffer under a short lock (cheap per token).
A background flusher thread writes every open reply's text at most once per `flush_interval`
(one transaction for all of them), and `finish_reply` writes the final text, timings and reason.
With WAL and synchronous=NORMAL a committed transaction survives the process being killed, so a crash
loses at most the last `flush_interval` seconds of a reply. Readers in this process see the live
buffered text; other processes see what was last flushed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import NotFoundError, StoreError
from .export import parse_json, to_json, to_markdown
from .models import ROLES, Conversation, Endpoint, Message, SearchHit, Timings
from .schema import SCHEMA_VERSION, ensure_fts, migrate

log = logging.getLogger(__name__)

APP_NAME = "Kestrel"
DB_FILENAME = "kestrel.sqlite3"
DEFAULT_FLUSH_INTERVAL = 1.0
BUSY_TIMEOUT_S = 10.0
_UNSET: Any = object()
_MOVE_AWAY = "Close other Kestrel windows; if this persists, move the file away and Kestrel starts a new one."


def default_db_path() -> Path:
    """Where the app keeps its chats: the platform's per-user data folder."""
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / DB_FILENAME


@dataclass
class _Reply:
    """An open streamed reply: text so far, and how much of it is on disk."""

    conversation_id: int
    parts: list[str] = field(default_factory=list)
    version: int = 0           # bumps on every append
    flushed: int = 0           # version last written to SQLite
    deleted: bool = False      # its message was deleted mid-stream; appends are dropped

    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


def _dumps(value: dict[str, Any] | None, what: str) -> str:
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise StoreError(f"{what} must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} cannot be stored as JSON ({e})",
                         hint="Use only strings, numbers, booleans, lists and dicts.") from e


def _loads(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"], title=row["title"], created=row["created"], updated=row["updated"],
        system_prompt=row["system_prompt"], model_path=row["model_path"],
        sampler_settings=_loads(row["sampler_settings"]), extra=_loads(row["extra"]),
        endpoint_id=row["endpoint_id"])


def _endpoint(row: sqlite3.Row) -> Endpoint:
    return Endpoint(id=row["id"], name=row["name"], base_url=row["base_url"], created=row["created"])


def _message(row: sqlite3.Row) -> Message:
    return Message(
        id=row["id"], conversation_id=row["conversation_id"], position=row["position"],
        parent_id=row["parent_id"], role=row["role"], content=row["content"], created=row["created"],
        model=row["model"], sampler_settings=_loads(row["sampler_settings"]),
        timings=Timings(row["prompt_tokens"], row["generated_tokens"], row["prefill_s"], row["decode_s"],
                        row["tokens_per_second"]),
        finish_reason=row["finish_reason"], streaming=bool(row["streaming"]))


def _with_rate(t: Timings) -> Timings:
    """Fill tokens_per_second from generated tokens and decode time when the caller left it out."""
    if t.tokens_per_second is None and t.generated_tokens and t.decode_s:
        return replace(t, tokens_per_second=t.generated_tokens / t.decode_s)
    return t


def _terms(query: str) -> list[str]:
    return re.findall(r"\w+", query)


def _like(term: str) -> str:
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _excerpt(text: str, term: str, width: int = 60) -> str:
    at = text.lower().find(term.lower())
    if at < 0:
        return text[:width]
    start = max(0, at - width // 2)
    end = min(len(text), at + len(term) + width // 2)
    return ("…" if start else "") + text[start:end].replace("\n", " ") + ("…" if end < len(text) else "")


class Store:
    """All persistent chat data of the app. Safe to use from several threads (see module docstring)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL, fts: bool = True) -> None:
        if flush_interval <= 0:
            raise StoreError(f"flush_interval must be positive, not {flush_interval}")
        self.path = Path(path) if path is not None else default_db_path()
        self.flush_interval = flush_interval
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._lock = threading.Lock()          # guards _replies
        self._flush_lock = threading.Lock()    # serialises writes of streamed text (keeps them in order)
        self._replies: dict[int, _Reply] = {}
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder for the chat database ({e.strerror})",
                             path=str(self.path.parent), hint="Check permissions or free disk space.") from e
        try:
            conn = self._conn()
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(f"was written by a newer Kestrel (schema {version}, this one knows {SCHEMA_VERSION})",
                                 path=str(self.path), hint="Update Kestrel, or move the file away to start afresh.")
            conn.execute("PRAGMA journal_mode = WAL")
            migrate(conn)
            self.fts_enabled = ensure_fts(conn) if fts else False
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"cannot be opened as the chat database ({e})", path=str(self.path),
                             hint=_MOVE_AWAY) from e
        except BaseException:
            self.close()
            raise

    # --- connections ----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreError("the chat database is closed", path=str(self.path))
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)  # only this thread uses it; close() may run elsewhere
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")   # with WAL: durable against process crashes
        self._local.conn = conn
        with self._conns_lock:
            alive = []
            for thread, other in self._conns:
                if thread.is_alive():
                    alive.append((thread, other))
                else:
                    other.close()
            alive.append((threading.current_thread(), conn))
            self._conns = alive
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite errors become StoreError."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"cannot write ({e})", path=str(self.path), hint=_MOVE_AWAY) from e
        try:
            yield conn
        except sqlite3.Error as e:
            conn.execute("ROLLBACK")
            raise StoreError(f"write failed ({e})", path=str(self.path), hint=_MOVE_AWAY) from e
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Write out open replies, stop the flusher and close every connection. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join()
        try:
            if self._replies:
                self.flush()
        finally:
            self._closed = True
            with self._conns_lock:
                for _, conn in self._conns:
                    conn.close()
                self._conns = []

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- conversations --------------------------------------------------------------------------

    def create_conversation(self, title: str = "New chat", *, system_prompt: str = "",
                            model_path: str | None = None, sampler_settings: dict[str, Any] | None = None,
                            extra: dict[str, Any] | None = None, created: float | None = None,
                            updated: float | None = None, endpoint_id: int | None = None) -> int:
        now = time.time()
        created = now if created is None else created
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO conversations (title, created, updated, system_prompt, model_path, "
                "sampler_settings, extra, endpoint_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (title, created, created if updated is None else updated, system_prompt, model_path,
                 _dumps(sampler_settings, "sampler_settings"), _dumps(extra, "extra"), endpoint_id))
            return int(cur.lastrowid or 0)

    def get_conversation(self, conversation_id: int) -> Conversation:
        row = self._conn().execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"conversation {conversation_id} does not exist (deleted?)")
        return _conversation(row)

    def list_conversations(self, limit: int | None = None, offset: int = 0) -> list[Conversation]:
        """Most recently active first."""
        rows = self._conn().execute(
            "SELECT * FROM conversations ORDER BY updated DESC, id DESC LIMIT ? OFFSET ?",
            (-1 if limit is None else limit, offset)).fetchall()
        return [_conversation(r) for r in rows]

    def update_conversation(self, conversation_id: int, *, title: str = _UNSET, system_prompt: str = _UNSET,
                            model_path: str | None = _UNSET, sampler_settings: dict[str, Any] = _UNSET,
                            extra: dict[str, Any] = _UNSET, endpoint_id: int | None = _UNSET) -> Conversation:
        """Change the given fields only. Does not move the chat in the list (`updated` = last message)."""
        changes: dict[str, Any] = {}
        if endpoint_id is not _UNSET:
            changes["endpoint_id"] = endpoint_id
        if title is not _UNSET:
            changes["title"] = title
        if system_prompt is not _UNSET:
            changes["system_prompt"] = system_prompt
        if model_path is not _UNSET:
            changes["model_path"] = model_path
        if sampler_settings is not _UNSET:
            changes["sampler_settings"] = _dumps(sampler_settings, "sampler_settings")
        if extra is not _UNSET:
            changes["extra"] = _dumps(extra, "extra")
        if changes:
            with self._write() as conn:
                sets = ", ".join(f"{k} = ?" for k in changes)
                cur = conn.execute(f"UPDATE conversations SET {sets} WHERE id = ?", (*changes.values(), conversation_id))
                if cur.rowcount == 0:
                    raise NotFoundError(f"conversation {conversation_id} does not exist (deleted?)")
        return self.get_conversation(conversation_id)

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self.update_conversation(conversation_id, title=title)

    def delete_conversation(self, conversation_id: int) -> bool:
        """Delete a chat and all its messages; False if it did not exist."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        with self._lock:
            for reply in self._replies.values():
                if reply.conversation_id == conversation_id:
                    reply.deleted = True
        return cur.rowcount > 0

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Chats whose title, or one of whose messages, contains every word of `query` (word prefixes
        with FTS5, substrings without). Most recently active first."""
        terms = _terms(query)
        if not terms:
            return []
        conn = self._conn()
        best: dict[int, tuple[int | None, str]] = {}
        if self.fts_enabled:
            match = " ".join(f'"{t}"*' for t in terms)
            rows = conn.execute(
                "SELECT m.id, m.conversation_id, snippet(messages_fts, 0, '', '', '…', 12) AS snip "
                "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
                "WHERE messages_fts MATCH ? ORDER BY rank LIMIT 1000", (match,)).fetchall()
            for r in rows:
                best.setdefault(r["conversation_id"], (r["id"], r["snip"].replace("\n", " ")))
            titles = conn.execute("SELECT rowid FROM conversations_fts WHERE conversations_fts MATCH ?",
                                  (match,)).fetchall()
        else:
            where = " AND ".join("content LIKE ? ESCAPE '\\'" for _ in terms)
            rows = conn.execute(f"SELECT id, conversation_id, content FROM messages WHERE {where} "
                                "ORDER BY id DESC LIMIT 1000", [_like(t) for t in terms]).fetchall()
            for r in rows:
                best.setdefault(r["conversation_id"], (r["id"], _excerpt(r["content"], terms[0])))
            where = " AND ".join("title LIKE ? ESCAPE '\\'" for _ in terms)
            titles = conn.execute(f"SELECT id FROM conversations WHERE {where}", [_like(t) for t in terms]).fetchall()
        for (cid,) in titles:
            best.setdefault(cid, (None, ""))
        if not best:
            return []
        marks = ",".join("?" * len(best))
        convs = conn.execute(f"SELECT * FROM conversations WHERE id IN ({marks}) ORDER BY updated DESC, id DESC "
                             "LIMIT ?", (*best, limit)).fetchall()
        return [SearchHit(_conversation(r), *best[r["id"]]) for r in convs]

    # --- remote endpoints -----------------------------------------------------------------------

    def add_endpoint(self, name: str, base_url: str) -> int:
        """Remember a remote OpenAI-compatible server; its key goes to the keyring (app.remote.keys)."""
        name, base_url = name.strip(), base_url.strip()
        if not name or not base_url:
            raise StoreError("an endpoint needs a name and a base URL", hint="Fill in both fields.")
        try:
            with self._write() as conn:
                cur = conn.execute("INSERT INTO endpoints (name, base_url, created) VALUES (?, ?, ?)",
                                   (name, base_url, time.time()))
                return int(cur.lastrowid or 0)
        except StoreError as e:
            if "UNIQUE" in str(e):
                raise StoreError(f"there is already an endpoint named {name!r}",
                                 hint="Pick another name, or edit that endpoint.") from None
            raise

    def update_endpoint(self, endpoint_id: int, *, name: str = _UNSET, base_url: str = _UNSET) -> Endpoint:
        changes = {k: v.strip() for k, v in (("name", name), ("base_url", base_url)) if v is not _UNSET}
        if any(not v for v in changes.values()):
            raise StoreError("an endpoint needs a name and a base URL", hint="Fill in both fields.")
        if changes:
            try:
                with self._write() as conn:
                    sets = ", ".join(f"{k} = ?" for k in changes)
                    cur = conn.execute(f"UPDATE endpoints SET {sets} WHERE id = ?", (*changes.values(), endpoint_id))
                    if cur.rowcount == 0:
                        raise NotFoundError(f"endpoint {endpoint_id} does not exist (removed?)")
            except StoreError as e:
                if "UNIQUE" in str(e):
                    raise StoreError(f"there is already an endpoint named {changes.get('name')!r}",
                                     hint="Pick another name.") from None
                raise
        return self.get_endpoint(endpoint_id)

    def get_endpoint(self, endpoint_id: int) -> Endpoint:
        row = self._conn().execute("SELECT * FROM endpoints WHERE id = ?", (endpoint_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"endpoint {endpoint_id} does not exist (removed?)")
        return _endpoint(row)

    def list_endpoints(self) -> list[Endpoint]:
        return [_endpoint(r) for r in self._conn().execute("SELECT * FROM endpoints ORDER BY name COLLATE NOCASE")]

    def delete_endpoint(self, endpoint_id: int) -> bool:
        """Forget an endpoint; chats that used it keep their messages (their endpoint becomes None)."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM endpoints WHERE id = ?", (endpoint_id,))
        return cur.rowcount > 0

    # --- messages -------------------------------------------------------------------------------

    def _insert_message(self, conn: sqlite3.Connection, conversation_id: int, role: str, content: str, *,
                        created: float, model: str | None, sampler_settings: dict[str, Any] | None,
                        timings: Timings | None, finish_reason: str | None, streaming: bool) -> int:
        if role not in ROLES:
            raise StoreError(f"message role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise StoreError(f"message content must be text, not {type(content).__name__}")
        if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
            raise NotFoundError(f"conversation {conversation_id} does not exist (deleted?)")
        last = conn.execute("SELECT id, position FROM messages WHERE conversation_id = ? "
                            "ORDER BY position DESC LIMIT 1", (conversation_id,)).fetchone()
        parent, position = (last["id"], last["position"] + 1) if last else (None, 1)
        t = _with_rate(timings or Timings())
        cur = conn.execute(
            "INSERT INTO messages (conversation_id, position, parent_id, role, content, created, model, "
            "sampler_settings, prompt_tokens, generated_tokens, prefill_s, decode_s, tokens_per_second, "
            "finish_reason, streaming) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, position, parent, role, content, created, model,
             _dumps(sampler_settings, "sampler_settings"), t.prompt_tokens, t.generated_tokens, t.prefill_s,
             t.decode_s, t.tokens_per_second, finish_reason, int(streaming)))
        conn.execute("UPDATE conversations SET updated = MAX(updated, ?) WHERE id = ?", (created, conversation_id))
        return int(cur.lastrowid or 0)

    def add_message(self, conversation_id: int, role: str, content: str, *, model: str | None = None,
                    sampler_settings: dict[str, Any] | None = None, timings: Timings | None = None,
                    finish_reason: str | None = None) -> int:
        """Append a complete message at the end of the conversation; return its id."""
        with self._write() as conn:
            return self._insert_message(conn, conversation_id, role, content, created=time.time(), model=model,
                                        sampler_settings=sampler_settings, timings=timings,
                                        finish_reason=finish_reason, streaming=False)

    def _live(self, m: Message) -> Message:
        with self._lock:
            reply = self._replies.get(m.id)
            return replace(m, content=reply.text()) if reply is not None else m

    def get_message(self, message_id: int) -> Message:
        row = self._conn().execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"message {message_id} does not exist (deleted?)")
        return self._live(_message(row))

    def messages(self, conversation_id: int) -> list[Message]:
        """The conversation in order; replies being streamed in this process show their live text."""
        rows = self._conn().execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY position",
                                    (conversation_id,)).fetchall()
        return [self._live(_message(r)) for r in rows]

    def update_content(self, message_id: int, content: str) -> None:
        """Replace a message's text (e.g. the user edited their prompt). Not for a reply being streamed."""
        with self._lock:
            if message_id in self._replies:
                raise StoreError(f"message {message_id} is still being generated",
                                 hint="Stop the generation first.")
        with self._write() as conn:
            cur = conn.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
            if cur.rowcount == 0:
                raise NotFoundError(f"message {message_id} does not exist (deleted?)")
            conn.execute("UPDATE conversations SET updated = ? WHERE id = "
                         "(SELECT conversation_id FROM messages WHERE id = ?)", (time.time(), message_id))

    def truncate_after(self, message_id: int) -> int:
        """Delete every message after this one in its conversation; return how many.

        Edit-and-rerun is `update_content(user_msg, text)`, `truncate_after(user_msg)`, `begin_reply(...)`.
        """
        with self._write() as conn:
            row = conn.execute("SELECT conversation_id, position FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"message {message_id} does not exist (deleted?)")
            doomed = [r[0] for r in conn.execute("SELECT id FROM messages WHERE conversation_id = ? AND position > ?",
                                                 (row["conversation_id"], row["position"]))]
            conn.execute("DELETE FROM messages WHERE conversation_id = ? AND position > ?",
                         (row["conversation_id"], row["position"]))
        with self._lock:
            for mid in doomed:
                if mid in self._replies:
                    self._replies[mid].deleted = True
        return len(doomed)

    # --- streaming replies ----------------------------------------------------------------------

    def begin_reply(self, conversation_id: int, *, model: str | None = None,
                    sampler_settings: dict[str, Any] | None = None) -> int:
        """Create an empty assistant message to stream into; return its id."""
        with self._write() as conn:
            mid = self._insert_message(conn, conversation_id, "assistant", "", created=time.time(), model=model,
                                       sampler_settings=sampler_settings, timings=None, finish_reason=None,
                                       streaming=True)
        with self._lock:
            self._replies[mid] = _Reply(conversation_id)
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="kestrel-store-flush", daemon=True)
                self._flusher.start()
        return mid

    def append_reply(self, message_id: int, text_delta: str) -> None:
        """Add generated text. Memory only; the flusher writes it within `flush_interval` seconds."""
        with self._lock:
            reply = self._replies.get(message_id)
            if reply is None:
                raise StoreError(f"message {message_id} is not a reply being streamed",
                                 hint="Call begin_reply first; finish_reply ends it.")
            if not reply.deleted and text_delta:
                reply.parts.append(text_delta)
                reply.version += 1

    def finish_reply(self, message_id: int, timings: Timings | None = None,
                     finish_reason: str | None = "stop") -> bool:
        """Write the reply's final text, timings and reason; False if it was deleted meanwhile."""
        with self._flush_lock:
            with self._lock:
                reply = self._replies.pop(message_id, None)
                if reply is None:
                    raise StoreError(f"message {message_id} is not a reply being streamed",
                                     hint="Call begin_reply first; finish_reply ends it once.")
                text = reply.text()
            if reply.deleted:
                return False
            t = _with_rate(timings or Timings())
            with self._write() as conn:
                cur = conn.execute(
                    "UPDATE messages SET content = ?, streaming = 0, finish_reason = ?, prompt_tokens = ?, "
                    "generated_tokens = ?, prefill_s = ?, decode_s = ?, tokens_per_second = ? WHERE id = ?",
                    (text, finish_reason, t.prompt_tokens, t.generated_tokens, t.prefill_s, t.decode_s,
                     t.tokens_per_second, message_id))
                conn.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), reply.conversation_id))
            return cur.rowcount > 0

    def flush(self) -> int:
        """Write every open reply's new text now, in one transaction; return how many were written."""
        with self._flush_lock:
            with self._lock:
                due = [(mid, r.text(), r.version) for mid, r in self._replies.items()
                       if r.version > r.flushed and not r.deleted]
            if not due:
                return 0
            with self._write() as conn:
                conn.executemany("UPDATE messages SET content = ? WHERE id = ? AND streaming = 1",
                                 [(text, mid) for mid, text, _ in due])
            with self._lock:
                for mid, _, version in due:
                    if mid in self._replies:
                        self._replies[mid].flushed = version
            return len(due)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep flushing; the next round may succeed (e.g. disk freed)
                log.exception("could not save the reply being generated")

    def recover_interrupted(self) -> int:
        """Mark replies left half-written by a crashed run as finished with reason "interrupted".

        Call once at app start, before anything streams (another process could be streaming otherwise).
        """
        with self._lock:
            mine = list(self._replies)
        with self._write() as conn:
            mine_clause = f" AND id NOT IN ({','.join('?' * len(mine))})" if mine else ""
            cur = conn.execute("UPDATE messages SET streaming = 0, finish_reason = COALESCE(finish_reason, "
                               f"'interrupted') WHERE streaming = 1{mine_clause}", mine)
            return cur.rowcount

    # --- export / import ------------------------------------------------------------------------

    def export_markdown(self, conversation_id: int) -> str:
        return to_markdown(self.get_conversation(conversation_id), self.messages(conversation_id))

    def export_json(self, conversation_id: int) -> dict[str, Any]:
        """A dict for json.dump; `import_json` turns it back into a new conversation."""
        return to_json(self.get_conversation(conversation_id), self.messages(conversation_id))

    def import_json(self, data: dict[str, Any] | str, source: str = "conversation JSON") -> int:
        """Create a new conversation from an export (dict or JSON text); return its id."""
        conv, msgs = parse_json(data, source)
        now = time.time()
        with self._write() as conn:
            created = conv["created"] if conv["created"] is not None else now
            cur = conn.execute(
                "INSERT INTO conversations (title, created, updated, system_prompt, model_path, "
                "sampler_settings, extra) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conv["title"], created, created, conv["system_prompt"], conv["model_path"],
                 _dumps(conv["sampler_settings"], "sampler_settings"), _dumps(conv["extra"], "extra")))
            cid = int(cur.lastrowid or 0)
            for m in msgs:
                self._insert_message(conn, cid, m["role"], m["content"],
                                     created=m["created"] if m["created"] is not None else now,
                                     model=m["model"], sampler_settings=m["sampler_settings"],
                                     timings=m["timings"], finish_reason=m["finish_reason"], streaming=False)
            if conv["updated"] is not None:
                conn.execute("UPDATE conversations SET updated = ? WHERE id = ?", (conv["updated"], cid))
        return cid

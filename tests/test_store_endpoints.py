"""Remote endpoints in the chat database: migration 2 on an old database, CRUD, per-chat endpoint."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from app.store import MIGRATIONS, SCHEMA_VERSION, NotFoundError, Store, StoreError


def make_v1_database(path: Path) -> None:
    """A database exactly as the first release wrote it, with one chat in it."""
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO conversations (title, created, updated, model_path) VALUES ('old', 1, 1, '/m')")
    conn.execute("INSERT INTO messages (conversation_id, position, role, content, created) "
                 "VALUES (1, 1, 'user', 'hello', 1)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def test_old_database_migrates_and_keeps_its_chats(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    make_v1_database(db)
    with Store(db) as store:
        (conv,) = store.list_conversations()
        assert conv.title == "old" and conv.model_path == "/m" and conv.endpoint_id is None
        assert [m.content for m in store.messages(conv.id)] == ["hello"]
        eid = store.add_endpoint("lab", "http://127.0.0.1:1/v1")
        store.update_conversation(conv.id, endpoint_id=eid, model_path="remote-model")
        assert store.get_conversation(conv.id).endpoint_id == eid
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


def test_endpoint_crud_and_chats_survive_its_removal(tmp_path: Path) -> None:
    with Store(tmp_path / "c.sqlite3") as store:
        a = store.add_endpoint(" vLLM box ", "http://10.0.0.2:8000/v1 ")
        b = store.add_endpoint("another", "http://127.0.0.1:5000")
        assert [e.name for e in store.list_endpoints()] == ["another", "vLLM box"]
        assert store.get_endpoint(a).base_url == "http://10.0.0.2:8000/v1"
        with pytest.raises(StoreError, match="already an endpoint named 'another'"):
            store.add_endpoint("another", "http://x")
        with pytest.raises(StoreError, match="already an endpoint named"):
            store.update_endpoint(a, name="another")
        with pytest.raises(StoreError, match="name and a base URL"):
            store.add_endpoint("", "http://x")
        assert store.update_endpoint(a, base_url="http://10.0.0.3:8000").base_url == "http://10.0.0.3:8000"
        cid = store.create_conversation("remote chat", model_path="llama", endpoint_id=b)
        assert store.get_conversation(cid).endpoint_id == b
        assert store.delete_endpoint(b) and not store.delete_endpoint(b)
        conv = store.get_conversation(cid)
        assert conv.endpoint_id is None and conv.model_path == "llama"
        with pytest.raises(NotFoundError):
            store.get_endpoint(b)
        with pytest.raises(NotFoundError):
            store.update_endpoint(b, name="zzz")

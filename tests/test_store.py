"""app.store against a real SQLite file: schema, CRUD, search (FTS5 and LIKE), streaming, crash safety."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.engine.errors import KestrelError
from app.store import (
    SCHEMA_VERSION,
    ImportFormatError,
    NotFoundError,
    Store,
    StoreError,
    Timings,
    default_db_path,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chats.sqlite3"


@pytest.fixture
def store(db: Path):
    s = Store(db)
    yield s
    s.close()


def raw(db: Path) -> sqlite3.Connection:
    """An independent connection: what another process would see on disk."""
    return sqlite3.connect(db)


def disk_content(db: Path, message_id: int) -> str:
    with raw(db) as conn:
        return conn.execute("SELECT content FROM messages WHERE id = ?", (message_id,)).fetchone()[0]


# --- opening, schema --------------------------------------------------------------------------------


def test_fresh_database_is_versioned_wal_and_migrates_once(db: Path) -> None:
    Store(db).close()
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "messages"} <= tables
    conn.close()
    with Store(db) as again:  # reopening is a no-op migration and keeps data
        cid = again.create_conversation("kept")
    with Store(db) as third:
        assert third.get_conversation(cid).title == "kept"


def test_default_path_is_in_the_platform_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    path = default_db_path()
    assert path.is_relative_to(tmp_path / "xdg") and "Kestrel" in path.parts
    with Store() as s:
        assert s.path == path
        s.create_conversation("x")
    assert path.is_file()


def test_newer_schema_and_garbage_file_are_refused_with_our_error(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer Kestrel"):
        Store(newer)
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="garbage.sqlite3") as info:
        Store(garbage)
    assert isinstance(info.value, KestrelError) and "move the file away" in str(info.value)


def test_bad_arguments_raise_store_errors(store: Store) -> None:
    cid = store.create_conversation()
    with pytest.raises(StoreError, match="role"):
        store.add_message(cid, "robot", "beep")
    with pytest.raises(StoreError, match="JSON"):
        store.create_conversation(sampler_settings={"x": object()})
    with pytest.raises(NotFoundError):
        store.add_message(cid + 99, "user", "hi")
    with pytest.raises(NotFoundError):
        store.get_conversation(cid + 99)
    with pytest.raises(NotFoundError):
        store.truncate_after(12345)


# --- conversations ----------------------------------------------------------------------------------


def test_conversation_fields_list_order_rename_and_cascade_delete(store: Store, db: Path) -> None:
    a = store.create_conversation("first", system_prompt="Be brief.", model_path="/models/llama",
                                  sampler_settings={"temperature": 0.7, "top_k": 40}, extra={"cache": "q4"})
    time.sleep(0.01)
    b = store.create_conversation("second", model_path="http://127.0.0.1:8080/v1")
    got = store.get_conversation(a)
    assert (got.title, got.system_prompt, got.model_path) == ("first", "Be brief.", "/models/llama")
    assert got.sampler_settings == {"temperature": 0.7, "top_k": 40} and got.extra == {"cache": "q4"}
    assert [c.id for c in store.list_conversations()] == [b, a]
    time.sleep(0.01)
    store.add_message(a, "user", "hello")  # activity moves a chat to the top
    assert [c.id for c in store.list_conversations()] == [a, b]
    assert [c.id for c in store.list_conversations(limit=1, offset=1)] == [b]

    store.rename_conversation(b, "renamed")
    updated = store.update_conversation(b, system_prompt="New", sampler_settings={"top_p": 0.9})
    assert (updated.title, updated.system_prompt, updated.sampler_settings) == ("renamed", "New", {"top_p": 0.9})
    assert updated.model_path == "http://127.0.0.1:8080/v1"  # untouched fields stay

    store.add_message(a, "assistant", "hi")
    assert store.delete_conversation(a) is True
    assert store.delete_conversation(a) is False
    with raw(db) as conn:  # foreign keys are on: the messages went with the conversation
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    assert [c.id for c in store.list_conversations()] == [b]


# --- messages ---------------------------------------------------------------------------------------


def test_messages_order_parents_edit_and_rerun(store: Store) -> None:
    cid = store.create_conversation()
    u1 = store.add_message(cid, "user", "What is 2+2?")
    a1 = store.add_message(cid, "assistant", "4", model="smol", sampler_settings={"temperature": 0},
                           timings=Timings(prompt_tokens=12, generated_tokens=2, prefill_s=0.1, decode_s=0.5),
                           finish_reason="stop")
    u2 = store.add_message(cid, "user", "And 3+3?")
    a2 = store.add_message(cid, "assistant", "6")
    msgs = store.messages(cid)
    assert [m.id for m in msgs] == [u1, a1, u2, a2]
    assert [m.parent_id for m in msgs] == [None, u1, a1, u2]
    assert [m.position for m in msgs] == [1, 2, 3, 4]
    a1m = msgs[1]
    assert a1m.model == "smol" and a1m.sampler_settings == {"temperature": 0} and a1m.finish_reason == "stop"
    assert a1m.timings.tokens_per_second == pytest.approx(4.0)  # derived: 2 tokens / 0.5 s

    # Edit the first question and re-run from there.
    store.update_content(u1, "What is 5+5?")
    assert store.truncate_after(u1) == 3
    reply = store.begin_reply(cid, model="smol")
    store.append_reply(reply, "10")
    assert store.finish_reply(reply, Timings(generated_tokens=1, decode_s=0.1), "stop")
    msgs = store.messages(cid)
    assert [(m.role, m.content) for m in msgs] == [("user", "What is 5+5?"), ("assistant", "10")]
    assert msgs[1].parent_id == u1 and msgs[1].position == 2 and not msgs[1].streaming


# --- search -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fts", [True, False], ids=["fts5", "like"])
def test_search_titles_and_message_text(db: Path, fts: bool) -> None:
    with Store(db, fts=fts) as s:
        assert s.fts_enabled is fts
        pasta = s.create_conversation("Dinner ideas")
        s.add_message(pasta, "user", "How long should I boil spaghetti?")
        s.add_message(pasta, "assistant", "About 9 minutes for al dente spaghetti.")
        code = s.create_conversation("Python help")
        s.add_message(code, "user", "Why does my 100% cpu_usage loop hang?")
        other = s.create_conversation("Empty chat")

        hits = s.search("spaghetti")
        assert [h.conversation.id for h in hits] == [pasta]
        assert hits[0].message_id is not None and "spaghetti" in hits[0].snippet
        assert [h.conversation.id for h in s.search("python")] == [code]        # title match
        assert s.search("python")[0].message_id is None
        assert [h.conversation.id for h in s.search("boil spaghetti")] == [pasta]  # all words, same message
        assert s.search("boil python") == []
        assert [h.conversation.id for h in s.search("cpu_usage")] == [code]
        assert [h.conversation.id for h in s.search('100% "cpu')] == [code]  # punctuation is not syntax
        assert s.search('100% "quote') == []
        assert s.search("") == [] and s.search("%%%") == []
        assert [h.conversation.id for h in s.search("chat")] == [other]
        assert [h.conversation.id for h in s.search("empty")] == [other]
        # Edits and deletes are reflected.
        msg = s.messages(code)[0].id
        s.update_content(msg, "Why does my loop hang forever?")
        assert s.search("cpu") == []
        assert [h.conversation.id for h in s.search("forever")] == [code]
        s.delete_conversation(pasta)
        assert s.search("spaghetti") == []


def test_fts_index_is_built_for_rows_written_without_it(db: Path) -> None:
    with Store(db, fts=False) as s:
        cid = s.create_conversation("Old chat")
        s.add_message(cid, "user", "remember the walrus")
    with Store(db) as s:  # this build has FTS5: the index is created and filled from existing rows
        assert s.fts_enabled
        assert [h.conversation.id for h in s.search("walrus")] == [cid]


# --- streaming --------------------------------------------------------------------------------------


def test_append_is_buffered_and_flushed_about_once_per_interval(db: Path) -> None:
    with Store(db, flush_interval=1.5) as s:
        cid = s.create_conversation()
        mid = s.begin_reply(cid, model="smol", sampler_settings={"temperature": 0.5})
        started = time.monotonic()
        for i in range(500):
            s.append_reply(mid, f"w{i} ")
        expected = "".join(f"w{i} " for i in range(500))
        assert time.monotonic() - started < 1.0, "appending must be cheap"
        assert disk_content(db, mid) == ""          # nothing written per token
        assert s.get_message(mid).content == expected  # this process sees the live text
        deadline = time.monotonic() + 10
        while disk_content(db, mid) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert disk_content(db, mid) == expected
        assert time.monotonic() - started >= 1.0   # it was the timed flusher, not the appends
        s.append_reply(mid, "end")
        assert s.finish_reply(mid, Timings(prompt_tokens=5, generated_tokens=501, prefill_s=0.01, decode_s=2.0),
                              "length")
    with Store(db) as s:
        m = s.get_message(mid)
        assert m.content == expected + "end" and m.finish_reason == "length" and not m.streaming
        assert m.timings == Timings(5, 501, 0.01, 2.0, 250.5)
        assert m.model == "smol" and m.sampler_settings == {"temperature": 0.5}
        with pytest.raises(StoreError, match="not a reply"):
            s.append_reply(mid, "late")


def test_worker_streams_while_gui_thread_reads(store: Store, db: Path) -> None:
    cid = store.create_conversation()
    store.add_message(cid, "user", "count")
    mid = store.begin_reply(cid)
    errors: list[BaseException] = []
    n = 3000

    def worker() -> None:
        try:
            for i in range(n):
                store.append_reply(mid, f"{i},")
                if i % 500 == 0:
                    store.flush()
            store.finish_reply(mid, Timings(generated_tokens=n, decode_s=1.0))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    while t.is_alive():
        text = store.messages(cid)[-1].content
        assert "".join(f"{i}," for i in range(text.count(","))) == text  # always a clean prefix
        store.list_conversations()
    t.join()
    assert not errors
    assert disk_content(db, mid) == "".join(f"{i}," for i in range(n))
    assert not store.get_message(mid).streaming


def test_deleting_a_chat_mid_stream_is_not_an_error(store: Store) -> None:
    cid = store.create_conversation()
    user = store.add_message(cid, "user", "hi")
    mid = store.begin_reply(cid)
    store.append_reply(mid, "partial")
    with pytest.raises(StoreError, match="still being generated"):
        store.update_content(mid, "x")
    store.truncate_after(user)
    store.append_reply(mid, " more")  # the worker has not noticed yet: dropped, no error
    assert store.finish_reply(mid, None, "cancelled") is False
    assert [m.id for m in store.messages(cid)] == [user]


CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from app.store import Store
store = Store(sys.argv[2], flush_interval=1.0)
cid = store.create_conversation("crash test")
mid = store.begin_reply(cid)
print(mid, flush=True)
i = 0
while True:
    store.append_reply(mid, f"t{i} ")
    print(i, flush=True)
    i += 1
    time.sleep(0.005)
"""


def test_sigkill_loses_at_most_about_one_second(db: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(db)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert child.stdout is not None
    mid = int(child.stdout.readline())
    received: list[tuple[float, int]] = []  # (when we read it, token index): the append happened before

    def read() -> None:
        for line in child.stdout:  # type: ignore[union-attr]
            received.append((time.monotonic(), int(line)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while (not received or received[-1][0] - received[0][0] < 5.0) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_at = time.monotonic()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    reader.join(5)
    assert child.returncode == -signal.SIGKILL
    assert received and received[-1][0] - received[0][0] >= 5.0

    with Store(db) as s:  # a fresh process-level view of the file (WAL recovery included)
        m = s.get_message(mid)
        assert m.streaming  # it never finished
        text = m.content
        n_saved = text.count(" ")
        assert text == "".join(f"t{i} " for i in range(n_saved)), "on disk must be an exact prefix"
        must_have = max((i for when, i in received if when <= killed_at - 1.5), default=-1)
        assert must_have > 100, "the child streamed for long enough to test anything"
        assert n_saved >= must_have + 1, f"lost more than ~1 s: saved {n_saved}, appended {must_have + 1} by then"
        assert n_saved > 0
        assert s.recover_interrupted() == 1
        m = s.get_message(mid)
        assert not m.streaming and m.finish_reason == "interrupted" and m.content == text


# --- export / import --------------------------------------------------------------------------------


def test_export_markdown_and_json_round_trip(store: Store) -> None:
    cid = store.create_conversation("Trip plan", system_prompt="You are a travel agent.\nBe concise.",
                                    model_path="/models/smol", sampler_settings={"temperature": 0.3})
    store.add_message(cid, "user", "Where should I go in **May**?")
    store.add_message(cid, "assistant", "Lisbon.\n\n- mild\n- cheap", model="SmolLM2",
                      sampler_settings={"temperature": 0.3},
                      timings=Timings(prompt_tokens=20, generated_tokens=8, prefill_s=0.05, decode_s=0.4),
                      finish_reason="stop")
    md = store.export_markdown(cid)
    assert md.startswith("# Trip plan\n")
    assert "> You are a travel agent.\n> Be concise." in md
    assert "### User\n\nWhere should I go in **May**?" in md
    assert "### Assistant (SmolLM2)\n\nLisbon.\n\n- mild\n- cheap" in md
    assert "20 prompt tokens" in md and "20.0 tok/s" in md

    exported = store.export_json(cid)
    text = json.dumps(exported)
    new = store.import_json(text)
    assert new != cid
    assert store.export_json(new) == json.loads(text)  # identical apart from ids, which are not exported
    a, b = store.messages(cid), store.messages(new)
    assert [(m.role, m.content, m.timings, m.model, m.created) for m in a] == \
           [(m.role, m.content, m.timings, m.model, m.created) for m in b]
    assert b[1].parent_id == b[0].id


@pytest.mark.parametrize("bad, match", [
    ("{not json", "not valid JSON"),
    ({"format": "something else"}, "is not a kestrel.conversation export"),
    ({"format": "kestrel.conversation", "version": 99, "conversation": {}, "messages": []}, "version 99"),
    ({"format": "kestrel.conversation", "version": 1, "conversation": {}, "messages": [{"role": "x"}]},
     "message 1 has role 'x'"),
    ({"format": "kestrel.conversation", "version": 1, "conversation": {"title": 5}, "messages": []},
     "'title' has the wrong type"),
    ({"format": "kestrel.conversation", "version": 1, "conversation": {},
      "messages": [{"role": "user", "content": "x", "timings": {"decode_s": "fast"}}]}, "decode_s"),
])
def test_import_rejects_bad_files_with_a_clear_error(store: Store, bad: object, match: str) -> None:
    with pytest.raises(ImportFormatError, match=match):
        store.import_json(bad, source="chat.json")  # type: ignore[arg-type]
    assert store.list_conversations() == []  # nothing half-imported

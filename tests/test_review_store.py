"""The store: pragmas, one connection per thread, versioned idempotent migrations."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from histolab.errors import StudyError
from histolab.review.store import MIGRATIONS, Migration, Store, connect, migrate, schema_version


def _pragmas(db) -> tuple[str, int, int]:
    return (
        db.execute("PRAGMA journal_mode").fetchone()[0],
        db.execute("PRAGMA synchronous").fetchone()[0],
        db.execute("PRAGMA foreign_keys").fetchone()[0],
    )


def test_store_location_follows_the_environment(paths):
    store = Store()
    assert store.root == paths.annotations
    assert (paths.annotations / "review.db").is_file()


def test_every_connection_is_wal_with_full_sync(tmp_path):
    store = Store(tmp_path)
    seen = {}

    def worker():
        seen["thread"] = _pragmas(store.db)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    # synchronous=2 is FULL: a commit returns after the WAL is fsynced.
    assert _pragmas(store.db) == ("wal", 2, 1)
    assert seen["thread"] == ("wal", 2, 1)


def test_connections_are_per_thread_and_never_shared(tmp_path):
    store = Store(tmp_path)
    main_db = store.db
    assert store.db is main_db  # the same thread gets its own connection back
    out = {}

    def worker():
        out["own"] = store.db
        try:
            main_db.execute("SELECT 1").fetchone()
        except sqlite3.ProgrammingError as exc:
            out["error"] = exc

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert out["own"] is not main_db
    assert "error" in out, "a connection was usable from another thread"


def test_migrations_are_recorded_and_idempotent(tmp_path):
    Store(tmp_path)
    db = connect(tmp_path / "review.db")
    assert schema_version(db) == MIGRATIONS[-1].version
    assert [r[0] for r in db.execute("SELECT version FROM schema_migrations")] == [m.version for m in MIGRATIONS]
    assert migrate(db) == []  # nothing left to apply
    Store(tmp_path)  # reopening applies nothing either
    assert db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)


def test_a_new_migration_is_applied_once_on_an_old_database(tmp_path):
    Store(tmp_path)
    v2 = Migration(MIGRATIONS[-1].version + 1, "add a note column", ["ALTER TABLE studies ADD COLUMN note TEXT"])
    store = Store(tmp_path, migrations=(*MIGRATIONS, v2))
    cols = {c.name for c in store.db["studies"].columns}
    assert "note" in cols
    assert migrate(store.db, (*MIGRATIONS, v2)) == []  # a second run would fail on the ALTER if it re-ran


def test_a_failing_migration_leaves_no_trace(tmp_path):
    Store(tmp_path)
    bad = Migration(
        MIGRATIONS[-1].version + 1,
        "half a migration",
        ["CREATE TABLE half (x INTEGER)", "ALTER TABLE no_such_table ADD COLUMN y"],
    )
    with pytest.raises(sqlite3.OperationalError):
        Store(tmp_path, migrations=(*MIGRATIONS, bad))
    db = connect(tmp_path / "review.db")
    assert "half" not in db.table_names()
    assert schema_version(db) == MIGRATIONS[-1].version


def test_a_newer_database_is_refused(tmp_path):
    Store(tmp_path)
    v2 = Migration(MIGRATIONS[-1].version + 1, "future", ["CREATE TABLE future (x)"])
    Store(tmp_path, migrations=(*MIGRATIONS, v2))
    with pytest.raises(StudyError, match="newer"):
        Store(tmp_path)


def test_migration_versions_must_increase(tmp_path):
    db = connect(tmp_path / "x.db")
    with pytest.raises(StudyError, match="increasing"):
        migrate(db, (Migration(2, "b", []), Migration(1, "a", [])))


def test_the_database_refuses_out_of_range_values_itself(tmp_path):
    # A second line of defence under the API's validation.
    store = Store(tmp_path)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"), store.write():
        store.db.execute(
            "INSERT INTO ratings (submission_id, study_id, unit_id, rater_id, aspect, value) VALUES ('x','s',1,'r','a',11)"
        )

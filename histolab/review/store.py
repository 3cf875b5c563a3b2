"""The review store: one SQLite database (through sqlite-utils) under ``annotations/``.

Durability rules, all enforced here:

- WAL journal with ``synchronous=FULL``: a commit returns only after the WAL is
  fsynced, so an acknowledged rating survives a crash of the process *and* of
  the machine.
- One connection per thread (and per process: a connection is never used
  across ``fork``). ``sqlite3`` refuses cross-thread use and we keep it so.
- Writes run in ``BEGIN IMMEDIATE`` transactions: the write lock is taken
  up front, so two writers queue instead of deadlocking when a read
  transaction tries to upgrade. They queue on a thread lock and an ``flock``
  (released by the kernel if the holder dies, even by SIGKILL) rather than on
  SQLite's sleeping busy handler, which cuts the p99 latency under contention
  several-fold (bench/review_load.py --no-queue); the busy timeout stays as
  the fallback for writers that bypass the queue.
- The schema is a versioned list of migrations, applied in order, each in its
  own transaction and recorded in ``schema_migrations``; opening a store runs
  the missing ones and nothing else, so opening is idempotent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from histolab.errors import StudyError

DB_NAME = "review.db"
# A writer waits this long for the lock before giving up. Commits take
# milliseconds; 60 s covers a burst of hundreds of concurrent raters on a
# slow disk without ever failing a rating for contention alone.
BUSY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: Sequence[str] | Callable[[sqlite_utils.Database], None]


_V1 = (
    """CREATE TABLE studies (
        study_id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        owner TEXT NOT NULL,
        template TEXT NOT NULL,
        mode TEXT NOT NULL CHECK (mode IN ('item', 'set')),
        seed INTEGER NOT NULL,
        secret TEXT NOT NULL,
        image_size INTEGER NOT NULL,
        instructions TEXT NOT NULL,
        turing_test INTEGER NOT NULL,
        ranking INTEGER NOT NULL,
        show_prompt INTEGER NOT NULL,
        set_size INTEGER,
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
        config_json TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE aspects (
        study_id TEXT NOT NULL REFERENCES studies(study_id),
        key TEXT NOT NULL,
        position INTEGER NOT NULL,
        label TEXT NOT NULL,
        type TEXT NOT NULL,
        scope TEXT NOT NULL,
        minimum REAL NOT NULL,
        maximum REAL NOT NULL,
        description TEXT NOT NULL,
        anchors_json TEXT NOT NULL,
        PRIMARY KEY (study_id, key)
    )""",
    """CREATE TABLE artefacts (
        study_id TEXT NOT NULL REFERENCES studies(study_id),
        key TEXT NOT NULL,
        position INTEGER NOT NULL,
        label TEXT NOT NULL,
        description TEXT NOT NULL,
        PRIMARY KEY (study_id, key)
    )""",
    """CREATE TABLE raters (
        study_id TEXT NOT NULL REFERENCES studies(study_id),
        rater_id TEXT NOT NULL,
        name TEXT NOT NULL,
        code_sha256 TEXT NOT NULL,
        added_at TEXT NOT NULL,
        PRIMARY KEY (study_id, rater_id)
    )""",
    """CREATE TABLE sources (
        study_id TEXT NOT NULL REFERENCES studies(study_id),
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('real', 'generated')),
        role TEXT NOT NULL CHECK (role IN ('rated', 'reference')),
        label TEXT,
        path TEXT NOT NULL,
        description TEXT NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (study_id, name)
    )""",
    """CREATE TABLE items (
        item_id INTEGER PRIMARY KEY,
        study_id TEXT NOT NULL REFERENCES studies(study_id),
        source TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        pixel_sha256 TEXT NOT NULL,
        class TEXT,
        prompt_shown TEXT,
        recipe_json TEXT,
        original_path TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        image_file TEXT NOT NULL,
        original_file TEXT NOT NULL,
        UNIQUE (study_id, pixel_sha256),
        FOREIGN KEY (study_id, source) REFERENCES sources(study_id, name)
    )""",
    "CREATE INDEX items_sha ON items(study_id, sha256)",
    """CREATE TABLE units (
        unit_id INTEGER PRIMARY KEY,
        study_id TEXT NOT NULL REFERENCES studies(study_id),
        kind TEXT NOT NULL CHECK (kind IN ('item', 'set', 'ranking')),
        source TEXT,
        class TEXT,
        code TEXT NOT NULL,
        UNIQUE (study_id, code)
    )""",
    """CREATE TABLE unit_items (
        unit_id INTEGER NOT NULL REFERENCES units(unit_id),
        item_id INTEGER NOT NULL REFERENCES items(item_id),
        position INTEGER NOT NULL,
        PRIMARY KEY (unit_id, position)
    )""",
    """CREATE TABLE assignments (
        study_id TEXT NOT NULL,
        rater_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        unit_id INTEGER NOT NULL REFERENCES units(unit_id),
        task_id TEXT NOT NULL UNIQUE,
        first_served_at TEXT,
        done_at TEXT,
        PRIMARY KEY (study_id, rater_id, position),
        UNIQUE (study_id, rater_id, unit_id),
        FOREIGN KEY (study_id, rater_id) REFERENCES raters(study_id, rater_id)
    )""",
    "CREATE INDEX assignments_todo ON assignments(study_id, rater_id, done_at, position)",
    """CREATE TABLE submissions (
        submission_id TEXT PRIMARY KEY,
        study_id TEXT NOT NULL,
        rater_id TEXT NOT NULL,
        unit_id INTEGER NOT NULL REFERENCES units(unit_id),
        task_id TEXT NOT NULL,
        payload_sha256 TEXT NOT NULL,
        revision INTEGER NOT NULL,
        time_ms INTEGER,
        received_at TEXT NOT NULL
    )""",
    # Answers are append-only: a revision marks the earlier rows current = 0
    # (with superseded_at) and adds new ones, so the history stays.
    """CREATE TABLE ratings (
        rating_id INTEGER PRIMARY KEY,
        submission_id TEXT NOT NULL REFERENCES submissions(submission_id),
        study_id TEXT NOT NULL,
        unit_id INTEGER NOT NULL,
        rater_id TEXT NOT NULL,
        aspect TEXT NOT NULL,
        value REAL NOT NULL CHECK (value >= 0 AND value <= 10),
        current INTEGER NOT NULL DEFAULT 1,
        superseded_at TEXT
    )""",
    "CREATE UNIQUE INDEX ratings_current ON ratings(study_id, unit_id, rater_id, aspect) WHERE current = 1",
    """CREATE TABLE artefact_marks (
        mark_id INTEGER PRIMARY KEY,
        submission_id TEXT NOT NULL REFERENCES submissions(submission_id),
        study_id TEXT NOT NULL,
        unit_id INTEGER NOT NULL,
        rater_id TEXT NOT NULL,
        artefact TEXT NOT NULL,
        present INTEGER NOT NULL CHECK (present IN (0, 1)),
        current INTEGER NOT NULL DEFAULT 1,
        superseded_at TEXT
    )""",
    "CREATE UNIQUE INDEX marks_current ON artefact_marks(study_id, unit_id, rater_id, artefact) WHERE current = 1",
    """CREATE TABLE judgements (
        judgement_id INTEGER PRIMARY KEY,
        submission_id TEXT NOT NULL REFERENCES submissions(submission_id),
        study_id TEXT NOT NULL,
        unit_id INTEGER NOT NULL,
        rater_id TEXT NOT NULL,
        says_synthetic INTEGER NOT NULL CHECK (says_synthetic IN (0, 1)),
        confidence INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 5),
        current INTEGER NOT NULL DEFAULT 1,
        superseded_at TEXT
    )""",
    "CREATE UNIQUE INDEX judgements_current ON judgements(study_id, unit_id, rater_id) WHERE current = 1",
    """CREATE TABLE comments (
        comment_id INTEGER PRIMARY KEY,
        submission_id TEXT NOT NULL REFERENCES submissions(submission_id),
        study_id TEXT NOT NULL,
        unit_id INTEGER NOT NULL,
        rater_id TEXT NOT NULL,
        text TEXT NOT NULL,
        current INTEGER NOT NULL DEFAULT 1,
        superseded_at TEXT
    )""",
    """CREATE TABLE rankings (
        ranking_id INTEGER PRIMARY KEY,
        submission_id TEXT NOT NULL REFERENCES submissions(submission_id),
        study_id TEXT NOT NULL,
        unit_id INTEGER NOT NULL,
        rater_id TEXT NOT NULL,
        source TEXT NOT NULL,
        rank INTEGER NOT NULL CHECK (rank >= 1),
        current INTEGER NOT NULL DEFAULT 1,
        superseded_at TEXT
    )""",
    "CREATE UNIQUE INDEX rankings_current ON rankings(study_id, unit_id, rater_id, source) WHERE current = 1",
)

# Which answers a task needs is part of a study's protocol (issue 13): stored per aspect and for the
# judgement, so the store can refuse a submit that leaves one unset. Studies made before keep "all required".
_V2 = (
    "ALTER TABLE aspects ADD COLUMN required INTEGER NOT NULL DEFAULT 1 CHECK (required IN (0, 1))",
    "ALTER TABLE studies ADD COLUMN judgement_required INTEGER NOT NULL DEFAULT 1 CHECK (judgement_required IN (0, 1))",
)

# The Prompt-to-Polyp protocol (histolab.review.prompt_rank): per prompt, one image of every rated source
# (the real one among them) ranked 1..N. Each rank is used once per (group, rater): the second unique index
# refuses a duplicate rank even from a writer that skipped the library's own check.
_V3 = (
    """CREATE TABLE prompt_rank_groups (
        group_id INTEGER PRIMARY KEY,
        study_id TEXT NOT NULL REFERENCES studies(study_id),
        class TEXT,
        prompt_shown TEXT,
        code TEXT NOT NULL,
        UNIQUE (study_id, code)
    )""",
    """CREATE TABLE prompt_rank_members (
        group_id INTEGER NOT NULL REFERENCES prompt_rank_groups(group_id),
        item_id INTEGER NOT NULL REFERENCES items(item_id),
        source TEXT NOT NULL,
        PRIMARY KEY (group_id, item_id),
        UNIQUE (group_id, source)
    )""",
    """CREATE TABLE prompt_rank_assignments (
        study_id TEXT NOT NULL,
        rater_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        group_id INTEGER NOT NULL REFERENCES prompt_rank_groups(group_id),
        task_id TEXT NOT NULL UNIQUE,
        first_served_at TEXT,
        done_at TEXT,
        PRIMARY KEY (study_id, rater_id, position),
        UNIQUE (study_id, rater_id, group_id),
        FOREIGN KEY (study_id, rater_id) REFERENCES raters(study_id, rater_id)
    )""",
    """CREATE TABLE prompt_rank_submissions (
        submission_id TEXT PRIMARY KEY,
        study_id TEXT NOT NULL,
        rater_id TEXT NOT NULL,
        group_id INTEGER NOT NULL REFERENCES prompt_rank_groups(group_id),
        task_id TEXT NOT NULL,
        payload_sha256 TEXT NOT NULL,
        revision INTEGER NOT NULL,
        time_ms INTEGER,
        received_at TEXT NOT NULL
    )""",
    """CREATE TABLE prompt_ranks (
        prompt_rank_id INTEGER PRIMARY KEY,
        submission_id TEXT NOT NULL REFERENCES prompt_rank_submissions(submission_id),
        study_id TEXT NOT NULL,
        group_id INTEGER NOT NULL,
        rater_id TEXT NOT NULL,
        item_id INTEGER NOT NULL REFERENCES items(item_id),
        rank INTEGER NOT NULL CHECK (rank >= 1),
        current INTEGER NOT NULL DEFAULT 1,
        superseded_at TEXT
    )""",
    "CREATE UNIQUE INDEX prompt_ranks_item ON prompt_ranks(study_id, group_id, rater_id, item_id) WHERE current = 1",
    "CREATE UNIQUE INDEX prompt_ranks_rank ON prompt_ranks(study_id, group_id, rater_id, rank) WHERE current = 1",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "studies, sources, items, assignments and answers", _V1),
    Migration(2, "required answers", _V2),
    Migration(3, "per-prompt ranks with the real image (Prompt-to-Polyp protocol)", _V3),
)


def now() -> str:
    """UTC time with microseconds, ISO 8601 (sorts as text)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def connect(path: str | Path) -> sqlite_utils.Database:
    """A new connection with the store's pragmas. Use ``Store.db`` rather than this."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
    db = sqlite_utils.Database(conn)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StudyError(f"the review database {path} cannot use WAL (journal_mode is {mode!r}); use a local disk")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return db


@contextlib.contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A write transaction that holds the write lock from its start.

    Nested uses become savepoints (as sqlite-utils' own ``atomic`` does), so
    sqlite-utils helpers called inside commit nothing early.
    """
    conn = db.conn
    if conn.in_transaction:
        with db.atomic():
            yield db
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    else:
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def schema_version(db: sqlite_utils.Database) -> int:
    if "schema_migrations" not in db.table_names():
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def migrate(db: sqlite_utils.Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the migrations the database lacks, in order; return the versions applied."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)) or (versions and versions[0] < 1):
        raise StudyError(f"migration versions must be increasing from 1, got {versions}")
    with immediate(db):
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
    applied = []
    for m in migrations:
        # Each migration re-reads the version under the write lock: two
        # processes opening a fresh store at once apply each step exactly once.
        with immediate(db):
            current = schema_version(db)
            if m.version <= current:
                continue
            if callable(m.statements):
                m.statements(db)
            else:
                for sql in m.statements:
                    db.execute(sql)
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)", [m.version, m.name, now()]
            )
            applied.append(m.version)
    newest = versions[-1] if versions else 0
    if schema_version(db) > newest:
        raise StudyError(
            f"the review database is at schema version {schema_version(db)}, newer than this histolab "
            f"knows ({newest}); upgrade histolab"
        )
    return applied


class Store:
    """The review database and image folders under one ``annotations`` directory.

    ``Store.db`` gives this thread's own connection (opened on first use);
    ``Store.write()`` is a write transaction on it.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        migrations: Sequence[Migration] = MIGRATIONS,
        queue_writers: bool = True,
    ):
        if root is None:
            from histolab.config import Paths

            root = Paths.from_env().annotations
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite_utils.Database] = []
        self._migrations = tuple(migrations)
        # Writers queue on a thread lock and an flock (woken the moment the
        # lock is free) instead of SQLite's busy handler, which polls with
        # sleeps of up to 100 ms and so stretches the latency tail under
        # contention (bench/review_load.py --no-queue measures the difference).
        self.queue_writers = queue_writers
        self._writer: tuple[int, threading.Lock, Any] | None = None
        migrate(self.db, self._migrations)

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != os.getpid():
            # A connection inherited through fork is never reused: SQLite
            # forbids carrying an open connection into a child process.
            db = connect(self.path)
            self._local.db, self._local.pid = db, os.getpid()
            with self._lock:
                self._connections.append(db)
        return db

    def _writer_locks(self) -> tuple[threading.Lock, Any]:
        with self._lock:
            if self._writer is None or self._writer[0] != os.getpid():
                # Fresh per process: a lock held by another thread at fork time would never be released.
                fh = open(self.root / f"{DB_NAME}.writer-lock", "a+b")  # noqa: SIM115 (lives as long as the store)
                self._writer = (os.getpid(), threading.Lock(), fh)
            return self._writer[1], self._writer[2]

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction on this thread's connection, committed (and fsynced) on exit."""
        db = self.db
        if db.conn.in_transaction or not self.queue_writers:
            with immediate(db):
                yield db
            return
        lock, fh = self._writer_locks()
        with lock:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                with immediate(db):
                    yield db
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def study_dir(self, study_id: str) -> Path:
        return self.root / "studies" / study_id

    @contextlib.contextmanager
    def creation_lock(self, study_id: str) -> Iterator[None]:
        """An exclusive lock on creating one study (across threads and processes).

        Creating writes image folders before the rows; the lock keeps two
        creators of the same id from removing each other's folder.
        """
        folder = self.root / "studies"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".{study_id}.lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close every connection this store opened in this process (call from the owning thread)."""
        with self._lock:
            conns, self._connections = self._connections, []
        for db in conns:
            with contextlib.suppress(sqlite3.ProgrammingError):
                db.close()
        if self._writer is not None and self._writer[0] == os.getpid():
            self._writer[2].close()
        self._writer = None
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The ledger: what happened to every received instance, in SQLite (WAL, synchronous=FULL).

Keyed by SOP Instance UID (or ``file:<sha1>`` for a watched file too broken to
carry one), so receiving the same instance twice is a no-op. States::

    received ──> processed   (its series' results are committed)
             └─> rejected    (with the reason; never analysed)

A key reaches exactly one final state, once. A series' results are committed
in the same transaction that marks its instances processed
(:meth:`Ledger.commit_series`), so after a kill -9 either both happened or
neither did, and replaying the spool cannot produce a second set of results.
``exported`` records that the committed results were also written out; a
start-up re-exports the ones that were not (see :mod:`edge.ingest.results`).
Every commit is fsynced before the call returns (synchronous=FULL).
"""

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

RECEIVED = "received"
PROCESSED = "processed"
REJECTED = "rejected"
STATES = (RECEIVED, PROCESSED, REJECTED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('received', 'processed', 'rejected')),
    reason TEXT,
    study_uid TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    spool_path TEXT,
    result_id TEXT,
    received_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS instances_state ON instances (state);
CREATE TABLE IF NOT EXISTS results (
    result_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    part INTEGER NOT NULL,
    payload TEXT NOT NULL,
    exported INTEGER NOT NULL DEFAULT 0,
    committed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_series ON results (series_uid);
"""


class LedgerError(RuntimeError):
    """A transition the ledger forbids (a bug: e.g. committing an instance twice)."""


@dataclass(frozen=True)
class LedgerEntry:
    key: str
    state: str
    reason: Optional[str]
    study_uid: str
    series_uid: str
    source: str
    spool_path: Optional[str]
    result_id: Optional[str]
    received_at: float
    finished_at: Optional[float]


_COLUMNS = "key, state, reason, study_uid, series_uid, source, spool_path, result_id, received_at, finished_at"


class Ledger:
    """Thread-safe; one SQLite connection behind a lock. ``path`` may be ``":memory:"``."""

    def __init__(self, path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- instances

    def receive(self, key: str, *, study_uid: str = "", series_uid: str = "", source: str = "",
                spool_path: Optional[str] = None) -> Optional[LedgerEntry]:
        """Record a newly received instance. Returns None when it is new, else the existing
        entry (a duplicate, whatever its state), which is left unchanged."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO instances (key, state, study_uid, series_uid, source, spool_path, received_at)"
                " VALUES (?, 'received', ?, ?, ?, ?, ?)",
                (key, study_uid, series_uid, source, None if spool_path is None else str(spool_path), time.time()),
            )
            if cur.rowcount == 1:
                return None
            return self._get(key)

    def reject(self, key: str, reason: str, *, study_uid: str = "", series_uid: str = "", source: str = "") -> bool:
        """Final state ``rejected`` for a received or a never-seen key. False when the key
        already has a final state (left unchanged: a duplicate of a finished instance)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT state FROM instances WHERE key = ?", (key,)).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO instances (key, state, reason, study_uid, series_uid, source, received_at, finished_at)"
                        " VALUES (?, 'rejected', ?, ?, ?, ?, ?, ?)",
                        (key, reason, study_uid, series_uid, source, now, now),
                    )
                    changed = True
                elif row[0] == RECEIVED:
                    self._db.execute(
                        "UPDATE instances SET state = 'rejected', reason = ?, finished_at = ? WHERE key = ?",
                        (reason, now, key),
                    )
                    changed = True
                else:
                    changed = False
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return changed

    def get(self, key: str) -> Optional[LedgerEntry]:
        with self._lock:
            return self._get(key)

    def _get(self, key: str) -> Optional[LedgerEntry]:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM instances WHERE key = ?", (key,)).fetchone()
        return LedgerEntry(*row) if row else None

    def entries(self, state: Optional[str] = None) -> List[LedgerEntry]:
        """All entries (of one state), in receipt order."""
        query = f"SELECT {_COLUMNS} FROM instances"
        args: Tuple = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY received_at, rowid", args).fetchall()
        return [LedgerEntry(*r) for r in rows]

    def pending(self) -> List[LedgerEntry]:
        """Instances received and not yet processed or rejected."""
        return self.entries(RECEIVED)

    def counts(self) -> Dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall()
        out = {s: 0 for s in STATES}
        out.update(dict(rows))
        return out

    # --- results

    def commit_series(self, study_uid: str, series_uid: str, payload: dict, processed: Iterable[str],
                      rejected: Sequence[Tuple[str, str]] = ()) -> dict:
        """Atomically: store one series result, mark ``processed`` keys processed and ``rejected``
        (key, reason) pairs rejected. Returns the stored payload: ``payload`` with ``result_id``
        (``<series_uid>.p<part>``) and ``part`` (results of the series so far, from 1) set.
        LedgerError when a key is unknown or already final: a result is committed once."""
        processed = list(processed)
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (count,) = self._db.execute("SELECT COUNT(*) FROM results WHERE series_uid = ?", (series_uid,)).fetchone()
                part = count + 1
                result_id = f"{series_uid}.p{part}"
                payload = dict(payload, result_id=result_id, part=part)
                for key in processed:
                    self._finish(key, PROCESSED, None, result_id, now)
                for key, reason in rejected:
                    self._finish(key, REJECTED, reason, result_id, now)
                self._db.execute(
                    "INSERT INTO results (result_id, study_uid, series_uid, part, payload, committed_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (result_id, study_uid, series_uid, part, json.dumps(payload, sort_keys=True), now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return payload

    def _finish(self, key: str, state: str, reason: Optional[str], result_id: str, now: float) -> None:
        cur = self._db.execute(
            "UPDATE instances SET state = ?, reason = ?, result_id = ?, finished_at = ? WHERE key = ? AND state = 'received'",
            (state, reason, result_id, now, key),
        )
        if cur.rowcount != 1:
            row = self._db.execute("SELECT state FROM instances WHERE key = ?", (key,)).fetchone()
            raise LedgerError(f"instance {key} cannot become {state}: it is {row[0] if row else 'not in the ledger'}")

    def mark_exported(self, result_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE results SET exported = 1 WHERE result_id = ?", (result_id,))

    def results(self, *, exported: Optional[bool] = None, series_uid: Optional[str] = None) -> List[dict]:
        """Committed result payloads in commit order, optionally filtered."""
        query, args = "SELECT payload FROM results WHERE 1 = 1", []
        if exported is not None:
            query += " AND exported = ?"
            args.append(int(exported))
        if series_uid is not None:
            query += " AND series_uid = ?"
            args.append(series_uid)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY committed_at, rowid", args).fetchall()
        return [json.loads(r[0]) for r in rows]

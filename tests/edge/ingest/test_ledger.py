"""The SQLite ledger: one final state per instance, atomic series commits, survives kill -9."""

import signal
import subprocess
import sys
import textwrap

import pytest

from edge.ingest.ledger import PROCESSED, RECEIVED, REJECTED, Ledger, LedgerError


def test_receive_is_idempotent(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.receive("1.1", series_uid="9", source="scp:CT1", spool_path="/s/1.1.dcm") is None
    dup = ledger.receive("1.1", series_uid="other")
    assert dup is not None and dup.state == RECEIVED and dup.series_uid == "9"
    assert ledger.counts() == {RECEIVED: 1, PROCESSED: 0, REJECTED: 0}
    assert [e.key for e in ledger.pending()] == ["1.1"]


def test_reject_new_or_received_but_never_a_final_instance(tmp_path):
    ledger = Ledger(":memory:")
    assert ledger.reject("2.1", "not CT") is True
    assert ledger.get("2.1").state == REJECTED and ledger.get("2.1").reason == "not CT"
    ledger.receive("2.2")
    assert ledger.reject("2.2", "bad pixels") is True
    assert ledger.reject("2.2", "again") is False
    assert ledger.get("2.2").reason == "bad pixels"
    ledger.receive("2.3")
    ledger.commit_series("st", "se", {}, ["2.3"])
    assert ledger.reject("2.3", "late") is False
    assert ledger.get("2.3").state == PROCESSED


def test_commit_series_is_atomic_and_once(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for k in ("3.1", "3.2", "3.3"):
        ledger.receive(k)
    stored = ledger.commit_series("st", "se", {"findings": []}, ["3.1", "3.2"], [("3.3", "duplicate location")])
    assert stored["result_id"] == "se.p1" and stored["part"] == 1
    assert ledger.get("3.1").result_id == "se.p1"
    assert ledger.get("3.3").state == REJECTED
    ledger.receive("3.4")
    with pytest.raises(LedgerError, match="3.1"):  # 3.1 is final already: nothing of this commit happens
        ledger.commit_series("st", "se", {}, ["3.4", "3.1"])
    assert ledger.get("3.4").state == RECEIVED
    assert len(ledger.results()) == 1
    with pytest.raises(LedgerError, match="not in the ledger"):
        ledger.commit_series("st", "se", {}, ["9.9"])
    second = ledger.commit_series("st", "se", {}, ["3.4"])
    assert second["result_id"] == "se.p2"
    assert [r["result_id"] for r in ledger.results(exported=False)] == ["se.p1", "se.p2"]
    ledger.mark_exported("se.p1")
    assert [r["result_id"] for r in ledger.results(exported=False)] == ["se.p2"]
    assert [r["result_id"] for r in ledger.results(series_uid="se", exported=True)] == ["se.p1"]


def test_state_survives_reopening(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.receive("4.1")
    ledger.reject("4.2", "why")
    ledger.close()
    again = Ledger(path)
    assert again.counts() == {RECEIVED: 1, PROCESSED: 0, REJECTED: 1}


def test_kill_9_during_writes_leaves_a_consistent_ledger(tmp_path):
    """A writer killed mid-stream: every commit it reported is there, the database is intact."""
    path = tmp_path / "ledger.sqlite"
    code = textwrap.dedent(f"""
        import sys
        from edge.ingest.ledger import Ledger
        ledger = Ledger({str(path)!r})
        i = 0
        while True:
            keys = [f"5.{{i}}.{{j}}" for j in range(3)]
            for k in keys:
                ledger.receive(k)
            ledger.commit_series("st", f"se{{i}}", {{"n": i}}, keys[:2], [(keys[2], "r")])
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    reported = -1
    for line in proc.stdout:
        reported = int(line)
        if reported >= 30:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=10)
    ledger = Ledger(path)
    assert ledger._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    results = ledger.results()
    assert len(results) >= reported + 1
    for r in results:  # each committed series has its instances final, never half
        i = r["n"]
        states = [ledger.get(f"5.{i}.{j}").state for j in range(3)]
        assert states == [PROCESSED, PROCESSED, REJECTED]
    # instances received but not committed when the kill came are still pending, nothing else
    assert all(e.key.split(".")[1] == str(len(results)) for e in ledger.pending())

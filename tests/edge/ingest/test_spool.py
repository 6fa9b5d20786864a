"""The durable spool: atomic writes, temporary files of interrupted writes, quarantine."""

import os

import pytest

from edge.ingest.spool import Spool, spool_name, write_durably


def test_write_is_atomic_and_named_by_uid(tmp_path):
    spool = Spool(tmp_path / "spool", tmp_path / "rejected")
    path = spool.write("1.2.840.1.5", b"abc")
    assert path == tmp_path / "spool" / "1.2.840.1.5.dcm"
    assert path.read_bytes() == b"abc"
    assert list(spool.files()) == [path]
    assert not list(spool.tmp_dir.iterdir())
    spool.write("1.2.840.1.5", b"abcd")  # the same key again replaces the file
    assert path.read_bytes() == b"abcd"


def test_unsafe_keys_get_hashed_names(tmp_path):
    assert spool_name("1.2.3") == "1.2.3.dcm"
    for key in ("../../etc/passwd", "file:abc", "a/b", "", "."):
        name = spool_name(key)
        assert "/" not in name and name.endswith(".dcm") and name.startswith("k")
    assert spool_name("file:abc") != spool_name("file:abd")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        spool.write("1.2.3", b"data")
    monkeypatch.undo()
    assert not list(spool.files())
    assert not list(spool.tmp_dir.iterdir())


def test_leftover_temporary_files_are_cleared(tmp_path):
    spool = Spool(tmp_path / "spool")
    (spool.tmp_dir / ".1.2.3.dcm.abc.tmp").write_bytes(b"half")
    spool.write("1.2.4", b"whole")
    assert spool.clear_tmp() == 1
    assert [p.name for p in spool.files()] == ["1.2.4.dcm"]


def test_quarantine_moves_or_writes(tmp_path):
    spool = Spool(tmp_path / "spool", tmp_path / "rejected")
    path = spool.write("1.2.5", b"bad")
    target = spool.quarantine("1.2.5", path=path)
    assert target == tmp_path / "rejected" / "1.2.5.dcm" and target.read_bytes() == b"bad"
    assert not path.exists()
    assert spool.quarantine("1.2.6", data=b"worse").read_bytes() == b"worse"
    no_quarantine = Spool(tmp_path / "other")
    p = no_quarantine.write("1.2.7", b"x")
    assert no_quarantine.quarantine("1.2.7", path=p) is None and not p.exists()


def test_write_durably_creates_parent_entries(tmp_path):
    out = write_durably(tmp_path / "a.json", b"{}")
    assert out.read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]

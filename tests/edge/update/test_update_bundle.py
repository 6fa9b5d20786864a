import gzip
import hashlib
import io
import os
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from edge.update.bundle import BundleLimits, extract_bundle, verify_bundle, write_bundle  # noqa: E402
from edge.update.errors import BundleError, ExpiredError, SignatureError  # noqa: E402
from edge.update.manifest import FileEntry, GoldenSpec, Manifest, Targets  # noqa: E402
from edge.update.signing import PrivateKey, TrustStore  # noqa: E402
from update_helpers import NOW  # noqa: E402

PAYLOAD = {"payload/model.onnx": b"not really onnx " * 64, "payload/golden.npz": b"golden vectors"}


@pytest.fixture(scope="module")
def key():
    return PrivateKey.generate()


@pytest.fixture(scope="module")
def trust(key):
    return TrustStore({key.key_id: key.public_key})


def manifest_for(key, payload=PAYLOAD, **overrides) -> Manifest:
    fields = dict(
        model="tiny", version="1.0.0", release=3, created="2029-12-01T00:00:00Z", expires="2030-03-01T00:00:00Z",
        min_runtime_version="0.1.0", targets=Targets(("cpu",)), key_id=key.key_id,
        model_file="payload/model.onnx", golden=GoldenSpec("payload/golden.npz"),
        files={n: FileEntry(hashlib.sha256(d).hexdigest(), len(d)) for n, d in payload.items()},
    )
    fields.update(overrides)
    return Manifest(**fields)


def member(name, data=b"", kind=tarfile.REGTYPE, linkname="", size=None):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if size is None else size
    info.mode = 0o644
    return info, data


def head(key, m: Manifest, signer=None):
    data = m.to_bytes()
    return [member("manifest.json", data), member("manifest.sig", (signer or key).sign(data))]


def body(payload=PAYLOAD):
    return [member(n, d) for n, d in payload.items()]


def write_tar(path: Path, members, gz=True) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(gzip.compress(raw.getvalue()) if gz else raw.getvalue())
    return path


def crafted(tmp_path, key, members_after_head=None, gz=True, **manifest_overrides) -> Path:
    m = manifest_for(key, **manifest_overrides)
    rest = body() if members_after_head is None else members_after_head
    return write_tar(tmp_path / "b.tar.gz", head(key, m) + rest, gz)


def tarfile_content(data: bytes) -> bytes:
    return data.rstrip(b"\0")


def written_files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("compress", [True, False])
def test_written_bundle_verifies_and_extracts_exactly_its_files(tmp_path, key, trust, compress):
    src = tmp_path / "src"
    src.mkdir()
    sources = {}
    for name, data in PAYLOAD.items():
        sources[name] = src / Path(name).name
        sources[name].write_bytes(data)
    m = manifest_for(key)
    path = write_bundle(tmp_path / "b.bundle", m, sources, key, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    before = written_files(tmp_path)
    verified = verify_bundle(path, trust, now=NOW)
    assert verified.manifest == m and written_files(tmp_path) == before  # pass 1 writes nothing
    dest = extract_bundle(verified, trust, tmp_path / "out", now=NOW)
    assert written_files(dest) == ["manifest.json", "manifest.sig", "payload", "payload/golden.npz", "payload/model.onnx"]
    for name, data in PAYLOAD.items():
        assert (dest / name).read_bytes() == data
    assert (dest / "manifest.json").read_bytes() == m.to_bytes()
    # reproducible: same inputs, same bytes
    again = write_bundle(tmp_path / "again.bundle", m, sources, key, compress=compress)
    assert again.read_bytes() == path.read_bytes()


def test_tampered_payload_is_refused(tmp_path, key, trust):
    payload = dict(PAYLOAD)
    payload["payload/model.onnx"] = b"X" + payload["payload/model.onnx"][1:]  # same size, one byte changed
    path = crafted(tmp_path, key, body(payload))
    with pytest.raises(BundleError, match="'payload/model.onnx' does not match its sha256"):
        verify_bundle(path, trust, now=NOW)


def test_tampered_manifest_and_wrong_keys_are_refused(tmp_path, key, trust):
    m = manifest_for(key)
    forged = m.to_bytes().replace(b'"release":3', b'"release":9')
    path = write_tar(tmp_path / "b.tar.gz", [member("manifest.json", forged),
                                             member("manifest.sig", key.sign(m.to_bytes()))] + body())
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(path, trust, now=NOW)
    other = PrivateKey.generate()
    path = write_tar(tmp_path / "c.tar.gz", head(key, m, signer=other) + body())
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(path, trust, now=NOW)
    path = write_tar(tmp_path / "d.tar.gz", head(other, manifest_for(other)) + body())
    with pytest.raises(SignatureError, match=f"signed by key {other.key_id}, which this device does not trust"):
        verify_bundle(path, trust, now=NOW)


def test_expired_manifest_is_refused(tmp_path, key, trust):
    path = crafted(tmp_path, key)
    expires = manifest_for(key).expires_at
    verify_bundle(path, trust, now=expires - timedelta(seconds=1))
    with pytest.raises(ExpiredError, match="expired at 2030-03-01T00:00:00Z"):
        verify_bundle(path, trust, now=expires)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_bundle_is_refused_wherever_it_is_cut(tmp_path, key, trust, gz):
    path = crafted(tmp_path, key, gz=gz)
    data = path.read_bytes()
    # a plain tar is complete at its end-of-archive marker (two zero blocks); zero padding may follow
    end = len(data) if gz else -(-len(tarfile_content(data)) // 512) * 512 + 1024
    cuts = {0, 1, 100, 511, 513, end // 3, end // 2, end - 600, end - 8, end - 1}
    for cut in sorted(c for c in cuts if 0 <= c < end):
        path.write_bytes(data[:cut])
        with pytest.raises(BundleError):
            verify_bundle(path, trust, now=NOW)


def test_size_caps(tmp_path, key, trust):
    path = crafted(tmp_path, key)
    with pytest.raises(BundleError, match="over the 100-byte limit"):
        verify_bundle(path, trust, BundleLimits(max_bundle_bytes=100), now=NOW)
    with pytest.raises(BundleError, match="payload/model.onnx is 1024 bytes, over the 1000-byte per-file limit"):
        verify_bundle(path, trust, BundleLimits(max_file_bytes=1000), now=NOW)
    with pytest.raises(BundleError, match="holds 2 files, at most 1 allowed"):
        verify_bundle(path, trust, BundleLimits(max_files=1), now=NOW)
    on_disk = path.stat().st_size
    with pytest.raises(BundleError, match=f"unpacks to more than the {on_disk}-byte limit"):
        verify_bundle(path, trust, BundleLimits(max_bundle_bytes=on_disk), now=NOW)


def test_decompression_bomb_is_stopped_by_the_unpacked_size_cap(tmp_path, key, trust):
    m = manifest_for(key)
    info, data = head(key, m)[0]
    info.pax_headers = {"comment": "z" * 3_000_000}  # parsed by tarfile before we see the member
    path = write_tar(tmp_path / "bomb.tar.gz", [(info, data)] + head(key, m)[1:] + body())
    assert path.stat().st_size < 100_000
    with pytest.raises(BundleError, match="unpacks to more than the 1000000-byte limit"):
        verify_bundle(path, trust, BundleLimits(max_bundle_bytes=1_000_000), now=NOW)


@pytest.mark.parametrize("bad, message", [
    (member("../evil", b"x"), "'../evil' has a '..' path that escapes the bundle"),
    (member("payload/../../evil", b"x"), "escapes the bundle"),
    (member("/etc/evil", b"x"), "has an absolute path"),
    (member("payload/model.onnx", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "is a symbolic link"),
    (member("payload/model.onnx", kind=tarfile.LNKTYPE, linkname="manifest.json"), "is a hard link"),
    (member("payload/dev", kind=tarfile.CHRTYPE), "is a device file"),
    (member("payload/dev", kind=tarfile.BLKTYPE), "is a device file"),
    (member("payload/fifo", kind=tarfile.FIFOTYPE), "is a FIFO"),
    (member("payload", kind=tarfile.DIRTYPE), "is a folder entry"),
    (member("payload/extra.bin", b"x"), "'payload/extra.bin' is not listed in the manifest"),
    (member("payload/golden.npz", b"golden vectors"), "'payload/golden.npz' appears more than once"),
    (member("payload/golden.npz", b"golden vector"), "is 13 bytes, the manifest says 14"),
])
def test_unsafe_or_unexpected_members_are_refused_before_anything_is_written(tmp_path, key, trust, bad, message):
    path = crafted(tmp_path, key, body() + [bad] if "more than once" in message else [bad] + body())
    before = written_files(tmp_path)
    with pytest.raises(BundleError) as e:
        verify_bundle(path, trust, now=NOW)
    assert message in str(e.value) and str(path) in str(e.value)
    assert written_files(tmp_path) == before


def test_missing_member_and_wrong_order_are_refused(tmp_path, key, trust):
    path = crafted(tmp_path, key, body()[:1])
    with pytest.raises(BundleError, match="lacks 1 file"):
        verify_bundle(path, trust, now=NOW)
    m = manifest_for(key)
    path = write_tar(tmp_path / "order.tar.gz", body() + head(key, m))
    with pytest.raises(BundleError, match="must start with manifest.json"):
        verify_bundle(path, trust, now=NOW)
    path = write_tar(tmp_path / "nosig.tar.gz", head(key, m)[:1] + body())
    with pytest.raises(BundleError, match="then manifest.sig"):
        verify_bundle(path, trust, now=NOW)
    for junk in (b"", b"not a tar at all" * 100, gzip.compress(b"not a tar" * 100)):
        (tmp_path / "junk").write_bytes(junk)
        with pytest.raises(BundleError, match="cannot read the archive"):
            verify_bundle(tmp_path / "junk", trust, now=NOW)


def test_a_bundle_changed_after_verification_is_caught_while_extracting(tmp_path, key, trust):
    path = crafted(tmp_path, key)
    verified = verify_bundle(path, trust, now=NOW)
    payload = dict(PAYLOAD, **{"payload/golden.npz": b"GOLDEN vectors"})
    crafted(tmp_path, key, body(payload))  # same name, same manifest, one file altered
    with pytest.raises(BundleError, match="golden.npz' does not match its sha256"):
        extract_bundle(verified, trust, tmp_path / "out", now=NOW)
    crafted(tmp_path, key, [member("../escape", b"x")] + body())
    with pytest.raises(BundleError, match="escapes the bundle"):
        extract_bundle(verified, trust, tmp_path / "out2", now=NOW)
    assert not (tmp_path / "escape").exists()
    crafted(tmp_path, key, release=4)
    with pytest.raises(BundleError, match="changed since it was verified"):
        extract_bundle(verified, trust, tmp_path / "out3", now=NOW)
    assert os.listdir(tmp_path / "out3") == []

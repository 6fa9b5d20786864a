import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from edge.errors import InputError  # noqa: E402
from update_helpers import subprocess_env  # noqa: E402
from edge.update.errors import SignatureError, TrustStoreError  # noqa: E402
from edge.update.signing import (  # noqa: E402
    PrivateKey,
    TrustStore,
    apply_rotation,
    generate_keypair,
    key_id_of,
    load_private_key,
    load_public_key,
    make_rotation,
)

ROOT = Path(__file__).resolve().parents[3]


def store_of(*keys, seq=0) -> TrustStore:
    return TrustStore({k.key_id: k.public_key for k in keys}, seq)


def test_keygen_writes_a_usable_pair_and_never_overwrites(tmp_path):
    private, public, store_path = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key, pub = load_private_key(private), load_public_key(public)
    assert key.key_id == pub.key_id == key_id_of(pub.raw) and len(pub.raw) == 32
    store = TrustStore.load(store_path)
    assert list(store.keys) == [key.key_id]
    data = b"manifest bytes"
    assert store.verify(data, key.sign(data), key.key_id) == pub
    before = private.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        generate_keypair(tmp_path / "keys")
    assert private.read_bytes() == before


def test_openssl_keys_are_read(tmp_path):
    openssl = subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "k.pem")],
                             capture_output=True)
    if openssl.returncode != 0:
        pytest.skip("openssl without ed25519")
    key = load_private_key(tmp_path / "k.pem")
    assert key.public_key.verify(key.sign(b"x"), b"x")


def test_wrong_key_altered_data_and_unknown_signer_are_refused():
    good, other = PrivateKey.generate(), PrivateKey.generate()
    store = store_of(good)
    data = b'{"release":1}'
    with pytest.raises(SignatureError, match="does not verify"):
        store.verify(data, other.sign(data), good.key_id)  # signed by another key, claiming to be `good`
    with pytest.raises(SignatureError, match="does not verify"):
        store.verify(data + b" ", good.sign(data), good.key_id)
    with pytest.raises(SignatureError, match="does not verify"):
        store.verify(data, good.sign(data)[:63], good.key_id)
    with pytest.raises(SignatureError, match="does not trust"):
        store.verify(data, other.sign(data), other.key_id)


def test_trust_store_file_is_validated(tmp_path):
    key = PrivateKey.generate()
    path = tmp_path / "trusted_keys.json"
    store_of(key, seq=3).save(path)
    assert TrustStore.load(path) == store_of(key, seq=3)
    obj = json.loads(path.read_text())
    obj["keys"][0]["key_id"] = "0" * 16
    path.write_text(json.dumps(obj))
    with pytest.raises(TrustStoreError, match="does not match its public key"):
        TrustStore.load(path)
    path.write_text(json.dumps({"format": 1, "keys": [], "rotation_sequence": 0}))
    with pytest.raises(TrustStoreError, match="trusts no key"):
        TrustStore.load(path)
    for text in ("{", "[]", '{"format": 1}'):
        path.write_text(text)
        with pytest.raises(TrustStoreError):
            TrustStore.load(path)
    with pytest.raises(TrustStoreError, match="cannot read"):
        TrustStore.load(tmp_path / "missing.json")


def test_rotation_adds_the_new_key_and_revokes_the_old_one():
    old, new = PrivateKey.generate(), PrivateKey.generate()
    store = store_of(old)
    rotated = apply_rotation(store, make_rotation(old, 1, add=[new.public_key], revoke=[old.key_id]))
    assert list(rotated.keys) == [new.key_id] and rotated.rotation_sequence == 1
    data = b"next bundle"
    rotated.verify(data, new.sign(data), new.key_id)
    with pytest.raises(SignatureError, match="does not trust"):
        rotated.verify(data, old.sign(data), old.key_id)


def test_rotation_refuses_replays_untrusted_signers_tampering_and_lockout():
    old, new, stranger = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    store = store_of(old, seq=1)
    with pytest.raises(TrustStoreError, match="not above the last applied"):
        apply_rotation(store, make_rotation(old, 1, add=[new.public_key]))
    with pytest.raises(SignatureError, match="does not trust"):
        apply_rotation(store, make_rotation(stranger, 2, add=[stranger.public_key]))
    statement = json.loads(make_rotation(old, 2, add=[new.public_key]))
    statement["statement"]["add"] = [stranger.public_key.to_base64()]
    with pytest.raises(SignatureError, match="does not verify"):
        apply_rotation(store, json.dumps(statement).encode())
    with pytest.raises(TrustStoreError, match="trusting no key"):
        apply_rotation(store, make_rotation(old, 2, revoke=[old.key_id]))
    for junk in (b"", b"[]", b'{"statement": 1, "signature": ""}'):
        with pytest.raises(TrustStoreError):
            apply_rotation(store, junk)


def test_keygen_and_rotate_through_the_tool(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "package_update.py")]
    for name in ("old", "new"):
        r = subprocess.run(tool + ["keygen", "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=60,
                       env=subprocess_env())
        assert r.returncode == 0, r.stderr
    old_id = load_public_key(tmp_path / "old" / "update_key.pub.pem").key_id
    r = subprocess.run(tool + ["rotate", "--key", str(tmp_path / "old" / "update_key.pem"), "--sequence", "1",
                               "--add", str(tmp_path / "new" / "update_key.pub.pem"), "--revoke", old_id,
                               "--out", str(tmp_path / "rotation.json")], capture_output=True, text=True, timeout=60,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr
    store = apply_rotation(TrustStore.load(tmp_path / "old" / "trusted_keys.json"),
                           (tmp_path / "rotation.json").read_bytes())
    assert store.keys == TrustStore.load(tmp_path / "new" / "trusted_keys.json").keys
    assert store.rotation_sequence == 1
    r = subprocess.run(tool + ["keygen", "--out", str(tmp_path / "old")], capture_output=True, text=True, timeout=60,
                       env=subprocess_env())
    assert r.returncode == 1 and "already exists" in r.stderr and r.stderr.count("\n") == 1

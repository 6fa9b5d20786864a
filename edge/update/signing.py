"""Ed25519 signing keys, the device's trust store, and key rotation.

* A signing key pair is two PEM files (PKCS#8 private key, SubjectPublicKeyInfo
  public key), interoperable with ``openssl genpkey -algorithm ed25519``. A key
  is named by its *key id*: the first 16 hex digits of sha256 of the raw 32-byte
  public key. The manifest names the key that signed it (``key_id``).
* The device trusts the public keys in its *trust store*, a JSON file
  (``trusted_keys.json``) provisioned with the device.
* *Rotation*: a rotation statement, signed by a key the device trusts, adds
  public keys and/or revokes key ids (typically: add the new key and revoke
  the old one that signs the statement). Statements carry a sequence number
  above the store's last one, so an old statement cannot be replayed. A
  statement that would leave the store without keys is refused.

``cryptography`` is imported lazily; without it, verifying anything is a
:class:`~edge.errors.MissingDependencyError`.
"""

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

from edge.errors import InputError, MissingDependencyError
from edge.update.durable import write_durably
from edge.update.manifest import canonical_json, format_timestamp
from edge.update.errors import SignatureError, TrustStoreError

PRIVATE_KEY_FILE = "update_key.pem"
PUBLIC_KEY_FILE = "update_key.pub.pem"
TRUST_STORE_FILE = "trusted_keys.json"
TRUST_STORE_FORMAT = 1
ROTATION_KIND = "ct-edge-key-rotation"
SIGNATURE_BYTES = 64
_KEY_ID = re.compile(r"[0-9a-f]{16}\Z")
_MAX_KEY_FILE_BYTES = 64 * 1024


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependencyError(
            "the 'cryptography' package is needed for signed updates: pip install cryptography "
            "(JetPack: apt install python3-cryptography)"
        ) from None
    return ed25519


def _serialization():
    _ed25519()
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id_of(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A raw 32-byte Ed25519 public key."""

    raw: bytes

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        ed25519 = _ed25519()
        from cryptography.exceptions import InvalidSignature

        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.raw).verify(bytes(signature), bytes(data))
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_pem(self) -> bytes:
        s = _serialization()
        key = _ed25519().Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @classmethod
    def from_base64(cls, text: str, source="<key>") -> "PublicKey":
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, AttributeError):
            raise TrustStoreError(source, f"public key {text!r:.60} is not base64") from None
        if len(raw) != 32:
            raise TrustStoreError(source, f"public key is {len(raw)} bytes, an Ed25519 key is 32")
        return cls(raw)


class PrivateKey:
    """An Ed25519 private key (kept off the device: only the packager signs)."""

    def __init__(self, key):
        self._key = key

    @classmethod
    def generate(cls) -> "PrivateKey":
        return cls(_ed25519().Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> PublicKey:
        s = _serialization()
        return PublicKey(self._key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw))

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    def to_pem(self) -> bytes:
        s = _serialization()
        return self._key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())


def _read_small(path, what: str) -> bytes:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > _MAX_KEY_FILE_BYTES:
            raise TrustStoreError(path, f"{what} is {size} bytes, too large")
        return path.read_bytes()
    except OSError as e:
        raise TrustStoreError(path, f"cannot read {what}: {e.strerror or e}") from None


def load_private_key(path, password: Optional[bytes] = None) -> PrivateKey:
    """Read a PEM (PKCS#8) Ed25519 private key."""
    data = _read_small(path, "private key")
    s = _serialization()
    try:
        key = s.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as e:
        raise TrustStoreError(path, f"not a readable PEM private key: {e}") from None
    if not isinstance(key, _ed25519().Ed25519PrivateKey):
        raise TrustStoreError(path, f"is a {type(key).__name__}, an Ed25519 key is needed")
    return PrivateKey(key)


def load_public_key(path) -> PublicKey:
    """Read a PEM (SubjectPublicKeyInfo) Ed25519 public key."""
    data = _read_small(path, "public key")
    s = _serialization()
    try:
        key = s.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise TrustStoreError(path, f"not a readable PEM public key: {e}") from None
    if not isinstance(key, _ed25519().Ed25519PublicKey):
        raise TrustStoreError(path, f"is a {type(key).__name__}, an Ed25519 key is needed")
    return PublicKey(key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw))


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise InputError(path, "already exists; not overwriting a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def generate_keypair(out_dir) -> Tuple[Path, Path, Path]:
    """Write a new key pair and a trust store holding its public key into ``out_dir``.

    Returns (private key, public key, trust store) paths. Existing files are never overwritten.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(out, f"cannot create the folder: {e.strerror or e}") from None
    paths = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE, out / TRUST_STORE_FILE
    for p in paths:
        if p.exists():
            raise InputError(p, "already exists; not overwriting a key")
    key = PrivateKey.generate()
    _create_exclusive(paths[0], key.to_pem(), 0o600)
    _create_exclusive(paths[1], key.public_key.to_pem(), 0o644)
    _create_exclusive(paths[2], TrustStore({key.key_id: key.public_key}).to_bytes(), 0o644)
    return paths


@dataclass(frozen=True)
class TrustStore:
    """The public keys a device accepts signatures from, and the last rotation applied."""

    keys: Dict[str, PublicKey] = field(default_factory=dict)
    rotation_sequence: int = 0

    def to_bytes(self) -> bytes:
        return canonical_json({
            "format": TRUST_STORE_FORMAT,
            "keys": [{"key_id": k, "public_key": self.keys[k].to_base64()} for k in sorted(self.keys)],
            "rotation_sequence": self.rotation_sequence,
        }) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, source="<trust store>") -> "TrustStore":
        obj = _load_json_object(data, source, "trust store")
        if set(obj) != {"format", "keys", "rotation_sequence"} or obj["format"] != TRUST_STORE_FORMAT:
            raise TrustStoreError(source, f"must be an object with format {TRUST_STORE_FORMAT}, keys, rotation_sequence")
        seq = obj["rotation_sequence"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise TrustStoreError(source, f"rotation_sequence must be an integer >= 0, got {seq!r}")
        if not isinstance(obj["keys"], list):
            raise TrustStoreError(source, "keys must be a list")
        keys = {}
        for entry in obj["keys"]:
            if not isinstance(entry, dict) or set(entry) != {"key_id", "public_key"}:
                raise TrustStoreError(source, "each key must be an object with key_id and public_key")
            key = PublicKey.from_base64(entry["public_key"], source)
            if entry["key_id"] != key.key_id:
                raise TrustStoreError(source, f"key_id {entry['key_id']!r} does not match its public key ({key.key_id})")
            keys[key.key_id] = key
        return cls(keys, seq)

    @classmethod
    def load(cls, path) -> "TrustStore":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TrustStoreError(path, f"cannot read the trust store: {e.strerror or e}") from None
        store = cls.from_bytes(data, path)
        if not store.keys:
            raise TrustStoreError(path, "trusts no key: no bundle could ever be installed")
        return store

    def save(self, path) -> None:
        write_durably(path, self.to_bytes())

    def verify(self, data: bytes, signature: bytes, key_id: str, source="<bundle>") -> PublicKey:
        """Check ``signature`` over ``data`` by trusted key ``key_id``; SignatureError otherwise."""
        key = self.keys.get(key_id)
        if key is None:
            raise SignatureError(source, f"signed by key {key_id}, which this device does not trust "
                                         f"(trusted: {', '.join(sorted(self.keys)) or 'none'})")
        if len(signature) != SIGNATURE_BYTES or not key.verify(signature, data):
            raise SignatureError(source, f"the signature does not verify with key {key_id}: "
                                         "the manifest was altered or signed by another key")
        return key


def _load_json_object(data: bytes, source, what: str) -> dict:
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise TrustStoreError(source, f"{what} is not JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise TrustStoreError(source, f"{what} must be a JSON object")
    return obj


def make_rotation(
    signer: PrivateKey,
    sequence: int,
    add: Sequence[PublicKey] = (),
    revoke: Iterable[str] = (),
    now: Optional[datetime] = None,
) -> bytes:
    """A signed rotation statement: ``signer`` (trusted now) adds ``add`` and revokes ``revoke`` key ids."""
    statement = {
        "kind": ROTATION_KIND,
        "format": 1,
        "sequence": int(sequence),
        "signed_by": signer.key_id,
        "add": sorted(k.to_base64() for k in add),
        "revoke": sorted(set(revoke)),
        "created": format_timestamp(now or datetime.now(timezone.utc)),
    }
    signature = signer.sign(canonical_json(statement))
    return canonical_json({"statement": statement, "signature": base64.b64encode(signature).decode("ascii")}) + b"\n"


def apply_rotation(store: TrustStore, data: bytes, source="<rotation>") -> TrustStore:
    """The trust store after a rotation statement, which must be signed by a key ``store`` trusts."""
    obj = _load_json_object(data, source, "rotation statement")
    if set(obj) != {"statement", "signature"} or not isinstance(obj["statement"], dict):
        raise TrustStoreError(source, "must be an object with 'statement' and 'signature'")
    st = obj["statement"]
    expected = {"kind", "format", "sequence", "signed_by", "add", "revoke", "created"}
    if set(st) != expected or st["kind"] != ROTATION_KIND or st["format"] != 1:
        raise TrustStoreError(source, f"statement must be a {ROTATION_KIND} (format 1) with {', '.join(sorted(expected))}")
    seq = st["sequence"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise TrustStoreError(source, f"sequence must be an integer, got {seq!r}")
    if not isinstance(st["signed_by"], str) or not isinstance(st["add"], list) or not isinstance(st["revoke"], list):
        raise TrustStoreError(source, "signed_by must be a key id, add and revoke lists")
    try:
        signature = base64.b64decode(str(obj["signature"]).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise TrustStoreError(source, "signature is not base64") from None
    store.verify(canonical_json(st), signature, st["signed_by"], source)
    if seq <= store.rotation_sequence:
        raise TrustStoreError(source, f"sequence {seq} is not above the last applied rotation "
                                      f"({store.rotation_sequence}): an old statement is not applied again")
    added = [PublicKey.from_base64(k, source) if isinstance(k, str) else None for k in st["add"]]
    if None in added:
        raise TrustStoreError(source, "add must list base64 public keys")
    bad = [k for k in st["revoke"] if not isinstance(k, str) or not _KEY_ID.match(k)]
    if bad:
        raise TrustStoreError(source, f"revoke must list key ids (16 hex digits), got {bad[0]!r}")
    keys = dict(store.keys)
    keys.update({k.key_id: k for k in added})
    for kid in st["revoke"]:
        keys.pop(kid, None)
    if not keys:
        raise TrustStoreError(source, "would leave the device trusting no key; refused")
    return TrustStore(keys, seq)

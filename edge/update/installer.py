"""The device agent: install a bundle, report, roll back, and recover from a crash mid-update.

State folder layout (``/var/lib/ct-edge`` by default)::

    trusted_keys.json       public keys the device accepts (edge.update.signing)
    device.json             optional hardware tags (edge.update.device)
    state.json              anti-rollback floor, pending switch, history (edge.update.state)
    lock                    flock'd by the one operation allowed at a time
    current -> versions/8-1.3.0
    previous -> versions/7-1.2.0
    versions/<release>-<version>/   manifest.json, manifest.sig, payload/..., prepared.json[, prepared/]

``apply``: verify the bundle (signature, expiry, caps, every hash; nothing
written) -> anti-rollback -> compatibility -> extract into a hidden staging
folder -> prepare the model (TensorRT engine build or ONNX Runtime) -> golden
check -> rename the staging folder to ``versions/<release>-<version>``
(a visible version folder is always complete) -> record the pending switch ->
``previous`` := old current, ``current`` := new (atomic symlink renames, fsync'd)
-> health check through ``current`` -> commit (release floor, history) ->
delete versions that are neither current nor previous. A failed health check
puts both links back and says why. Killed at any point, the device keeps one
complete version active; :meth:`Installer.recover` (run first by every
operation) undoes an uncommitted switch and sweeps leftovers.
"""

import fcntl
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Optional

from edge.errors import EdgeError
from edge.update.bundle import DEFAULT_LIMITS, BundleLimits, extract_bundle, hash_file, verify_bundle
from edge.update.device import DeviceProfile, check_compatibility, detect_device
from edge.update.durable import fsync_dir, remove_link, remove_tree, switch_symlink
from edge.update.errors import HealthCheckError, RollbackRefusedError, TrustStoreError, UpdateBusyError, UpdateError
from edge.update.golden import GoldenReport, GoldenVectors, check_golden
from edge.update.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, parse_manifest
from edge.update.prepare import PreparedModel, open_prepared, prepare_model
from edge.update.signing import TRUST_STORE_FILE, TrustStore, apply_rotation
from edge.update.state import PendingSwitch, UpdateState

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/ct-edge"
CURRENT = "current"
PREVIOUS = "previous"
VERSIONS = "versions"
LOCK_FILE = "lock"
STAGING_PREFIX = ".staging-"
ROTATION_PAYLOAD = "payload/trust/rotation.json"

PrepareHook = Callable[[Path, Manifest, str], PreparedModel]
OpenHook = Callable[[Path], PreparedModel]


@dataclass
class VersionInfo:
    name: str
    model: Optional[str] = None
    version: Optional[str] = None
    release: Optional[int] = None
    verified: Optional[bool] = None  # None: not checked
    problem: Optional[str] = None


@dataclass
class UpdateStatus:
    state_dir: str
    current: Optional[VersionInfo]
    previous: Optional[VersionInfo]
    release_floor: int
    pending: Optional[dict]
    history: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UpdateResult:
    """What an apply or rollback did."""

    action: str
    version: str
    model: str
    release: int
    backend: str
    replaced: Optional[str]
    golden: str
    notes: List[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{self.action}: {self.model} {self.version} is active ({self.backend}); "
                 f"previous: {self.replaced or 'none'}", f"  {self.golden}"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Installer:
    """Installs signed bundles into a state folder (see the module docstring).

    ``prepare`` and ``open_version`` are the hooks that make a model runnable
    (default: :func:`edge.update.prepare.prepare_model` / :func:`~edge.update.prepare.open_prepared`);
    ``now`` is the clock used for expiry.
    """

    def __init__(self, state_dir=DEFAULT_STATE_DIR, trust_store=None, device: Optional[DeviceProfile] = None,
                 limits: BundleLimits = DEFAULT_LIMITS, prepare: PrepareHook = prepare_model,
                 open_version: OpenHook = open_prepared, now: Callable[[], datetime] = _utcnow):
        self.root = Path(state_dir)
        self.trust_path = Path(trust_store) if trust_store else self.root / TRUST_STORE_FILE
        self._device = device
        self.limits = limits
        self.prepare = prepare
        self.open_version = open_version
        self.now = now

    # --- paths and links -------------------------------------------------
    @property
    def versions(self) -> Path:
        return self.root / VERSIONS

    @property
    def device(self) -> DeviceProfile:
        if self._device is None:
            self._device = detect_device(self.root)
        return self._device

    def link_target(self, link: str) -> Optional[str]:
        """The version name ``current`` / ``previous`` points at, or None."""
        try:
            target = os.readlink(self.root / link)
        except (FileNotFoundError, OSError):
            return None
        return target.split("/", 1)[1] if target.startswith(VERSIONS + "/") else target

    def _set_link(self, link: str, version: Optional[str]) -> None:
        if version is None:
            remove_link(self.root / link)
        else:
            switch_symlink(self.root / link, f"{VERSIONS}/{version}")

    def _trust(self) -> TrustStore:
        return TrustStore.load(self.trust_path)

    @contextmanager
    def _locked(self):
        try:
            self.versions.mkdir(parents=True, exist_ok=True)
            fd = os.open(str(self.root / LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UpdateError(f"{self.root}: cannot use the state folder: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UpdateBusyError(f"another update operation is running (pid {holder or '?'} holds "
                                  f"{self.root / LOCK_FILE})") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    # --- recovery --------------------------------------------------------
    def recover(self) -> List[str]:
        """Undo an uncommitted switch and sweep leftovers; returns what was done."""
        with self._locked():
            return self._recover()

    def _recover(self) -> List[str]:
        notes = []
        for leftover in list(self.root.glob(".*.link-*")) + list(self.root.glob(".*.tmp-*")):
            leftover.unlink()  # a symlink or file being written when the agent died (edge.update.durable)
        state = UpdateState.load(self.root)
        if state.pending is not None:
            p = state.pending
            self._set_link(CURRENT, p.current_before)
            self._set_link(PREVIOUS, p.previous_before)
            detail = f"interrupted before it was committed; {p.current_before or 'no version'} is active again"
            state.record(p.action, p.version, "reverted", detail, self.now())
            state.pending = None
            state.save(self.root)
            notes.append(f"{p.action} of {p.version} was {detail}")
            log.warning("%s of %s was %s", p.action, p.version, detail)
        current = self.link_target(CURRENT)
        if current is not None:
            try:
                release = self._installed_manifest(current).release
            except EdgeError as e:
                notes.append(f"current version {current} is unreadable: {e}")
            else:
                if release > state.release_floor:
                    state.release_floor = release
                    state.save(self.root)
        self._sweep()
        return notes

    def _sweep(self) -> None:
        """Delete staging folders, half-deleted trees and versions that are neither current nor previous."""
        keep = {self.link_target(CURRENT), self.link_target(PREVIOUS)}
        for entry in self.versions.iterdir():
            if entry.name not in keep:
                try:
                    remove_tree(entry)
                except OSError as e:
                    log.warning("cannot delete %s: %s", entry, e)

    # --- versions --------------------------------------------------------
    def _installed_manifest(self, name: str) -> Manifest:
        path = self.versions / name / MANIFEST_NAME
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UpdateError(f"{path}: cannot read: {e.strerror or e}") from None
        return parse_manifest(data, str(path))

    def verify_version(self, name: str) -> Manifest:
        """Re-check an installed version: signature by a trusted key, every file's hash, the prepared model."""
        folder = self.versions / name
        manifest = self._installed_manifest(name)
        try:
            signature = (folder / SIGNATURE_NAME).read_bytes()
        except OSError as e:
            raise UpdateError(f"{folder / SIGNATURE_NAME}: cannot read: {e.strerror or e}") from None
        self._trust().verify((folder / MANIFEST_NAME).read_bytes(), signature, manifest.key_id, folder)
        for rel, entry in manifest.files.items():
            path = folder.joinpath(*rel.split("/"))
            try:
                ok = path.is_file() and not path.is_symlink() and hash_file(path) == entry
            except OSError:
                ok = False
            if not ok:
                raise UpdateError(f"{path}: missing or altered since it was installed")
        self.open_version(folder)
        return manifest

    def _version_info(self, name: Optional[str], verify: bool) -> Optional[VersionInfo]:
        if name is None:
            return None
        info = VersionInfo(name)
        try:
            m = self.verify_version(name) if verify else self._installed_manifest(name)
            info.model, info.version, info.release = m.model, m.version, m.release
            info.verified = True if verify else None
        except EdgeError as e:
            info.verified, info.problem = False, str(e)
        return info

    def status(self, verify: bool = True) -> UpdateStatus:
        """Read-only: active and previous versions (re-verified unless ``verify`` is False), floor, pending switch."""
        state = UpdateState.load(self.root)
        return UpdateStatus(
            state_dir=str(self.root),
            current=self._version_info(self.link_target(CURRENT), verify),
            previous=self._version_info(self.link_target(PREVIOUS), verify),
            release_floor=state.release_floor,
            pending=state.pending.to_dict() if state.pending else None,
            history=state.history[-10:],
        )

    # --- checks ----------------------------------------------------------
    def _check_release(self, m: Manifest, floor: int, force: bool) -> None:
        if m.release < floor:
            raise RollbackRefusedError(f"bundle release {m.release} ({m.model} {m.version}) is older than release "
                                       f"{floor} already installed: refused (anti-rollback)")
        if m.release == floor and not force:
            raise RollbackRefusedError(f"release {m.release} is already installed; pass --force to install it again")

    def _golden(self, prepared: PreparedModel, m: Manifest, when: str) -> GoldenReport:
        golden = GoldenVectors.load(prepared.directory.joinpath(*m.golden.file.split("/")))
        return check_golden(prepared.open_runner, golden, prepared.specs.decode, m.golden,
                            source=f"{m.version_name} {when}")

    def _health_problem(self, m: Manifest) -> Optional[str]:
        """Open the model through ``current`` as the runtime does and run the golden check; None when healthy."""
        try:
            self._golden(self.open_version(self.root / CURRENT), m, "after the switch")
        except Exception as e:  # any failure of the new model means going back
            log.debug("health check failed", exc_info=True)
            return str(e) if isinstance(e, EdgeError) else f"{type(e).__name__}: {e}"
        return None

    def _switch(self, state: UpdateState, action: str, version: str) -> PendingSwitch:
        pending = PendingSwitch(action, version, self.link_target(CURRENT), self.link_target(PREVIOUS))
        state.pending = pending
        state.save(self.root)
        if pending.current_before is not None:
            self._set_link(PREVIOUS, pending.current_before)
        self._set_link(CURRENT, version)
        return pending

    def _undo(self, state: UpdateState, pending: PendingSwitch, problem: str) -> HealthCheckError:
        self._set_link(CURRENT, pending.current_before)
        self._set_link(PREVIOUS, pending.previous_before)
        state.pending = None
        state.record(pending.action, pending.version, "reverted", problem, self.now())
        state.save(self.root)
        back = f"reverted to {pending.current_before}" if pending.current_before else "no model is active"
        log.error("%s of %s failed its health check: %s; %s", pending.action, pending.version, problem, back)
        return HealthCheckError(f"{pending.version} failed its health check after the switch: {problem}; {back}")

    # --- operations ------------------------------------------------------
    def apply(self, bundle, force: bool = False) -> UpdateResult:
        """Install a bundle (module docstring). Raises a typed EdgeError, leaving the old version active, on refusal."""
        with self._locked():
            notes = self._recover()
            trust = self._trust()
            verified = verify_bundle(bundle, trust, self.limits, self.now())
            m = verified.manifest
            state = UpdateState.load(self.root)
            self._check_release(m, state.release_floor, force)
            backend = check_compatibility(m, self.device)
            staging = self.versions / f"{STAGING_PREFIX}{m.release}-{os.getpid()}"
            remove_tree(staging)
            try:
                extract_bundle(verified, trust, staging, self.limits, self.now())
                prepared = self._prepare(staging, m, backend)
                report = self._golden(prepared, m, "before the switch")
            except BaseException:
                remove_tree(staging)
                raise
            name = self._free_name(m)
            os.rename(staging, self.versions / name)
            fsync_dir(self.versions)
            pending = self._switch(state, "apply", name)
            problem = self._health_problem(m)
            if problem:
                error = self._undo(state, pending, problem)
                self._sweep()
                raise error
            state.pending = None
            state.release_floor = max(state.release_floor, m.release)
            state.record("apply", name, "ok", report.format(), self.now())
            state.save(self.root)
            self._sweep()
            notes += self._rotation_from_bundle(name, m)
            return UpdateResult("apply", name, m.model, m.release, prepared.backend, pending.current_before,
                                report.format(), notes)

    def _prepare(self, staging: Path, m: Manifest, backend: str) -> PreparedModel:
        try:
            return self.prepare(staging, m, backend)
        except EdgeError:
            raise
        except Exception as e:  # engine builders and runtimes raise many types; the device must stay up
            log.debug("preparing the model failed", exc_info=True)
            raise UpdateError(f"preparing {m.version_name} for {backend} failed: {type(e).__name__}: {e}") from None

    def _free_name(self, m: Manifest) -> str:
        name, k = m.version_name, 2
        while (self.versions / name).exists() or (self.versions / name).is_symlink():
            name, k = f"{m.version_name}.{k}", k + 1
        return name

    def _rotation_from_bundle(self, name: str, m: Manifest) -> List[str]:
        if ROTATION_PAYLOAD not in m.files:
            return []
        path = self.versions / name / ROTATION_PAYLOAD
        try:
            store = apply_rotation(self._trust(), path.read_bytes(), path)
        except (TrustStoreError, OSError) as e:
            return [f"key rotation in the bundle not applied: {e}"]
        store.save(self.trust_path)
        return [f"trust store updated by the bundle's key rotation: trusted keys {', '.join(sorted(store.keys))}"]

    def rollback(self) -> UpdateResult:
        """Make the previous version current again (after re-verifying it); the anti-rollback floor is unchanged."""
        with self._locked():
            notes = self._recover()
            target = self.link_target(PREVIOUS)
            if target is None:
                raise UpdateError("no previous version to roll back to")
            try:
                m = self.verify_version(target)
            except EdgeError as e:
                raise UpdateError(f"previous version {target} cannot be used: {e}") from None
            state = UpdateState.load(self.root)
            pending = self._switch(state, "rollback", target)
            problem = self._health_problem(m)
            if problem:
                raise self._undo(state, pending, problem)
            state.pending = None
            state.record("rollback", target, "ok", f"from {pending.current_before}", self.now())
            state.save(self.root)
            backend = self.open_version(self.root / CURRENT).backend
            return UpdateResult("rollback", target, m.model, m.release, backend, pending.current_before,
                                "golden check passed after the switch", notes)

    def trust(self, rotation_file) -> TrustStore:
        """Apply a key rotation statement to the trust store."""
        path = Path(rotation_file)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TrustStoreError(path, f"cannot read: {e.strerror or e}") from None
        with self._locked():
            store = apply_rotation(self._trust(), data, path)
            store.save(self.trust_path)
            state = UpdateState.load(self.root)
            state.record("trust", None, "ok", f"rotation {store.rotation_sequence}: keys {', '.join(sorted(store.keys))}",
                         self.now())
            state.save(self.root)
            return store

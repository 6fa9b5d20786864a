"""Typed, user-facing errors of the update path (all :class:`edge.errors.EdgeError`)."""

from edge.errors import EdgeError, InputError


class ManifestError(InputError):
    """A manifest that is not valid. ``field`` names the offending field (dotted path)."""

    def __init__(self, path, field: str, reason: str):
        self.field = field
        super().__init__(path, f"manifest field {field!r}: {reason}" if field else f"manifest: {reason}")


class BundleError(InputError):
    """A bundle that must not be installed: corrupt, truncated, tampered, oversized or unsafe."""


class SignatureError(BundleError):
    """A signature that does not verify, or a signer the device does not trust."""


class ExpiredError(BundleError):
    """A bundle whose manifest has expired."""


class TrustStoreError(InputError):
    """An unreadable or invalid trust store, key file or key rotation statement."""


class UpdateError(EdgeError):
    """An update that was refused or failed; the device keeps (or returns to) its previous model."""


class RollbackRefusedError(UpdateError):
    """Anti-rollback: the bundle's release counter is not above the installed one."""


class IncompatibleBundleError(UpdateError):
    """The bundle does not target this device (hardware, TensorRT or runtime version)."""


class GoldenCheckError(UpdateError):
    """The prepared model does not reproduce the bundle's golden vectors."""


class HealthCheckError(UpdateError):
    """The model failed its check after the switch; the previous version was restored."""


class UpdateBusyError(UpdateError):
    """Another update operation holds the device's update lock."""

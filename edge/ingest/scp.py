"""The DICOM Storage SCP (pynetdicom) the scanner pushes CT images to.

* AE title (a request for another called AE title is rejected) and an
  allowlist of calling AE titles (empty: any); other callers are rejected.
* Presentation contexts: CT Image Storage, Enhanced CT Image Storage (and its
  legacy-converted form) with the uncompressed transfer syntaxes plus every
  compressed one this installation can decode; Verification (C-ECHO).
* At most ``maximum_associations`` at once (more are rejected, transient:
  the scanner retries); optional TLS.
* Each C-STORE goes through :class:`~edge.ingest.intake.Intake`: the success
  status 0x0000 is returned only after the instance is fsynced in the spool and
  recorded in the ledger; a full pipeline answers 0xA700 (out of resources; the
  scanner retries); a bad instance answers 0xA900 / 0xC000 with the reason in
  ErrorComment and is recorded as rejected.
"""

import logging
import ssl
import time
from typing import List, Optional

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from edge.config import ScpConfig, TlsConfig
from edge.dicom.modality import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE
from edge.errors import ConfigError
from edge.ingest.intake import Intake
from edge.metrics import RuntimeMetrics

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)
UNCOMPRESSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
COMPRESSED_SYNTAXES = (
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
    JPEGBaseline8Bit, JPEGExtended12Bit,
)
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
_ERROR_COMMENT_MAX = 64  # LO


def supported_transfer_syntaxes() -> List[str]:
    """Uncompressed syntaxes, then the compressed ones pydicom has a working decoder for here."""
    from pydicom.pixels import get_decoder

    out = list(UNCOMPRESSED_SYNTAXES)
    for ts in COMPRESSED_SYNTAXES:
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except (NotImplementedError, ValueError):
            continue
    return out


def server_ssl_context(tls: TlsConfig, source: str = "config") -> ssl.SSLContext:
    """The TLS context of the SCP's listening socket."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{source}: scp.tls.certificate / scp.tls.private_key cannot be loaded: {e}") from None
    if tls.ca_certificates:
        try:
            ctx.load_verify_locations(cafile=tls.ca_certificates)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{source}: scp.tls.ca_certificates cannot be loaded: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return ds


class StorageSCP:
    """See the module docstring. :meth:`start` returns the bound port."""

    def __init__(self, config: ScpConfig, intake: Intake, metrics: Optional[RuntimeMetrics] = None,
                 source: str = "config"):
        from pynetdicom import AE

        self.config = config
        self.intake = intake
        self.metrics = metrics
        self._source = source
        ae = AE(ae_title=config.ae_title)
        syntaxes = supported_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        ae.maximum_associations = config.maximum_associations
        ae.require_calling_aet = list(config.allowed_calling_ae_titles)
        ae.require_called_aet = True  # a scanner configured with another AE title is refused, not served
        ae.network_timeout = config.network_timeout_s
        ae.acse_timeout = config.acse_timeout_s
        ae.dimse_timeout = config.dimse_timeout_s
        self.ae = ae
        self._server = None
        self._ssl = server_ssl_context(config.tls, source) if config.tls.enabled else None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else 0

    def start(self) -> int:
        from pynetdicom import evt

        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
        try:
            self._server = self.ae.start_server(
                (self.config.host, self.config.port), block=False, evt_handlers=handlers, ssl_context=self._ssl
            )
        except OSError as e:
            raise ConfigError(
                f"{self._source}: scp.host/scp.port {self.config.host}:{self.config.port} cannot be bound: {e.strerror or e}"
            ) from None
        log.info("storage SCP %s listening on %s:%d%s", self.config.ae_title, self.config.host, self.port,
                 " (TLS)" if self._ssl else "")
        return self.port

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress go on."""
        if self._server is not None:
            self._server.shutdown()

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server is not None else 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the associations in progress to end; True when none is left."""
        deadline = time.monotonic() + timeout
        while self.active_associations():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def abort_all(self) -> None:
        if self._server is not None:
            for assoc in list(self._server.active_associations):
                assoc.abort()

    def _on_store(self, event) -> Dataset:
        request = event.request
        key = str(request.AffectedSOPInstanceUID or "")
        caller = str(event.assoc.requestor.ae_title).strip()
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            encoded = event.encoded_dataset(include_meta=True)
        except Exception as e:  # pynetdicom/pydicom raise many kinds on a dataset they cannot decode
            result = self.intake.reject_undecodable(key, f"dataset cannot be decoded: {e}", f"scp:{caller}")
            return _status(result.status, result.reason)
        result = self.intake.offer_dataset(key, dataset, encoded, f"scp:{caller}",
                                           sop_class_uid=str(request.AffectedSOPClassUID or ""))
        if result.status != 0x0000:
            log.debug("C-STORE %s from %s answered 0x%04X: %s", key, caller, result.status, result.reason)
        return _status(result.status, result.reason if result.status != 0x0000 else "")

"""The calibration slices of a manifest as network inputs, made by the runtime's own preprocessing.

Each slice is decoded by :mod:`edge.dicom`, preprocessed by
:class:`edge.preprocess.cpu.CpuPreprocessor` and stacked with its 2.5D
neighbours by :func:`edge.preprocess.cpu.assemble_input` -- the code the device
runs -- with the neighbours the runtime would use (the manifest's ``stack``,
clamped at the series ends).

Also a polygraphy data loader script: polygraphy imports this file and iterates
:func:`load_data`, e.g.::

    polygraphy run model.onnx --onnxrt --trt --int8 --data-loader-script calib/data_loader.py

Environment for :func:`load_data`:

``CT_EDGE_CALIB_MANIFEST``  manifest (default ``engines/built/calibration_manifest.json``)
``CT_EDGE_CALIB_MODEL``     ONNX model whose embedded preprocessing spec and input name are used
                           (default ``edge/models/student.onnx``, else ``teacher.onnx``)
``CT_EDGE_CALIB_POOL``      pool folder, if it moved since the manifest was made
``CT_EDGE_CALIB_LIMIT``     use only the first N slices
``CT_EDGE_CALIB_BATCH``     slices per feed (default 1)
"""

import hashlib
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

if __package__ in (None, ""):  # loaded by file path (polygraphy --data-loader-script): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from edge.dicom import read_frames  # noqa: E402
from edge.errors import ConfigError, InputError  # noqa: E402
from edge.preprocess.cpu import CpuPreprocessor, assemble_input  # noqa: E402
from edge.preprocess.spec import PreprocessSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO / "engines" / "built" / "calibration_manifest.json"
MODEL_DIR = REPO / "edge" / "models"
ENV_MANIFEST = "CT_EDGE_CALIB_MANIFEST"
ENV_MODEL = "CT_EDGE_CALIB_MODEL"
ENV_POOL = "CT_EDGE_CALIB_POOL"
ENV_LIMIT = "CT_EDGE_CALIB_LIMIT"
ENV_BATCH = "CT_EDGE_CALIB_BATCH"
_PLANE_CACHE = 32


def default_model() -> Path:
    """The committed student, else the teacher (the runtime's own choice)."""
    for name in ("student.onnx", "teacher.onnx"):
        if (MODEL_DIR / name).is_file():
            return MODEL_DIR / name
    raise InputError(MODEL_DIR, "holds neither student.onnx nor teacher.onnx: give a model explicitly")


def model_interface(model_path):
    """(specs, input name, input dtype) of an ONNX model file, read through ONNX Runtime."""
    import onnxruntime as ort

    from edge.model_file import ModelSpecs

    try:
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several unrelated exception types for bad models
        raise InputError(model_path, f"not a loadable ONNX model: {e}") from None
    specs = ModelSpecs.from_metadata(sess.get_modelmeta().custom_metadata_map, source=model_path)
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    return specs, inp.name, np.dtype(dtype)


class CalibrationDataLoader:
    """``{input_name: (batch, C, H, W)}`` feeds over a manifest's slices (polygraphy's data-loader protocol)."""

    def __init__(self, manifest: Union[str, Path, dict], spec: PreprocessSpec, input_name: str = "input",
                 batch_size: int = 1, limit: Optional[int] = None, dtype=np.float32, pool_root=None):
        from calib.selection import read_manifest

        if isinstance(manifest, dict):
            self.manifest, self.source = manifest, "<manifest>"
        else:
            self.manifest, self.source = read_manifest(manifest), str(manifest)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"calibration batch size must be a positive integer, got {batch_size!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"calibration limit must be a positive integer, got {limit!r}")
        self.spec = spec
        self.input_name = input_name
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)
        self.entries = list(self.manifest["slices"])[:limit]
        if not self.entries:
            raise InputError(self.source, "the manifest lists no calibration slices")
        self.root = Path(pool_root) if pool_root is not None else Path(self.manifest["pool"]["root"])
        context = len(self.entries[0]["stack"]) // 2
        half = spec.slices // 2
        if half > context:
            raise ConfigError(f"{self.source}: the manifest keeps {context} neighbour(s) per side, the model's "
                              f"preprocess.slices={spec.slices} needs {half}: choose the slices again")
        self._window = slice(context - half, context + half + 1)
        self._planes: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self._preprocessor = CpuPreprocessor(spec)

    @classmethod
    def for_model(cls, model_path, manifest, **kwargs) -> "CalibrationDataLoader":
        """A loader with the preprocessing spec, input name and input dtype embedded in ``model_path``."""
        specs, name, dtype = model_interface(model_path)
        kwargs.setdefault("dtype", dtype)
        return cls(manifest, specs.preprocess, name, **kwargs)

    @property
    def n_slices(self) -> int:
        return len(self.entries)

    def __len__(self) -> int:
        return -(-len(self.entries) // self.batch_size)

    def _plane(self, path: str, frame: int, sop_uid: Optional[str] = None) -> np.ndarray:
        key = (path, frame)
        if key in self._planes:
            self._planes.move_to_end(key)
            return self._planes[key]
        file = self.root / path
        if not file.is_file():
            raise InputError(file, "calibration slice not found: pool moved? set CT_EDGE_CALIB_POOL or pool_root")
        found = next((f for f in read_frames(file) if f.frame_index == frame), None)
        if found is None:
            raise InputError(file, f"has no frame {frame}")
        if sop_uid is not None and found.sop_uid != sop_uid:
            raise InputError(file, f"holds SOP Instance UID {found.sop_uid}, the manifest expects {sop_uid}")
        plane = self._preprocessor.preprocess_frame(found)
        self._planes[key] = plane
        if len(self._planes) > _PLANE_CACHE:
            self._planes.popitem(last=False)
        return plane

    def network_input(self, entry: dict, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The (1, C, H, W) input centred on one manifest entry."""
        centre = len(entry["stack"]) // 2
        planes = []
        for i, (path, frame) in enumerate(entry["stack"][self._window], start=self._window.start):
            planes.append(self._plane(path, int(frame), entry["sop_uid"] if i == centre else None))
        if out is None:
            out = np.empty((1, self.spec.channels, self.spec.out_height, self.spec.out_width), self.dtype)
        return assemble_input(planes, self.spec, out)

    def batches(self) -> Iterator[np.ndarray]:
        """Fresh (B, C, H, W) arrays, the last batch possibly smaller."""
        for start in range(0, len(self.entries), self.batch_size):
            chunk = self.entries[start:start + self.batch_size]
            batch = np.empty((len(chunk), self.spec.channels, self.spec.out_height, self.spec.out_width), self.dtype)
            for b, entry in enumerate(chunk):
                self.network_input(entry, batch[b:b + 1])
            yield batch

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        for batch in self.batches():
            yield {self.input_name: batch}

    def sha256(self) -> str:
        """sha256 of every network input, in order: what "the calibration data" is, bit for bit."""
        h = hashlib.sha256()
        for batch in self.batches():
            h.update(np.ascontiguousarray(batch).tobytes())
        return h.hexdigest()


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


def loader_from_environment() -> CalibrationDataLoader:
    manifest = os.environ.get(ENV_MANIFEST) or DEFAULT_MANIFEST
    model = os.environ.get(ENV_MODEL) or default_model()
    return CalibrationDataLoader.for_model(model, manifest, batch_size=_env_int(ENV_BATCH) or 1,
                                           limit=_env_int(ENV_LIMIT), pool_root=os.environ.get(ENV_POOL) or None)


def load_data():
    """polygraphy's ``--data-loader-script`` entry point: feeds built from the environment (module docstring)."""
    yield from loader_from_environment()

"""Helpers for the ingest tests: a tiny analytic detector ONNX and small synthetic CT series on disk.

The detector is built with onnx.helper (no torch): the heatmap is a sigmoid of
the centre slice's lung-window value blurred by a 9x9 Gaussian, so it peaks at
the centre of each bright sphere and nowhere else; the size output is a constant
(``SIZE_PX`` model pixels) and the offsets are zero. Findings therefore have a
known place: the spheres written into the series, in patient mm.
"""

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from edge.decode.spec import DecodeSpec
from edge.model_file import ModelSpecs
from edge.preprocess.spec import PreprocessSpec

SIZE = 64  # pixels, source and model input
PIXEL_MM = 1.5
SLICE_MM = 2.0
LUNG_HU = -850
SPHERE_HU = 30
SIZE_PX = 2 * 7.0 / PIXEL_MM  # the model's constant size output: a 14 mm diameter
PATIENT_NAME = "SECRET^PATIENT"
PATIENT_ID = "PID-0042-SECRET"
BIRTH_DATE = "19451108"


def blob_specs() -> ModelSpecs:
    return ModelSpecs(
        PreprocessSpec(out_height=SIZE, out_width=SIZE, slices=3),
        DecodeSpec(stride=2, score_threshold=0.5, nms_kernel=3, max_detections_per_slice=8, link_distance_mm=5.0,
                   max_gap_slices=1, min_slices=2),
        {"name": "blob-test-detector", "version": "1.0"},
    )


def build_blob_model(path, specs: ModelSpecs = None) -> Path:
    specs = specs or blob_specs()
    c = specs.preprocess.channels
    centre = (specs.preprocess.slices // 2) * len(specs.preprocess.windows)
    k = np.arange(9) - 4.0
    g = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 2.0 ** 2))
    w_heat = np.zeros((1, c, 9, 9), np.float32)
    w_heat[0, centre] = g / g.sum()
    inits = [
        numpy_helper.from_array(w_heat, "w_heat"),
        numpy_helper.from_array(np.zeros((1, c, 9, 9), np.float32), "w_size"),
        numpy_helper.from_array(np.array([SIZE_PX], np.float32), "b_size"),
        numpy_helper.from_array(np.zeros((2, c, 9, 9), np.float32), "w_offset"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b_offset"),
        numpy_helper.from_array(np.array(0.62, np.float32), "threshold"),
        numpy_helper.from_array(np.array(20.0, np.float32), "gain"),
    ]
    conv = dict(strides=[2, 2], pads=[4, 4, 4, 4], kernel_shape=[9, 9])
    nodes = [
        helper.make_node("Conv", ["input", "w_heat"], ["blurred"], **conv),
        helper.make_node("Sub", ["blurred", "threshold"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["heatmap"]),
        helper.make_node("Conv", ["input", "w_size", "b_size"], ["size"], **conv),
        helper.make_node("Conv", ["input", "w_offset", "b_offset"], ["offset"], **conv),
    ]
    h = specs.preprocess.out_height
    w = specs.preprocess.out_width
    graph = helper.make_graph(
        nodes, "blob_detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["batch", 1, h // 2, w // 2]),
         helper.make_tensor_value_info("size", TensorProto.FLOAT, ["batch", 1, h // 2, w // 2]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, ["batch", 2, h // 2, w // 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, specs.to_metadata())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


@dataclass
class Sphere:
    x: float
    y: float
    z: float
    radius: float = 7.0


@dataclass
class SeriesOnDisk:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    paths: List[Path]  # instance order
    sop_uids: List[str]
    spheres: List[Sphere]


def render_slice(z: float, spheres: Sequence[Sphere], rng: np.random.Generator) -> np.ndarray:
    """Stored int16 values (slope 1, intercept -1024) of one axial slice."""
    origin = -(SIZE - 1) / 2 * PIXEL_MM
    coords = origin + PIXEL_MM * np.arange(SIZE)
    xx, yy = np.meshgrid(coords, coords)
    hu = np.full((SIZE, SIZE), float(LUNG_HU))
    for s in spheres:
        r2 = s.radius ** 2 - (z - s.z) ** 2
        if r2 > 0:
            hu[(xx - s.x) ** 2 + (yy - s.y) ** 2 <= r2] = SPHERE_HU
    hu += rng.normal(0, 8, hu.shape)
    return np.round(hu + 1024).astype(np.int16)


def ct_dataset(pixels: np.ndarray, z: float, number: int, study_uid: str, series_uid: str, for_uid: str,
               sop_uid: str = None, **overrides) -> Dataset:
    """A CT Image Storage dataset with file meta and patient attributes (to check none leak)."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.Manufacturer = "test"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-(SIZE - 1) / 2 * PIXEL_MM, -(SIZE - 1) / 2 * PIXEL_MM, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.SliceThickness = SLICE_MM
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.PixelData = pixels.astype("<i2").tobytes()
    for k, v in overrides.items():
        setattr(ds, k, v)
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_series(folder, n_slices: int = 12, spheres: Sequence[Sphere] = (Sphere(8.0, -6.0, 0.0),), seed: int = 0,
                 z0: float = None) -> SeriesOnDisk:
    """A small axial series (InstanceNumber 1.. along +z) written as one file per instance."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    z0 = -(n_slices - 1) / 2 * SLICE_MM if z0 is None else z0
    paths, uids = [], []
    for i in range(n_slices):
        z = z0 + i * SLICE_MM
        ds = ct_dataset(render_slice(z, spheres, rng), z, i + 1, study, series, for_uid)
        path = folder / f"IM{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(ds.SOPInstanceUID)
    return SeriesOnDisk(study, series, for_uid, paths, uids, list(spheres))


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sphere_hits(findings, spheres: Sequence[Sphere], tol_mm: float = 2.0) -> List[Tuple[Sphere, object]]:
    """(sphere, finding) pairs within ``tol_mm``."""
    hits = []
    for s in spheres:
        for f in findings:
            if np.linalg.norm([f.x - s.x, f.y - s.y, f.z - s.z]) <= tol_mm:
                hits.append((s, f))
    return hits


def enhanced_ct_dataset(n_frames: int = 12, spheres: Sequence[Sphere] = (Sphere(8.0, -6.0, 0.0),), seed: int = 0):
    """One Enhanced CT Image Storage instance holding a whole small series (per-frame positions)."""
    from pydicom.uid import EnhancedCTImageStorage

    rng = np.random.default_rng(seed)
    z0 = -(n_frames - 1) / 2 * SLICE_MM
    zs = [z0 + i * SLICE_MM for i in range(n_frames)]
    volume = np.stack([render_slice(z, spheres, rng) for z in zs])
    ds = ct_dataset(volume[0], zs[0], 1, generate_uid(), generate_uid(), generate_uid())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = n_frames
    ds.PixelData = volume.astype("<i2").tobytes()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept"):
        delattr(ds, keyword)
    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [PIXEL_MM, PIXEL_MM]
    shared.PixelMeasuresSequence[0].SliceThickness = SLICE_MM
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelValueTransformationSequence = [Dataset()]
    t = shared.PixelValueTransformationSequence[0]
    t.RescaleSlope, t.RescaleIntercept, t.RescaleType = 1, -1024, "HU"
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for z in zs:
        group = Dataset()
        group.PlanePositionSequence = [Dataset()]
        group.PlanePositionSequence[0].ImagePositionPatient = [-(SIZE - 1) / 2 * PIXEL_MM, -(SIZE - 1) / 2 * PIXEL_MM, z]
        group.CTImageFrameTypeSequence = [Dataset()]
        group.CTImageFrameTypeSequence[0].FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    return ds

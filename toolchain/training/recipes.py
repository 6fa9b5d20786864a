"""Default specs and architectures: the one place the model's input/output contract is set."""

from edge.decode.spec import DecodeSpec
from edge.preprocess.spec import WINDOW_PRESETS, PreprocessSpec
from toolchain.models.centernet_unet import OUTPUT_STRIDE

# 2.5D: three adjacent slices in the lung window, resampled to a fixed physical
# pixel size so nodule size in pixels does not depend on the scanner's spacing.
DEFAULT_PREPROCESS = PreprocessSpec(
    windows=(WINDOW_PRESETS["lung"],),
    out_height=256,
    out_width=256,
    slices=3,
    pixel_size_mm=1.5,
    mean=0.0,
    std=1.0,
    fill_hu=-1024.0,
)

# A low threshold keeps the whole FROC curve; operating points are chosen downstream.
# The 3-D shape prior (a nodule is about as deep as it is wide) was chosen by tools/tune_decode.py on
# validation series (training scanner profiles), never on the test split; each released model then gets its own
# decode spec with a false-positive rescorer (models/teacher/decode.json, models/student/decode.json).
DEFAULT_DECODE = DecodeSpec(
    stride=OUTPUT_STRIDE,
    score_threshold=0.05,
    nms_kernel=3,
    max_detections_per_slice=16,
    link_distance_mm=5.0,
    max_gap_slices=1,
    min_slices=1,
    max_elongation=0.9,
    min_z_span=0.8,
)

TEACHER_ARCH = {"in_channels": DEFAULT_PREPROCESS.channels, "widths": [32, 64, 128, 256, 320], "head_width": 32}

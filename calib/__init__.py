"""INT8 calibration: representative slices, activation ranges, Q/DQ ONNX, TensorRT calibration cache.

Modules: :mod:`~calib.selection` (stratified, reproducible choice of calibration
slices from a pool of DICOM series, saved as a manifest), :mod:`~calib.data_loader`
(the chosen slices through the runtime's own preprocessing; also a polygraphy
``--data-loader-script``), :mod:`~calib.ranges` (activation histograms and the
max / percentile / entropy / MSE ranges), :mod:`~calib.qdq` (explicit-quantization
Q/DQ ONNX for TensorRT and ONNX Runtime), :mod:`~calib.trt_cache` (TensorRT's
calibration cache text format, for implicit INT8 on TensorRT <= 10 and DLA),
:mod:`~calib.qdq_check` (TensorRT's Q/DQ rules, naming each offending node),
:mod:`~calib.accuracy` (FP32 vs INT8 error statistics, detection agreement, CPM),
:mod:`~calib.sweep` (CPM per calibration method and set size), :mod:`~calib.phantom_pool`
(the default pool of phantom series), :mod:`~calib.pipeline` (all steps in order, as
``tools/build_engine.py`` runs them). See docs/int8.md.
"""

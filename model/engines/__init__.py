"""The engine family: every way DitePose runs a pose network, behind one call and one builder.

    from ditepose.model.engines import build_engine
    engine = build_engine(module, "cuda", "fp16")          # backend "torch" (the default)
    engine = build_engine("d18.onnx", backend="onnxruntime")
    heatmaps = engine(crops)                               # CPU float32 NCHW in, heatmaps out

``build.py`` holds the backend table; ``base.py`` what an engine is and the one pad-and-split
of fixed-batch engines; ``precision.py`` the one spelling of precisions; one module per engine.
"""

from ditepose.model.engines.base import Engine, InferFn, buckets_up_to, run_in_buckets
from ditepose.model.engines.build import BACKENDS, Backend, EngineOptions, build_engine
from ditepose.model.engines.precision import (
    PRECISION_SETTINGS,
    PRECISIONS,
    Precision,
    PrecisionSetting,
    parse_precision,
    parse_precision_setting,
    resolve_precision,
)

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "PRECISION_SETTINGS",
    "Backend",
    "Engine",
    "EngineOptions",
    "InferFn",
    "Precision",
    "PrecisionSetting",
    "buckets_up_to",
    "build_engine",
    "parse_precision",
    "parse_precision_setting",
    "resolve_precision",
    "run_in_buckets",
]

"""The service layer: decode -> prepare -> batcher -> finish, shared by REST and gRPC.

Every front-end builds a :class:`PoseRequest` and calls :meth:`PoseService.estimate`
(asyncio) or :meth:`PoseService.estimate_sync` (threads); failures are
:class:`~service.errors.ServiceError` with a stable code.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from ditepose.model.pipeline import PersonPose, PreparedBatch, TopDownPipeline
from ditepose.service.batching.batcher import BatcherError, Overloaded
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.admission import Admission
from ditepose.service.core.errors import ServiceError, from_batcher_error
from ditepose.service.core.images import decode_image, encode_png
from ditepose.service.core.model_loader import LoadedModel
from ditepose.service.core.settings import Settings

DETECTORS = ("whole", "hog")


@dataclass
class PoseRequest:
    """One image and its options, independent of the transport."""

    image_bytes: bytes
    boxes: Sequence[Sequence[float]] | None = None
    model: str | None = None
    flip_test: bool = True
    decoder: str = "default"
    score_threshold: float | None = None
    detector: str = "whole"


@dataclass
class PoseResult:
    model: str
    width: int
    height: int
    persons: list[dict]
    timings: dict[str, float]
    image_rgb: np.ndarray = field(repr=False)
    poses: list[PersonPose] = field(repr=False)
    spec_name: str = "coco"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class PoseService:
    """Stateless per request; holds the pool, the settings, cached pipelines/detectors and the
    :class:`~service.admission.Admission` count every front-end takes a slot from."""

    def __init__(self, pool: WorkerPool, settings: Settings, admission: Admission | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.admission = admission or Admission(settings.resolved_max_in_flight, settings.retry_after_s)
        self._pipelines: dict[tuple[str, bool, str], TopDownPipeline] = {}
        self._detectors: dict[str, object] = {}
        self._lock = threading.Lock()
        # Per-request OpenCV work is one small warp per person: cv2's own thread pool only adds
        # hand-offs and competes with the inference threads for the cores (process-wide setting).
        cv2.setNumThreads(1)

    # ------------------------------------------------------------ pieces
    def resolve_model(self, name: str | None) -> LoadedModel:
        name = name or self.settings.default_model_name
        failed = getattr(self.pool, "failed_models", {})
        if name in failed:
            raise ServiceError("unavailable", f"model {name!r} failed to load: {failed[name]}")
        if name not in self.pool.models:
            known = ", ".join(sorted(self.pool.models))
            raise ServiceError("unknown_model", f"no model named {name!r}; served models: {known}")
        return self.pool.models[name]

    def pipeline(self, model: LoadedModel, flip_test: bool, decoder: str) -> TopDownPipeline:
        key = (model.name, bool(flip_test), decoder)
        with self._lock:
            pipe = self._pipelines.get(key)
            if pipe is None:
                try:
                    pipe = TopDownPipeline(model.input_size, model.spec, bool(flip_test), decoder)
                except ValueError as exc:
                    raise ServiceError("invalid_request", str(exc)) from exc
                self._pipelines[key] = pipe
        return pipe

    def detector(self, name: str) -> object:
        if name not in DETECTORS:
            raise ServiceError("invalid_request", f"unknown detector {name!r}; choose one of {DETECTORS}")
        with self._lock:
            det = self._detectors.get(name)
            if det is None:
                from ditepose.model.detectors import build_detector

                det = self._detectors[name] = build_detector(name)
        return det

    def check_boxes(self, boxes: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
        """Boxes as float32 [N, 4]; ``bad_boxes`` for anything the pipeline must not see."""
        if len(boxes) > self.settings.max_boxes:
            raise ServiceError("bad_boxes", f"{len(boxes)} boxes; at most {self.settings.max_boxes} per request")
        out = np.zeros((len(boxes), 4), np.float32)
        for i, box in enumerate(boxes):
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise ServiceError("bad_boxes", f"box {i} must be [x, y, w, h], got {box!r}")
            try:
                x, y, w, h = (float(v) for v in box)
            except (TypeError, ValueError) as exc:
                raise ServiceError("bad_boxes", f"box {i} must hold 4 numbers, got {box!r}") from exc
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise ServiceError("bad_boxes", f"box {i} is not finite: {box!r}")
            if w <= 0 or h <= 0:
                raise ServiceError("bad_boxes", f"box {i} has no area (w={w}, h={h})")
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                raise ServiceError("bad_boxes", f"box {i} {box!r} lies outside the {width}x{height} image")
            with np.errstate(over="ignore"):
                out[i] = (x, y, w, h)
            if not np.isfinite(out[i]).all():  # finite as float64 but past float32 (e.g. 1e300)
                raise ServiceError("bad_boxes", f"box {i} is too large to represent: {box!r}")
        return out

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.settings.max_upload_bytes, self.settings.max_image_pixels)

    def prepare(
        self, request: PoseRequest, image: np.ndarray
    ) -> tuple[LoadedModel, TopDownPipeline, PreparedBatch]:
        model = self.resolve_model(request.model)
        pipe = self.pipeline(model, request.flip_test, request.decoder)
        height, width = image.shape[:2]
        if request.boxes is not None:
            boxes, scores = self.check_boxes(request.boxes, width, height), None
        else:
            boxes, scores = self.detector(request.detector).detect(image)  # type: ignore[attr-defined]
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[: self.settings.max_boxes]
            scores = np.asarray(scores, np.float32).reshape(-1)[: len(boxes)]
        return model, pipe, pipe.prepare(image, boxes, scores)

    def finish(
        self,
        request: PoseRequest,
        model: LoadedModel,
        pipe: TopDownPipeline,
        prepared: PreparedBatch,
        heatmaps,
    ) -> tuple[list[PersonPose], list[dict]]:
        poses = pipe.finish(prepared, heatmaps)
        if request.score_threshold is not None:
            poses = [p for p in poses if p.score >= request.score_threshold]
        return poses, [p.to_dict(model.spec) for p in poses]

    # ------------------------------------------------------------ whole requests
    def admit(self, request: PoseRequest) -> None:
        """Shed at once when the model's queue is already full: no decode, no crops, no thread hop.

        The second of three checks: the in-flight count (:attr:`admission`, taken by the
        front-ends before reading a request) comes first, the batcher has the final say (it
        admits by the real crop count); this keeps a 429 from waiting behind the decoding of
        requests that cannot be served anyway."""
        model = self.resolve_model(request.model)
        batcher = self.pool.batcher(model.name)
        if batcher.depth >= batcher.queue_size:
            batcher.rejected += 1
            raise from_batcher_error(
                Overloaded(f"queue of model {model.name!r} is full ({batcher.depth} crops waiting)"),
                self.settings.retry_after_s,
            )

    def _decode_prepare(
        self, request: PoseRequest
    ) -> tuple[np.ndarray, float, LoadedModel, TopDownPipeline, PreparedBatch]:
        """Decode and crop in one go (one thread hop for the async path); the float is when decoding ended."""
        image = self.decode(request.image_bytes)
        decoded = time.perf_counter()
        return (image, decoded, *self.prepare(request, image))

    async def estimate(self, request: PoseRequest) -> PoseResult:
        """Run one request without blocking the event loop (decoding and cropping run in a thread)."""
        self.admit(request)
        t0 = time.perf_counter()
        # Announced before decoding, so a free worker waits for these crops rather than
        # running a partial batch without them (see DynamicBatcher.announce).
        batcher = self.pool.batcher(self.resolve_model(request.model).name)
        arrival = batcher.announce()
        try:
            image, t1, model, pipe, prepared = await asyncio.to_thread(self._decode_prepare, request)
            t2 = time.perf_counter()
            if len(prepared.crops) == 0:
                heatmaps = self._no_heatmaps(model)
            else:
                try:
                    heatmaps = await batcher.submit(prepared.crops, self.settings.request_timeout_s, arrival)
                except BatcherError as exc:
                    raise from_batcher_error(exc, self.settings.retry_after_s) from exc
        finally:
            arrival.settle()
        t3 = time.perf_counter()
        poses, persons = await asyncio.to_thread(self.finish, request, model, pipe, prepared, heatmaps)
        return self._result(model, image, poses, persons, (t0, t1, t2, t3, time.perf_counter()))

    def estimate_sync(self, request: PoseRequest) -> PoseResult:
        """The same as :meth:`estimate` for callers on threads (e.g. a gRPC thread pool)."""
        self.admit(request)
        t0 = time.perf_counter()
        batcher = self.pool.batcher(self.resolve_model(request.model).name)
        arrival = batcher.announce()
        try:
            image, t1, model, pipe, prepared = self._decode_prepare(request)
            t2 = time.perf_counter()
            if len(prepared.crops) == 0:
                heatmaps = self._no_heatmaps(model)
            else:
                try:
                    heatmaps = batcher.submit_sync(prepared.crops, self.settings.request_timeout_s, arrival)
                except BatcherError as exc:
                    raise from_batcher_error(exc, self.settings.retry_after_s) from exc
        finally:
            arrival.settle()
        t3 = time.perf_counter()
        poses, persons = self.finish(request, model, pipe, prepared, heatmaps)
        return self._result(model, image, poses, persons, (t0, t1, t2, t3, time.perf_counter()))

    @staticmethod
    def _no_heatmaps(model: LoadedModel) -> torch.Tensor:
        width, height = model.input_size
        return torch.zeros(0, model.num_joints, height // 4, width // 4)

    @staticmethod
    def _result(
        model: LoadedModel,
        image: np.ndarray,
        poses: list[PersonPose],
        persons: list[dict],
        marks: tuple[float, float, float, float, float],
    ) -> PoseResult:
        t0, t1, t2, t3, t4 = marks
        timings = {
            "decode_ms": _ms(t1 - t0),
            "preprocess_ms": _ms(t2 - t1),
            "inference_ms": _ms(t3 - t2),
            "postprocess_ms": _ms(t4 - t3),
            "total_ms": _ms(t4 - t0),
        }
        height, width = image.shape[:2]
        return PoseResult(model.name, width, height, persons, timings, image, poses, model.dataset)

    def render_png(self, result: PoseResult) -> bytes:
        """The image with the skeletons drawn on it, as PNG bytes."""
        from ditepose.model.draw import draw_poses

        model = self.pool.models[result.model]
        canvas = draw_poses(result.image_rgb, result.poses, model.spec)
        return encode_png(canvas)

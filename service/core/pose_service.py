"""The service layer: decode -> detect -> crops -> batcher -> finish, shared by REST and gRPC.

Detection (requests without boxes) with a :class:`~ditepose.model.detectors.StagedDetector`
(NanoDet, torchvision) is itself a batched stage on the worker pool: the image is preprocessed
in a thread, queued on the detector's batcher (``detect:<name>``), run with other requests'
images on a pose worker's device, and post-processed in a thread; in-thread detectors (whole
image, HOG) run beside decoding.

Every front-end builds a :class:`PoseRequest` and awaits :meth:`PoseService.estimate`;
failures are :class:`~ditepose.service.core.errors.ServiceError` with a stable code. Persons
travel as :class:`~ditepose.model.pipeline.PersonPose` inside the service and become JSON or
protobuf only at the edges (:mod:`ditepose.service.http.routes.pose`,
:mod:`ditepose.service.grpc.convert`).

Overload is answered by the parts that own the numbers: the front-ends hold an
:class:`~ditepose.service.core.admission.Admission` slot per request (or stream frame), and
the model's batcher says whether its queue would take more crops
(:meth:`~ditepose.service.batching.batcher.DynamicBatcher.check_admission`) before anything
is decoded, and has the final say when the crops are queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from ditepose.model.codec import DecoderName
from ditepose.model.detectors import DETECTORS, DetectorName, PersonDetector, StagedDetector
from ditepose.model.keypoints import KeypointSpec
from ditepose.model.pipeline import PersonPose, PreparedBatch, TopDownPipeline
from ditepose.model.weight_store import FETCH_COMMAND, NANODET, problems
from ditepose.service.batching.batcher import BatcherError, DeadlineExceeded
from ditepose.service.batching.interface import AnyBatcher, InferencePool
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.core.admission import Admission
from ditepose.service.core.detection import detector_options
from ditepose.service.core.errors import ServiceError, from_batcher_error
from ditepose.service.core.images import DecodeSlots, decode_image, encode_png
from ditepose.service.core.repository_watcher import ModelRepositoryWatcher
from ditepose.service.core.settings import Settings
from ditepose.service.core.slots import SharedSlots


@dataclass
class PoseRequest:
    """One image and its options, independent of the transport."""

    image_bytes: bytes
    boxes: Sequence[Sequence[float]] | None = None
    model: str | None = None
    flip_test: bool | None = None  # None: the model's serving option, else True
    decoder: DecoderName | None = None  # None: the model's serving option, else "default"
    score_threshold: float | None = None
    detector: DetectorName | None = None  # None: the service's default (Settings.detector)


@dataclass
class PoseResult:
    """The persons found in one image, with the model that found them and the stage timings."""

    model: str
    spec: KeypointSpec
    width: int
    height: int
    poses: list[PersonPose]
    timings: dict[str, float]
    image_rgb: np.ndarray = field(repr=False)
    model_version: str = ""  # the version whose forward pass produced ``poses``


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class PoseService:
    """Stateless per request; holds the pool, the settings, cached pipelines/detectors, the
    :class:`~ditepose.service.core.admission.Admission` count every front-end takes a slot from,
    and the watcher that manages the served models' versions (None: versions are not managed
    here, e.g. a front-end of ``--api-processes`` or a pool built by hand).

    The composition root (:mod:`ditepose.service.core.serving`) builds one and hands it to REST
    and gRPC."""

    def __init__(
        self, pool: InferencePool, settings: Settings, admission: Admission,
        versions: ModelRepositoryWatcher | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.admission = admission
        self.versions = versions
        # (name, version, input size, flip test, decoder) -> pipeline
        self._pipelines: dict[tuple[str, str, tuple[int, int], bool, str], TopDownPipeline] = {}
        self._detectors: dict[str, PersonDetector] = {}
        # Checked once (a sha256 over 7.6 MB): fetching the weights later takes a restart to be seen.
        self._weight_issues = problems(NANODET, settings.weights_dir)
        self._lock = threading.Lock()
        self._decodes = DecodeSlots(settings.max_concurrent_decodes)
        # detector inputs alive at once: two full detector batches per worker (see _detect_on_pool)
        workers = settings.resolved_workers_per_device() * len(settings.resolved_devices())
        self._detector_inputs = SharedSlots(2 * workers * settings.det_max_batch_size)
        # Per-request OpenCV work is one small warp per person: cv2's own thread pool only adds
        # hand-offs and competes with the inference threads for the cores (process-wide setting).
        cv2.setNumThreads(1)

    # ------------------------------------------------------------ pieces
    @property
    def default_model_name(self) -> str:
        """The model of requests that name none: the settings', else the pool's first."""
        return self.settings.default_model or self.pool.default_model or self.settings.default_model_name

    def resolve_model(self, name: str | None) -> LoadedModel:
        name = name or self.default_model_name
        failed = self.pool.failed_models
        if name in failed:
            raise ServiceError("unavailable", f"model {name!r} failed to load: {failed[name]}")
        if name not in self.pool.models:
            known = ", ".join(sorted(self.pool.models))
            raise ServiceError("unknown_model", f"no model named {name!r}; served models: {known}")
        return self.pool.models[name]

    @contextlib.contextmanager
    def take_model(self, name: str | None) -> Iterator[tuple[LoadedModel, AnyBatcher]]:
        """The served version of a model and its batcher, taken together once and held for the block
        (a swap meanwhile lets this request finish on the version it started with)."""
        model = self.resolve_model(name)
        with contextlib.ExitStack() as stack:
            try:
                entry = stack.enter_context(self.pool.lease(model.name))
            except KeyError:  # removed between the two looks
                raise ServiceError("unknown_model", f"no model named {model.name!r}") from None
            yield entry.model, entry.batcher

    def count_request(self, model: LoadedModel, outcome: str) -> None:
        """One answered request of ``model``'s version (``ditepose_model_requests_total``)."""
        self.pool.count_request(model.name, model.version, outcome)

    def pipeline(self, model: LoadedModel, flip_test: bool | None, decoder: str | None) -> TopDownPipeline:
        if flip_test is None:
            flip_test = True if model.flip_test is None else model.flip_test
        if decoder is None:
            decoder = model.decoder or "default"
        # by version too: two versions of a name may differ in input size
        key = (model.name, model.version, model.input_size, bool(flip_test), decoder)
        with self._lock:
            pipe = self._pipelines.get(key)
            if pipe is None:
                if len(self._pipelines) > 256:  # versions come and go; pipelines are cheap to rebuild
                    self._pipelines.clear()
                try:
                    # uint8 crops: a quarter of float32's memory while they wait in the queue; the
                    # batch normalises them when it is assembled (service/batching/assembly.py)
                    pipe = TopDownPipeline(model.input_size, model.spec, bool(flip_test), decoder,
                                           normalize_on_cpu=False, crop_backend=self.settings.crop_backend)
                except ValueError as exc:
                    raise ServiceError("invalid_request", str(exc)) from exc
                self._pipelines[key] = pipe
        return pipe

    @property
    def default_detector(self) -> str:
        """The detector of requests that name none: ``Settings.detector``, 'auto' resolved."""
        if self.settings.detector != "auto":
            return self.settings.detector
        return "whole" if self._weight_issues else "nanodet"

    def detector_status(self) -> dict[str, str]:
        """For /readyz and /v1/models: each detector that needs files, 'ready' or what is missing."""
        issues = self._weight_issues
        return {"nanodet": "ready" if not issues else
                f"unavailable: {'; '.join(issues)}; run `{FETCH_COMMAND}` and restart"}

    def detector(self, name: str | None) -> PersonDetector:
        """The detector ``name`` (None: the default), built once; a staged one (NanoDet,
        torchvision) also joins the worker pool, so its forward passes are batched across
        requests on the pose network's devices."""
        name = name or self.default_detector
        if name not in DETECTORS:
            raise ServiceError("invalid_request", f"unknown detector {name!r}; choose one of {DETECTORS}")
        with self._lock:
            det = self._detectors.get(name)
            if det is None:
                from ditepose.model.detectors import build_detector

                options = self._detector_options(name)
                try:
                    det = self._detectors[name] = build_detector(name, **options)
                except (ValueError, TypeError, FileNotFoundError) as exc:
                    raise ServiceError("unavailable", f"detector {name!r} cannot run here: {exc}") from exc
        if isinstance(det, StagedDetector) and self.pool.detector_batcher(det.name) is None:
            self.pool.add_detector(det, self.settings.det_max_batch_size)
        return det

    def _detector_options(self, name: str) -> dict[str, object]:
        """Constructor options of detector ``name`` from the settings (nothing is ever downloaded)."""
        return detector_options(self.settings, name)

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
        """The upload as RGB pixels, decoded in one of ``max_concurrent_decodes`` slots (see DecodeSlots)."""
        with self._decodes.slot():
            return decode_image(data, self.settings.max_upload_bytes, self.settings.max_image_pixels)

    def crops(
        self, request: PoseRequest, model: LoadedModel, image: np.ndarray,
        boxes: np.ndarray, scores: np.ndarray | None,
    ) -> tuple[TopDownPipeline, PreparedBatch]:
        """The affine crops of ``boxes`` (caller's, checked; or detected, capped at ``max_boxes``)."""
        pipe = self.pipeline(model, request.flip_test, request.decoder)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[: self.settings.max_boxes]
        if scores is not None:
            scores = np.asarray(scores, np.float32).reshape(-1)[: len(boxes)]
        return pipe, pipe.prepare(image, boxes, scores)

    def finish(
        self, request: PoseRequest, pipe: TopDownPipeline, prepared: PreparedBatch, heatmaps: torch.Tensor
    ) -> list[PersonPose]:
        poses = pipe.finish(prepared, heatmaps)
        if request.score_threshold is not None:
            poses = [p for p in poses if p.score >= request.score_threshold]
        return poses

    # ------------------------------------------------------------ whole requests
    def _decode_detect_input(
        self, request: PoseRequest
    ) -> tuple[np.ndarray, float, StagedDetector | None, tuple[np.ndarray, np.ndarray | None] | None]:
        """Decode (one thread hop), then the boxes if they need no pool: the caller's, or an
        in-thread detector's (whole image, HOG). For a staged detector, it comes back instead
        (its input is made later, see :meth:`_detect_on_pool`). The float is when decoding ended.
        The detector is resolved (and built, the first time) only after the image decoded: a bad
        upload is a 4xx whatever detector it names."""
        image = self.decode(request.image_bytes)
        decoded = time.perf_counter()
        height, width = image.shape[:2]
        if request.boxes is not None:
            return image, decoded, None, (self.check_boxes(request.boxes, width, height), None)
        detector = self.detector(request.detector)
        if isinstance(detector, StagedDetector):
            try:
                self._detector_batcher(detector).check_admission()
            except BatcherError as exc:
                raise from_batcher_error(exc, self.settings.retry_after_s) from exc
            return image, decoded, detector, None
        return image, decoded, None, detector.detect(image)

    def _detector_batcher(self, detector: StagedDetector) -> AnyBatcher:
        """The pool's batcher of ``detector``, added again if the pool was rebuilt since it was cached."""
        batcher = self.pool.detector_batcher(detector.name)
        return batcher if batcher is not None else self.pool.add_detector(detector, self.settings.det_max_batch_size)

    def _goes_through_detector_queue(self, request: PoseRequest) -> bool:
        """Whether the request's boxes come from a staged detector (unbuilt detectors count as staged)."""
        if request.boxes is not None:
            return False
        det = self._detectors.get(request.detector or self.default_detector)
        return det is None or isinstance(det, StagedDetector)

    def _preprocess(self, detector: StagedDetector, image: np.ndarray) -> torch.Tensor:
        with self._decodes.slot():  # CPU work on the pixels like decoding, and a resized copy of them
            return detector.preprocess(image)

    async def _decode_and_detect(
        self, request: PoseRequest, deadline: float
    ) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray | None]]:
        """The image, when decoding ended, and the boxes (with their scores, None for the caller's).

        A request whose boxes come from a staged detector is decoded, turned into the detector's
        input and run only once one of the ``detector_inputs`` slots is free, and holds the slot
        until its detector batch ran. Why: made at once, every request of a burst held its decoded
        image (riders.jpg: 0.8 MiB) and its float32 detector input (NanoDet 416x416x3: 2 MiB, not
        exactly storable as uint8) while it waited its turn: at the admission limit (288) ~800 MiB.
        Waiting, a request holds only its encoded bytes. The slots are every worker's next two
        detector batches, so batches stay full."""
        if not self._goes_through_detector_queue(request):
            image, decoded, _, found = await asyncio.to_thread(self._decode_detect_input, request)
            return image, decoded, found  # type: ignore[return-value]
        try:
            async with self._detector_inputs.slot(deadline - time.perf_counter()):
                image, decoded, detector, found = await asyncio.to_thread(self._decode_detect_input, request)
                if found is not None:  # the detector turned out to run in-thread (built just now)
                    return image, decoded, found
                assert detector is not None
                batcher = self._detector_batcher(detector)
                detector_input = await asyncio.to_thread(self._preprocess, detector, image)
                candidates = await batcher.submit(detector_input, max(deadline - time.perf_counter(), 1e-3))
                del detector_input
        except TimeoutError as exc:
            raise from_batcher_error(DeadlineExceeded(f"no detector slot within the deadline: {exc}"),
                                     self.settings.retry_after_s) from exc
        except BatcherError as exc:
            raise from_batcher_error(exc, self.settings.retry_after_s) from exc
        return image, decoded, await asyncio.to_thread(detector.postprocess, candidates[0], image.shape[:2])

    async def estimate(self, request: PoseRequest) -> PoseResult:
        """Run one request without blocking the event loop: decoding, cropping and decoding the
        heatmaps run in threads; detection (if the request has no boxes) and the network run as
        batches on the worker pool, shared with every other request."""
        with self.take_model(request.model) as (model, batcher):  # once per request
            try:
                result = await self._estimate(request, model, batcher)
            except BaseException:
                self.count_request(model, "error")
                raise
            self.count_request(model, "ok")
            return result

    async def _estimate(self, request: PoseRequest, model: LoadedModel, batcher: AnyBatcher) -> PoseResult:
        try:
            batcher.check_admission()  # shed before decoding what the queue could not take anyway
        except BatcherError as exc:
            raise from_batcher_error(exc, self.settings.retry_after_s) from exc
        t0 = time.perf_counter()
        deadline = t0 + self.settings.request_timeout_s
        # Announced before decoding, so a free worker waits for these crops rather than running a
        # partial batch without them (see DynamicBatcher.announce). A request that goes through
        # the detector's queue first announces its crops only once its boxes are known.
        arrival = None if self._goes_through_detector_queue(request) else batcher.announce()
        try:
            image, t1, found = await self._decode_and_detect(request, deadline)
            if arrival is None:
                arrival = batcher.announce()
            timeout_s = max(deadline - time.perf_counter(), 1e-3)  # one deadline for detection and pose
            t_detect = t1 if request.boxes is not None else time.perf_counter()
            pipe, prepared = await asyncio.to_thread(self.crops, request, model, image, *found)
            t2 = time.perf_counter()
            if len(prepared.crops) == 0:
                heatmaps = torch.zeros(0, *pipe.heatmap_shape)
            else:
                try:
                    heatmaps = await batcher.submit(prepared.crops, timeout_s, arrival)
                except BatcherError as exc:
                    raise from_batcher_error(exc, self.settings.retry_after_s) from exc
        finally:
            if arrival is not None:
                arrival.settle()
        t3 = time.perf_counter()
        poses = await asyncio.to_thread(self.finish, request, pipe, prepared, heatmaps)
        return self._result(model, image, poses, (t0, t1, t_detect, t2, t3, time.perf_counter()))

    @staticmethod
    def _result(
        model: LoadedModel, image: np.ndarray, poses: list[PersonPose],
        marks: tuple[float, float, float, float, float, float],
    ) -> PoseResult:
        t0, t1, t_detect, t2, t3, t4 = marks
        timings = {
            "decode_ms": _ms(t1 - t0),
            "detect_ms": _ms(t_detect - t1),
            "preprocess_ms": _ms(t2 - t_detect),
            "inference_ms": _ms(t3 - t2),
            "postprocess_ms": _ms(t4 - t3),
            "total_ms": _ms(t4 - t0),
        }
        height, width = image.shape[:2]
        return PoseResult(model.name, model.spec, width, height, poses, timings, image, model.version)

    def render_png(self, result: PoseResult) -> bytes:
        """The image with the skeletons drawn on it, as PNG bytes."""
        from ditepose.model.draw import draw_poses

        canvas = draw_poses(result.image_rgb, result.poses, result.spec)
        return encode_png(canvas)


@dataclass
class ReloadOutcome:
    """What a reload did: the model's version state after it, and whether another version now serves."""

    state: dict
    swapped: bool
    previous_version: str | None


async def reload_model(service: PoseService, name: str) -> ReloadOutcome:
    """``POST /v1/models/{name}/reload`` and gRPC ``ReloadModel``: resolve, load, check and swap now
    (in a thread: a load takes seconds, and a swap may first wait for the previous old version
    to drain). A version that fails its checks is in the outcome's state, not an error."""
    watcher = service.versions
    if not name:
        raise ServiceError("invalid_request", "name the model to reload")
    if watcher is None:
        raise ServiceError("unavailable", "this service was started without model version management "
                                          "(a pool built outside `ditepose serve`); restart to load new weights")
    before = watcher.describe(name)
    try:
        state = await asyncio.to_thread(watcher.reload, name)
    except KeyError:
        known = ", ".join(sorted(service.pool.models))
        where = f" or the repository {watcher.repository}" if watcher.repository is not None else ""
        raise ServiceError("unknown_model", f"no model named {name!r} among the served models ({known}){where}") \
            from None
    after = state.describe()
    swapped = after.get("swapped_at") != before.get("swapped_at") and after.get("served_version") is not None
    return ReloadOutcome(after, swapped, before.get("served_version"))

"""Translation between the gRPC messages and the transport-free service layer.

Also maps the service's stable error codes (shared with REST) to gRPC status codes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import grpc
import numpy as np

from ditepose.model.keypoints import KeypointSpec
from ditepose.model.pipeline import PersonPose
from ditepose.model.quality import ModelQuality
from ditepose.proto.ditepose.v1 import pose_pb2
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.core.errors import ServiceError
from ditepose.service.core.pose_service import PoseRequest, PoseResult

ERROR_CODE_METADATA = "ditepose-error-code"

GRPC_STATUS: dict[str, grpc.StatusCode] = {
    "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
    "not_an_image": grpc.StatusCode.INVALID_ARGUMENT,
    "undecodable": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_boxes": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown_model": grpc.StatusCode.NOT_FOUND,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "inference_failed": grpc.StatusCode.INTERNAL,
    "out_of_memory": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "method_not_allowed": grpc.StatusCode.UNIMPLEMENTED,
    "internal": grpc.StatusCode.INTERNAL,
}


def status_of(error: ServiceError) -> grpc.StatusCode:
    return GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL)


def boxes_from_proto(boxes: Iterable[pose_pb2.Box]) -> list[list[float]] | None:
    """Boxes as [[x, y, w, h]]; no boxes -> None (the detector finds the persons)."""
    out = [[b.x, b.y, b.width, b.height] for b in boxes]
    return out or None


def request_from_proto(
    image: bytes, boxes: Iterable[pose_pb2.Box], options: pose_pb2.PoseOptions
) -> PoseRequest:
    """A :class:`PoseRequest`; unset options stay None, so the model's serving options (else the
    REST API's defaults) apply, as for REST."""
    threshold: float | None = None
    if options.HasField("score_threshold"):
        threshold = float(options.score_threshold)
        if not math.isfinite(threshold):
            raise ServiceError("invalid_request", f"score_threshold must be finite, got {threshold}")
    return PoseRequest(
        image_bytes=bytes(image),
        boxes=boxes_from_proto(boxes),
        model=options.model or None,
        flip_test=options.flip_test if options.HasField("flip_test") else None,  # None: the model's option
        decoder=options.decoder or None,  # type: ignore[arg-type]  # checked when the pipeline is built
        score_threshold=threshold,
        detector=options.detector or None,  # type: ignore[arg-type]  # checked by PoseService.detector
    )


def timings_to_proto(timings: dict[str, float]) -> pose_pb2.Timings:
    return pose_pb2.Timings(**{k: float(v) for k, v in timings.items() if k in pose_pb2.Timings.DESCRIPTOR.fields_by_name})


def person_to_proto(
    pose: PersonPose, spec: KeypointSpec, track_id: int = 0, keypoints_xy: np.ndarray | None = None
) -> pose_pb2.Person:
    """The gRPC edge of one person; ``keypoints_xy`` [K, 2] replaces x/y (smoothing)."""
    x, y, w, h = (round(float(v), 2) for v in pose.bbox_xywh)
    xy = pose.keypoints[:, :2] if keypoints_xy is None else keypoints_xy
    kpts = [
        pose_pb2.Keypoint(name=name, x=float(kx), y=float(ky), score=float(s))
        for name, (kx, ky), s in zip(spec.joint_names, xy.tolist(), pose.keypoints[:, 2].tolist(), strict=True)
    ]
    return pose_pb2.Person(
        bbox=pose_pb2.Box(x=x, y=y, width=w, height=h), score=float(pose.score), keypoints=kpts, track_id=track_id
    )


def estimate_response(result: PoseResult) -> pose_pb2.EstimateResponse:
    return pose_pb2.EstimateResponse(
        model=result.model,
        width=result.width,
        height=result.height,
        persons=[person_to_proto(p, result.spec) for p in result.poses],
        timings=timings_to_proto(result.timings),
        model_version=result.model_version,
    )


def model_info(model: LoadedModel, default: bool, state: dict | None = None) -> pose_pb2.ModelInfo:
    """``state``: the model's version bookkeeping (:meth:`ModelState.describe`), when there is one."""
    width, height = model.input_size
    state = state or {}
    return pose_pb2.ModelInfo(
        version=model.version,
        source=state.get("source") or model.source,
        available_versions=state.get("available_versions") or [],
        pinned_version=state.get("pinned_version") or 0,
        state=state.get("state") or "serving",
        error=state.get("error") or "",
        failed_versions=state.get("failed_versions") or {},
        name=model.name,
        arch=model.arch,
        dataset=model.dataset,
        num_joints=model.num_joints,
        joints=list(model.spec.joint_names),
        input_width=width,
        input_height=height,
        demo_weights=model.demo_weights,
        default=default,
        quality=quality_message(model.quality),
        engines={device: engine_message(choice) for device, choice in model.engines.items()},
    )


def engine_message(choice: dict) -> pose_pb2.EngineInfo:
    """One device's engine choice (``EngineChoice.to_dict()``) as the proto's ``EngineInfo``."""
    agreement = choice.get("agreement")
    message = pose_pb2.EngineInfo(backend=choice["backend"], precision=choice["precision"], reason=choice["reason"])
    if agreement is not None:
        message.agreement.CopyFrom(pose_pb2.Agreement(
            passed=agreement["passed"], moved_share=agreement["moved_share"], moved=agreement["moved"],
            joints=agreement["joints"], max_px=_or_minus_one(agreement["max_px"]),
            p99_px=_or_minus_one(agreement["p99_px"]), shift_px=agreement["shift_px"],
            max_moved_share=agreement["max_moved_share"], verdict=agreement["verdict"]))
    return message


def _or_minus_one(value: float | None) -> float:
    return -1.0 if value is None else value


def quality_message(quality: ModelQuality) -> pose_pb2.ModelQuality:
    """The checkpoint's recorded evaluation as the proto's ``ModelQuality`` (empty strings for None)."""
    return pose_pb2.ModelQuality(
        evaluated=quality.evaluated, note=quality.note, dataset=quality.dataset or "", boxes=quality.boxes or "",
        metric=quality.metric or "", value=quality.value or 0.0, metrics=quality.metrics,
        demo_checkpoint=quality.demo_checkpoint,
    )


def person_dict(person: pose_pb2.Person) -> dict:
    """A result person as the REST JSON shape (plus ``track_id``); used by clients and tests."""
    b = person.bbox
    return {
        "bbox": [b.x, b.y, b.width, b.height],
        "score": person.score,
        "keypoints": [{"name": k.name, "x": k.x, "y": k.y, "score": k.score} for k in person.keypoints],
        "track_id": person.track_id,
    }


def keypoints_array(person: pose_pb2.Person) -> np.ndarray:
    """[K, 3] (x, y, score) of a result person."""
    return np.array([[k.x, k.y, k.score] for k in person.keypoints], np.float64).reshape(-1, 3)

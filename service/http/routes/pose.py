"""``POST /v1/pose``: one image (multipart upload or base64 JSON) -> keypoints or a PNG."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from ditepose.model.codec import DECODER_NAMES
from ditepose.model.detectors import DETECTORS
from ditepose.service.core.errors import ServiceError
from ditepose.service.core.pose_service import PoseRequest, PoseResult
from ditepose.service.core.untrusted_json import ANY_JSON, JSON_OBJECT, read_json
from ditepose.service.http.deps import PoseServiceDep
from ditepose.service.http.routes import error_responses
from ditepose.service.http.schemas import (
    ImageSize,
    Person,
    PoseJsonRequest,
    PoseOptions,
    PoseResponse,
    Timings,
)

router = APIRouter(prefix="/v1", tags=["pose"])

# The largest multipart text field (the boxes' JSON included): 10,000 boxes fit in about 200 KB.
MAX_FIELD_BYTES = 1024 * 1024

_OPTION_FIELDS = ("model", "flip_test", "decoder", "score_threshold", "detector")

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG or WebP file."},
        "boxes": {"type": "string", "description": 'JSON list of [x, y, w, h] boxes, e.g. "[[10,20,100,200]]".'},
        "model": {"type": "string"},
        "flip_test": {"type": "boolean", "default": True},
        "decoder": {"type": "string", "enum": list(DECODER_NAMES)},
        "score_threshold": {"type": "number", "description": "Drop persons scoring below this."},
        "detector": {"type": "string", "enum": list(DETECTORS),
                     "description": "Without boxes: the person detector (default: the server's, see GET /v1/models)."},
    },
}

_ERRORS = error_responses("unknown_model", "too_large", "not_an_image", "invalid_request", "undecodable", "bad_boxes",
                          "overloaded", "inference_failed", "unavailable", "timeout")


def _invalid(exc: ValidationError) -> ServiceError:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
    return ServiceError("invalid_request", "; ".join(parts))


async def _from_multipart(request: Request, max_bytes: int) -> PoseRequest:
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise ServiceError("invalid_request", f"bad multipart body: {exc.message}") from exc
    except HTTPException as exc:  # starlette turns MultiPartException into a 400 inside an app; ours is 422
        raise ServiceError("invalid_request", f"bad multipart body: {exc.detail}") from exc
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ServiceError("invalid_request", "multipart field 'image' (a file) is required")
        if upload.size is not None and upload.size > max_bytes:
            raise ServiceError("too_large", f"the image has {upload.size} bytes; the limit is {max_bytes}")
        data = await upload.read(max_bytes + 1)
        fields: dict[str, object] = {k: form[k] for k in _OPTION_FIELDS if isinstance(form.get(k), str) and form[k] != ""}
        raw_boxes = form.get("boxes")
        if isinstance(raw_boxes, str) and raw_boxes.strip():
            fields["boxes"] = read_json(raw_boxes, ANY_JSON, field="boxes", max_bytes=MAX_FIELD_BYTES, code="bad_boxes")
    finally:
        await form.close()
    return _to_request(data, fields)


async def _from_json(request: Request, max_bytes: int) -> PoseRequest:
    payload: dict = read_json(await request.body(), JSON_OBJECT, field="body", max_bytes=max_bytes)
    image_b64 = payload.pop("image", None)
    if not isinstance(image_b64, str):
        raise ServiceError("invalid_request", "JSON field 'image' (base64 string) is required")
    try:
        data = base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError("invalid_request", f"'image' is not valid base64: {exc}") from exc
    return _to_request(data, payload)


def json_body_limit(max_upload_bytes: int) -> int:
    """The JSON form's body limit: base64 is 4/3 of the image, plus the other fields (the same
    bound as the app's body-size middleware, which refuses larger bodies before they are read)."""
    return max_upload_bytes * 4 // 3 + 64 * 1024


def _to_request(data: bytes, fields: dict) -> PoseRequest:
    boxes = fields.pop("boxes", None)
    if boxes is not None and not isinstance(boxes, list):
        raise ServiceError("bad_boxes", "'boxes' must be a list of [x, y, w, h]")
    try:
        options = PoseOptions.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc) from exc
    return PoseRequest(
        image_bytes=data,
        boxes=boxes,
        model=options.model,
        flip_test=options.flip_test,
        decoder=options.decoder,
        score_threshold=options.score_threshold,
        detector=options.detector,
    )


@router.post(
    "/pose",
    response_model=PoseResponse,
    responses={
        **_ERRORS,
        200: {"content": {"image/png": {}}, "description": "Keypoints (JSON) or, with ?render=png, the drawing."},
    },
    summary="Estimate the poses of the persons in one image",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
                "application/json": {"schema": PoseJsonRequest.model_json_schema()},
            },
        }
    },
)
async def estimate_pose(
    request: Request,
    service: PoseServiceDep,
    render: Literal["json", "png"] = Query("json", description="'png' returns the image with skeletons drawn."),
) -> PoseResponse | Response:
    """Upload an image (multipart field `image`, or base64 in a JSON body) with optional person
    boxes; get 2D keypoints in image pixels. No URL fetching: send the bytes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        pose_request = await _from_multipart(request, service.settings.max_upload_bytes)
    elif content_type in ("application/json", ""):
        pose_request = await _from_json(request, json_body_limit(service.settings.max_upload_bytes))
    else:
        raise ServiceError("not_an_image", f"send multipart/form-data or application/json, not {content_type!r}")
    result = await service.estimate(pose_request)
    if render == "png":
        png = service.render_png(result)
        return Response(png, media_type="image/png", headers={"X-Persons": str(len(result.poses)),
                                                              "X-Model-Version": result.model_version})
    return pose_response(result)


def pose_response(result: PoseResult) -> PoseResponse:
    """The REST edge of a result: each :class:`PersonPose` in its JSON form (as ``ditepose predict`` writes it)."""
    return PoseResponse(
        model=result.model,
        model_version=result.model_version,
        image=ImageSize(width=result.width, height=result.height),
        timings=Timings(**result.timings),
        persons=[Person.model_validate(pose.to_dict(result.spec)) for pose in result.poses],
    )

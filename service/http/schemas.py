"""Request and response bodies of the REST API (pydantic v2, shown in OpenAPI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ditepose.model.codec import DecoderName
from ditepose.model.detectors import DetectorName
from ditepose.service.batching.worker import WorkerStatus


class PoseOptions(BaseModel):
    """Options shared by the multipart and the JSON form of ``POST /v1/pose``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    boxes: list[list[float]] | None = Field(
        default=None,
        description="Person boxes [x, y, w, h] in image pixels. Omitted: the `detector` finds them.",
        examples=[[[120.0, 40.0, 200.0, 400.0]]],
    )
    model: str | None = Field(default=None, description="Served model name (see GET /v1/models); default first.")
    flip_test: bool | None = Field(default=None, description="Average with the horizontally mirrored crop "
                                   "(paper's test). Omitted: the model's serving option, else true.")
    decoder: DecoderName | None = Field(
        default=None,
        description="Heatmap decoding: 'default' (argmax + quarter-pixel shift, as in the paper), "
        "'dark' (alias 'unbiased': DARK Taylor refinement), 'argmax' (alias 'none': plain argmax). Omitted: the "
        "model's serving option, else 'default'.",
    )
    score_threshold: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Persons whose score is below this are left out (scores are heatmap peaks, "
        "about 0..1 for trained weights). None keeps every person.",
    )
    detector: DetectorName | None = Field(
        default=None,
        description="Used only without `boxes`: 'nanodet' (a COCO person detector, the default when its weights "
        "are cached), 'whole' (the whole image is one person box), 'hog' (OpenCV's HOG people detector), "
        "'torchvision' (needs configured weights). Omitted: the server's default (see GET /v1/models). A detector "
        "whose weights are missing answers 503 `unavailable`, naming the command that fetches them.",
    )


class PoseJsonRequest(PoseOptions):
    """JSON form of ``POST /v1/pose``: the image travels base64-encoded."""

    image: str = Field(description="Base64 of the JPEG, PNG or WebP file bytes (no data: URL, no http URL).")


class Keypoint(BaseModel):
    name: str = Field(description="Joint name, e.g. 'left_wrist'.")
    x: float = Field(description="Column in image pixels.")
    y: float = Field(description="Row in image pixels.")
    score: float = Field(description="Heatmap peak value (confidence, not a probability).")


class Person(BaseModel):
    bbox: list[float] = Field(description="The person box [x, y, w, h] the keypoints were estimated in.")
    score: float = Field(description="Person score (box score times mean keypoint confidence).")
    keypoints: list[Keypoint] = Field(description="One entry per joint of the model's dataset, in its order.")


class ImageSize(BaseModel):
    width: int
    height: int


class Timings(BaseModel):
    """Milliseconds spent in each stage of this request."""

    decode_ms: float = Field(description="Reading the upload and decoding the image.")
    detect_ms: float = Field(default=0.0, description="Person detection: 0 when the request gave boxes; for "
                             "NanoDet/torchvision the detector queue's wait plus its batched forward pass.")
    preprocess_ms: float = Field(description="Affine crops of the persons' boxes.")
    inference_ms: float = Field(description="Waiting in the batch queue plus the forward pass.")
    postprocess_ms: float = Field(description="Heatmap decoding back to image coordinates.")
    total_ms: float = Field(description="Whole request inside the service.")


class PoseResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(description="Model that answered.")
    model_version: str = Field(default="", description="The version of that model whose forward pass produced "
                               "these persons (see GET /v1/models `version`).")
    image: ImageSize
    timings: Timings
    persons: list[Person]


class ModelQualityInfo(BaseModel):
    """The evaluation the served checkpoint records, or why there is none (``model/quality.py``)."""

    evaluated: bool = Field(description="False: nothing recorded (random weights, or no evaluation in the checkpoint).")
    note: str = Field(description="One plain sentence for people (e.g. that the demo checkpoint is not usable "
                      "on real photos).")
    dataset: str | None = Field(default=None, description="What it was evaluated on, when the checkpoint says.")
    boxes: str | None = Field(default=None, description="'gt' or the detector whose boxes were used.")
    metric: str | None = Field(default=None, description="The primary metric: 'AP' (COCO) or 'PCKh' (MPII).")
    value: float | None = Field(default=None, description="The primary metric's value.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Every recorded metric.")
    demo_checkpoint: bool = Field(default=False, description="True: the project's shipped demo checkpoint.")


class AgreementInfo(BaseModel):
    passed: bool
    moved_share: float = Field(description="Share of (crop, joint) pairs further than `shift_px` from the fp32 "
                               "torch engine on the reference crops.")
    moved: int
    joints: int
    max_px: float | None = Field(description="Largest keypoint distance, input pixels (null: a non-finite output).")
    p99_px: float | None = Field(description="The worst joint's 99th-percentile distance, input pixels.")
    shift_px: float = Field(description="A joint further than this moved.")
    max_moved_share: float = Field(description="More moved joints than this share: the precision is refused.")
    verdict: str


class EngineInfo(BaseModel):
    backend: str = Field(description="'openvino' or 'torch'.")
    precision: str = Field(description="'fp32', 'bf16' or 'fp16' (CUDA).")
    reason: str = Field(description="Why this engine serves (engine setting, OpenVINO absent or refused, device).")
    agreement: AgreementInfo | None = Field(default=None, description="The agreement gate's summary; null for the "
                                            "fp32 torch engine (the reference) and CUDA engines.")


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    arch: str
    dataset: str
    num_joints: int
    joints: list[str]
    skeleton: list[list[int]] = Field(default_factory=list, description="Limbs as pairs of indices into `joints`.")
    input_size: list[int] = Field(description="Network input [W, H].")
    checkpoint: str | None
    demo_weights: bool = Field(description="True: random weights (no checkpoint found); poses are meaningless.")
    quality: ModelQualityInfo = Field(description="What the checkpoint is known to score: read `note` before "
                                      "trusting a pose (the shipped demo checkpoint is poor on real photos).")
    metadata: dict = Field(description="Checkpoint metadata (training recipe, metrics, notes).")
    default: bool = Field(description="Used when a request names no model.")
    version: str = Field(description="The served version: a repository version number, or for a --model "
                         "checkpoint the first 12 hex digits of its sha256 ('demo' for random weights).")
    source: str = Field(description="'repository' (DITEPOSE_MODEL_REPOSITORY) or 'flag' (--model / DITEPOSE_MODELS).")
    options: dict = Field(default_factory=dict, description="Serving options set for this model (manifest or "
                          "ModelSpec): flip_test, decoder, max_batch_size, precision, engine.")
    engines: dict[str, EngineInfo] = Field(default_factory=dict, description="Per device, the engine serving this "
                                           "version: backend, precision, why it was chosen, agreement summary.")
    available_versions: list[int] = Field(default_factory=list, description="Complete versions in the repository.")
    pinned_version: int | None = Field(default=None, description="The version manifest.json pins; null: latest.")
    state: str = Field(default="serving", description="'serving', 'swapping' (a new version is being checked) "
                       "or 'failed'.")
    error: str | None = Field(default=None, description="The last load or check failure (cleared by the next "
                              "successful swap); the served version kept serving.")
    failed_versions: dict[str, str] = Field(default_factory=dict, description="Versions rejected by their "
                                            "checks -> why.")
    draining_version: str | None = Field(default=None, description="The previous version, while it finishes "
                                         "the batches queued before the swap.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    default_detector: str = Field(description="The person detector of requests without boxes that name none.")
    detectors: dict[str, str] = Field(
        default_factory=dict, description="Detectors that need downloaded weights: 'ready' or what is missing."
    )
    failed: dict[str, str] = Field(
        default_factory=dict, description="Configured models that failed to load -> the reason (not served)."
    )


class ReloadResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    swapped: bool = Field(description="True when another version (or changed serving options) now serves.")
    previous_version: str | None = Field(description="The version served before the reload.")
    served_version: str | None = Field(description="The version served now.")
    state: str
    error: str | None = Field(description="Why the candidate version was rejected, if it was.")
    available_versions: list[int] = Field(default_factory=list)
    failed_versions: dict[str, str] = Field(default_factory=dict)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable error code, e.g. 'bad_boxes', 'overloaded'.")
    message: str = Field(description="Human-readable explanation.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    ready: bool
    models: dict[str, str] = Field(description="Model name -> 'loaded' or 'failed: <reason>'.")
    model_versions: dict[str, dict] = Field(
        default_factory=dict,
        description="Model name -> served version, state and the last rejected version's error. A rejected "
        "new version does not change the status code: the previous version keeps serving.",
    )
    workers: list[WorkerStatus] = Field(description="Every inference worker of the pool.")
    queue_depth: dict[str, int] = Field(description="Crops waiting per model.")
    detectors: dict[str, str] = Field(
        default_factory=dict,
        description="Detectors that need downloaded weights: 'ready' or what is missing and the command that "
        "fetches it. Does not change the status code (requests with boxes, or another detector, are served).",
    )
    jobs: dict | None = Field(
        default=None,
        description="Evaluation jobs: mode (embedded|celery), ready, error (e.g. Redis down). Does not "
        "change the status code: pose requests are still served while the job broker is down.",
    )

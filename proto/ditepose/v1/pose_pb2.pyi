from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OverflowPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OVERFLOW_POLICY_QUEUE: _ClassVar[OverflowPolicy]
    OVERFLOW_POLICY_DROP_OLDEST: _ClassVar[OverflowPolicy]

class BoxSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BOX_SOURCE_UNSPECIFIED: _ClassVar[BoxSource]
    BOX_SOURCE_DETECTED: _ClassVar[BoxSource]
    BOX_SOURCE_CARRIED: _ClassVar[BoxSource]
    BOX_SOURCE_CLIENT: _ClassVar[BoxSource]
OVERFLOW_POLICY_QUEUE: OverflowPolicy
OVERFLOW_POLICY_DROP_OLDEST: OverflowPolicy
BOX_SOURCE_UNSPECIFIED: BoxSource
BOX_SOURCE_DETECTED: BoxSource
BOX_SOURCE_CARRIED: BoxSource
BOX_SOURCE_CLIENT: BoxSource

class Box(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    width: float
    height: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ...) -> None: ...

class PoseOptions(_message.Message):
    __slots__ = ("model", "flip_test", "decoder", "score_threshold", "detector")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FLIP_TEST_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    flip_test: bool
    decoder: str
    score_threshold: float
    detector: str
    def __init__(self, model: _Optional[str] = ..., flip_test: _Optional[bool] = ..., decoder: _Optional[str] = ..., score_threshold: _Optional[float] = ..., detector: _Optional[str] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("image", "boxes", "options")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    options: PoseOptions
    def __init__(self, image: _Optional[bytes] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., options: _Optional[_Union[PoseOptions, _Mapping]] = ...) -> None: ...

class Keypoint(_message.Message):
    __slots__ = ("name", "x", "y", "score")
    NAME_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    name: str
    x: float
    y: float
    score: float
    def __init__(self, name: _Optional[str] = ..., x: _Optional[float] = ..., y: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class Person(_message.Message):
    __slots__ = ("bbox", "score", "keypoints", "track_id")
    BBOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    bbox: Box
    score: float
    keypoints: _containers.RepeatedCompositeFieldContainer[Keypoint]
    track_id: int
    def __init__(self, bbox: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., keypoints: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ..., track_id: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "preprocess_ms", "inference_ms", "postprocess_ms", "total_ms", "detect_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DETECT_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float
    detect_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., postprocess_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., detect_ms: _Optional[float] = ...) -> None: ...

class EstimateResponse(_message.Message):
    __slots__ = ("model", "width", "height", "persons", "timings", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    width: int
    height: int
    persons: _containers.RepeatedCompositeFieldContainer[Person]
    timings: Timings
    model_version: str
    def __init__(self, model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., persons: _Optional[_Iterable[_Union[Person, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class TrackingConfig(_message.Message):
    __slots__ = ("enabled", "min_similarity", "max_age")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    min_similarity: float
    max_age: int
    def __init__(self, enabled: _Optional[bool] = ..., min_similarity: _Optional[float] = ..., max_age: _Optional[int] = ...) -> None: ...

class SmoothingConfig(_message.Message):
    __slots__ = ("enabled", "min_cutoff", "beta", "d_cutoff")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIN_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    D_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    min_cutoff: float
    beta: float
    d_cutoff: float
    def __init__(self, enabled: _Optional[bool] = ..., min_cutoff: _Optional[float] = ..., beta: _Optional[float] = ..., d_cutoff: _Optional[float] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("options", "policy", "max_in_flight", "max_queued", "tracking", "smoothing", "detect_interval")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    TRACKING_FIELD_NUMBER: _ClassVar[int]
    SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    DETECT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    options: PoseOptions
    policy: OverflowPolicy
    max_in_flight: int
    max_queued: int
    tracking: TrackingConfig
    smoothing: SmoothingConfig
    detect_interval: int
    def __init__(self, options: _Optional[_Union[PoseOptions, _Mapping]] = ..., policy: _Optional[_Union[OverflowPolicy, str]] = ..., max_in_flight: _Optional[int] = ..., max_queued: _Optional[int] = ..., tracking: _Optional[_Union[TrackingConfig, _Mapping]] = ..., smoothing: _Optional[_Union[SmoothingConfig, _Mapping]] = ..., detect_interval: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("sequence_number", "timestamp", "image", "boxes")
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    sequence_number: int
    timestamp: float
    image: bytes
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    def __init__(self, sequence_number: _Optional[int] = ..., timestamp: _Optional[float] = ..., image: _Optional[bytes] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("config", "frame")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    frame: Frame
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResult(_message.Message):
    __slots__ = ("sequence_number", "timestamp", "width", "height", "persons", "timings", "dropped_sequence_numbers", "error", "model", "box_source", "model_version")
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SEQUENCE_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BOX_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    sequence_number: int
    timestamp: float
    width: int
    height: int
    persons: _containers.RepeatedCompositeFieldContainer[Person]
    timings: Timings
    dropped_sequence_numbers: _containers.RepeatedScalarFieldContainer[int]
    error: FrameError
    model: str
    box_source: BoxSource
    model_version: str
    def __init__(self, sequence_number: _Optional[int] = ..., timestamp: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., persons: _Optional[_Iterable[_Union[Person, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., dropped_sequence_numbers: _Optional[_Iterable[int]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ..., model: _Optional[str] = ..., box_source: _Optional[_Union[BoxSource, str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "arch", "dataset", "num_joints", "joints", "input_width", "input_height", "demo_weights", "default", "version", "source", "available_versions", "pinned_version", "state", "error", "failed_versions", "quality", "engines")
    class FailedVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EnginesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EngineInfo
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EngineInfo, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    NUM_JOINTS_FIELD_NUMBER: _ClassVar[int]
    JOINTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEMO_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PINNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    name: str
    arch: str
    dataset: str
    num_joints: int
    joints: _containers.RepeatedScalarFieldContainer[str]
    input_width: int
    input_height: int
    demo_weights: bool
    default: bool
    version: str
    source: str
    available_versions: _containers.RepeatedScalarFieldContainer[int]
    pinned_version: int
    state: str
    error: str
    failed_versions: _containers.ScalarMap[str, str]
    quality: ModelQuality
    engines: _containers.MessageMap[str, EngineInfo]
    def __init__(self, name: _Optional[str] = ..., arch: _Optional[str] = ..., dataset: _Optional[str] = ..., num_joints: _Optional[int] = ..., joints: _Optional[_Iterable[str]] = ..., input_width: _Optional[int] = ..., input_height: _Optional[int] = ..., demo_weights: _Optional[bool] = ..., default: _Optional[bool] = ..., version: _Optional[str] = ..., source: _Optional[str] = ..., available_versions: _Optional[_Iterable[int]] = ..., pinned_version: _Optional[int] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., failed_versions: _Optional[_Mapping[str, str]] = ..., quality: _Optional[_Union[ModelQuality, _Mapping]] = ..., engines: _Optional[_Mapping[str, EngineInfo]] = ...) -> None: ...

class EngineInfo(_message.Message):
    __slots__ = ("backend", "precision", "reason", "agreement")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    backend: str
    precision: str
    reason: str
    agreement: Agreement
    def __init__(self, backend: _Optional[str] = ..., precision: _Optional[str] = ..., reason: _Optional[str] = ..., agreement: _Optional[_Union[Agreement, _Mapping]] = ...) -> None: ...

class Agreement(_message.Message):
    __slots__ = ("passed", "moved_share", "moved", "joints", "max_px", "p99_px", "shift_px", "max_moved_share", "verdict")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    MOVED_SHARE_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    JOINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PX_FIELD_NUMBER: _ClassVar[int]
    P99_PX_FIELD_NUMBER: _ClassVar[int]
    SHIFT_PX_FIELD_NUMBER: _ClassVar[int]
    MAX_MOVED_SHARE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    moved_share: float
    moved: int
    joints: int
    max_px: float
    p99_px: float
    shift_px: float
    max_moved_share: float
    verdict: str
    def __init__(self, passed: _Optional[bool] = ..., moved_share: _Optional[float] = ..., moved: _Optional[int] = ..., joints: _Optional[int] = ..., max_px: _Optional[float] = ..., p99_px: _Optional[float] = ..., shift_px: _Optional[float] = ..., max_moved_share: _Optional[float] = ..., verdict: _Optional[str] = ...) -> None: ...

class ModelQuality(_message.Message):
    __slots__ = ("evaluated", "note", "dataset", "boxes", "metric", "value", "metrics", "demo_checkpoint")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EVALUATED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DEMO_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    evaluated: bool
    note: str
    dataset: str
    boxes: str
    metric: str
    value: float
    metrics: _containers.ScalarMap[str, float]
    demo_checkpoint: bool
    def __init__(self, evaluated: _Optional[bool] = ..., note: _Optional[str] = ..., dataset: _Optional[str] = ..., boxes: _Optional[str] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., demo_checkpoint: _Optional[bool] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model", "swapped", "previous_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    swapped: bool
    previous_version: str
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., swapped: _Optional[bool] = ..., previous_version: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "failed")
    class FailedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    failed: _containers.ScalarMap[str, str]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., failed: _Optional[_Mapping[str, str]] = ...) -> None: ...

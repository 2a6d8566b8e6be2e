"""The one configuration of DitePose: a pydantic-settings object read from ``DITEPOSE_*`` variables.

``ditepose serve`` (REST, gRPC, the worker pool, embedded jobs) and ``ditepose worker`` (the
Celery evaluation workers) read the same :class:`Settings`, so a deployment is described once
(environment, ``.env`` file or constructor arguments in tests) and a name means one thing
everywhere: ``redis_url`` is the job queue for both, ``devices`` and ``torch_threads`` lay out
the inference pool wherever one runs. The fields come in two sections, serving and jobs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ditepose.model.engines.precision import PrecisionSetting
from ditepose.model.engines.setting import EngineSetting


class ModelSpec(BaseModel):
    """One model the service serves, chosen per request by ``name``."""

    name: str = Field(description="Name clients use in the `model` field of a request.")
    checkpoint: Path | None = Field(
        default=None,
        description="Checkpoint file (our format or the authors' mmpose layout). None: the project's "
        "default checkpoint; when that file is missing the model runs with random (demo) weights.",
    )
    arch: str = Field(default="dite_hrnet_18", description="Architecture: dite_hrnet_18 or dite_hrnet_30.")
    dataset: Literal["coco", "mpii"] = Field(
        default="coco", description="Keypoint layout, used only when the checkpoint carries no metadata."
    )
    input_size: tuple[int, int] | None = Field(
        default=None,
        description="Network input (W, H), e.g. [288, 384] for an authors' 384x288 checkpoint. None: from the "
        "checkpoint's metadata, else the dataset's default (192x256 COCO, 256x256 MPII).",
    )
    flip_test: bool | None = Field(
        default=None, description="Flip test of requests that do not say (None: on, the paper's protocol)."
    )
    decoder: str | None = Field(
        default=None, description="Heatmap decoder of requests that name none (None: 'default')."
    )
    max_batch_size: int | None = Field(
        default=None, ge=1, description="Most crops per forward pass of this model (None: the service's).",
    )
    precision: PrecisionSetting | None = Field(
        default=None, description="Inference precision of this model (None: the service's `precision`)."
    )
    engine: EngineSetting | None = Field(
        default=None, description="Inference engine of this model (None: the service's `engine`)."
    )

    @field_validator("decoder")
    @classmethod
    def _check_decoder(cls, value: str | None) -> str | None:
        from ditepose.model.codec import DECODER_NAMES

        if value is not None and value.lower() not in DECODER_NAMES:
            raise ValueError(f"unknown decoder {value!r}: use one of {list(DECODER_NAMES)}")
        return None if value is None else value.lower()


class DatasetSpec(BaseModel):
    """One evaluation set on the server's disk; clients only ever name it."""

    format: Literal["coco", "mpii"] = Field(description="'coco' (person keypoints json) or 'mpii' (mmpose json).")
    ann_file: Path = Field(description="COCO annotation json, or mmpose's MPII annotation json.")
    img_dir: Path = Field(description="Folder holding the images the annotations name.")
    det_file: Path | None = Field(
        default=None, description="COCO only: person detections json (needed for boxes='detections')."
    )
    gt_file: Path | None = Field(default=None, description="MPII only: ground truth (.json/.npz/.mat) for PCKh.")

    @model_validator(mode="after")
    def _check_format(self) -> DatasetSpec:
        if self.format == "mpii" and self.gt_file is None:
            raise ValueError("an MPII dataset needs gt_file (mpii_gt_val.json/.npz/.mat) for PCKh")
        if self.format == "mpii" and self.det_file is not None:
            raise ValueError("det_file is for COCO datasets only")
        return self


def _default_models() -> list[ModelSpec]:
    return [ModelSpec(name="dite_hrnet_18")]


class Settings(BaseSettings):
    """Everything the pose service needs to start; see each field's description."""

    model_config = SettingsConfigDict(env_prefix="DITEPOSE_", env_file=".env", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Interface the REST server binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="REST port (0 = pick a free port).")
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 = pick a free port).")
    grpc_enabled: bool = Field(default=True, description="Start the gRPC server next to REST when available.")
    models: list[ModelSpec] = Field(
        default_factory=_default_models,
        description='Models served side by side, as JSON, e.g. [{"name": "hrnet18", "checkpoint": "a.pt"}].',
    )
    default_model: str | None = Field(
        default=None, description="Model used when a request names none (default: the first one)."
    )
    model_repository: Path | None = Field(
        default=None,
        description="Model repository: <name>/<version>/checkpoint.pth folders plus an optional manifest.json "
        "per model (docs/operations.md). Its models are served next to `models` (which then default to none); "
        "new versions are loaded, checked and swapped in while serving.",
    )
    repository_poll_s: float = Field(
        default=10.0, gt=0, description="How often the model repository is scanned for new versions and "
        "manifest edits (POST /v1/models/{name}/reload asks at once)."
    )
    devices: str = Field(
        default="auto",
        description="'auto' (every CUDA GPU, else the CPU) or a comma list such as 'cuda:0,cuda:1' or 'cpu'.",
    )
    workers_per_device: int | None = Field(
        default=None,
        ge=1,
        le=8,
        description="Inference threads per device. None: one per CPU core on a CPU-only host (each with one torch "
        "thread: many small ops scale better across independent batches than inside one), one per CUDA GPU.",
    )
    precision: PrecisionSetting = Field(
        default="auto", description="Inference precision; 'auto' = fp16 on CUDA, fp32 on CPU."
    )
    engine: EngineSetting = Field(
        default="auto", description="Inference engine on CPU devices: 'auto' = OpenVINO where it is installed and "
        "agrees with the fp32 torch engine on the reference crops (else the torch engine, the reason logged and shown "
        "in /v1/models); 'openvino' or an error; 'torch'. CUDA devices always run the torch engine."
    )
    max_batch_size: int = Field(default=32, ge=1, description="Most crops one forward pass takes.")
    cuda_graphs: bool = Field(
        default=False,
        description="On CUDA devices, capture one CUDA graph per batch bucket (powers of two up to max_batch_size; "
        "a batch is padded up to its bucket) for each model at start: less kernel-launch overhead per batch, "
        "more GPU memory and start-up time. Ignored on CPU devices.",
    )
    crop_backend: Literal["cv2", "torch"] = Field(
        default="cv2",
        description="Who cuts the person crops (and their mirrored copies): 'cv2' (warpAffine on the API's "
        "threads) or 'torch' (grid_sample on the first CUDA device when there is one, else the CPU: one upload "
        "per image, all its persons in one call). Equal within 1 grey level; on a CPU 'torch' measured slower "
        "(bench/results/crops.json).",
    )
    max_delay_ms: float = Field(
        default=5.0,
        ge=0,
        description="A free worker runs a partial batch once no crop has arrived (and none is being decoded) for "
        "this long, counted from when it became free; at most 10x this after it became free. With several "
        "workers, one goes as soon as its fair share of the waiting crops is queued.",
    )
    queue_size: int = Field(
        default=512, ge=1, description="Most crops waiting per model; beyond it requests get 429 at once."
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Most POST /v1/pose and gRPC Estimate requests admitted at once (read, decoded, queued or "
        "running); past it the next gets 429 / RESOURCE_EXHAUSTED from its headers alone, before its body is "
        "read. None: len(models) * (queue_size + workers_per_device * max_batch_size) // 2, i.e. as many "
        "typical requests (one person with the flip test: 2 crops) as full queues plus one running batch per "
        "worker hold. The queue check (by crops) still has the final say.",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="Deadline for queue + inference of one request (504 after it)."
    )
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="Largest encoded image accepted.")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="Largest width*height accepted, checked from the header before decoding."
    )
    max_boxes: int = Field(default=64, ge=1, description="Most person boxes per request (given or detected).")
    detector: str = Field(
        default="auto",
        description="Person detector for requests without boxes: 'auto' (NanoDet when its weights are cached, "
        "else the whole image as one box; the log, /readyz and /v1/models say which and why), 'nanodet', 'whole', "
        "'hog' or 'torchvision'. A request may name another.",
    )
    det_score_threshold: float = Field(
        default=0.3, ge=0.0, le=1.0, description="NanoDet: person boxes scoring below this are dropped."
    )
    torchvision_arch: str = Field(
        default="fasterrcnn_mobilenet_v3_large_fpn",
        description="The torchvision architecture behind detector 'torchvision' (see model/torchvision_detector.py).",
    )
    torchvision_weights: str = Field(
        default="DEFAULT",
        description="Its weights: a torchvision weights name ('DEFAULT', 'COCO_V1') read from torchvision's cache "
        "($TORCH_HOME/hub/checkpoints; the service never downloads: `python -m ditepose.model.torchvision_detector "
        "fetch ARCH` does) or a state-dict file path.",
    )
    det_max_batch_size: int = Field(
        default=8, ge=1, description="Most images per person-detector forward pass (NanoDet, torchvision); "
        "detection is batched across requests on the pose workers' devices, with its own queue.",
    )
    weights_dir: Path | None = Field(
        default=None,
        description="Cache of downloaded weights (NanoDet's), filled by `ditepose weights fetch`. None: "
        "$XDG_CACHE_HOME/ditepose/weights, else ~/.cache/ditepose/weights.",
    )
    api_key: SecretStr | None = Field(
        default=None, description="If set, /v1 routes need this value in the X-API-Key header."
    )
    api_key_file: Path | None = Field(default=None, description="File holding the API key (first line).")
    redis_url: str | None = Field(
        default=None,
        description="Redis for the evaluation jobs (broker, results, job records); None = embedded mode: jobs "
        "run on threads of the API process, their crops batched by the serving pool.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads of each worker thread. None: CPU cores / workers on a CPU-only host, "
        "torch's default otherwise.",
    )
    worker_processes: bool = Field(
        default=False,
        description="Run each CPU worker's network in a child process of its own (spawned at start, restarted if "
        "it dies): the HTTP side and the other workers no longer share the GIL with it. Faster on multi-core "
        "CPUs at small batches; costs a few seconds of start-up and one model copy per worker.",
    )
    api_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="API processes of `ditepose serve`. 1: one process does HTTP, gRPC and inference. N > 1: the "
        "parent becomes the inference host (the models on every device, batching, the queue bounds and "
        "max_in_flight for the whole host) and N front-end processes share the REST and gRPC ports "
        "(SO_REUSEPORT), sending crops to it through shared memory. Embedded evaluation jobs (no redis_url) "
        "are refused in that mode.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After value sent with 429 (queue full or too many requests in flight) and 503 out_of_memory.")
    # memory under bursts (docs/operations.md "Memory"): what a burst at the admission limit may hold
    max_concurrent_decodes: int | None = Field(
        default=None, ge=1,
        description="Most uploads decoded to pixels at once (and detector inputs made from them) per process; "
        "the rest wait their turn, holding only their encoded bytes, so a burst of large images does not hold "
        "every decoder's working copies at once. None: one per CPU core.",
    )
    trim_memory_when_idle: bool = Field(
        default=True,
        description="Return the C heap's free pages to the kernel (glibc malloc_trim) once the worker pool's "
        "queues drain after a busy spell: without it RSS stays near the bursts' level (measured +1.3 GiB over idle "
        "after bursts at the admission limit, +0.3 GiB with it: bench/bursts.py). No effect where the C library has no malloc_trim.",
    )

    # ---------------------------------------------------------------- evaluation jobs
    datasets: dict[str, DatasetSpec] = Field(
        default_factory=dict,
        description='Evaluation sets by name, as JSON: {"coco-val": {"format": "coco", "ann_file": ..., '
        '"img_dir": ...}}.',
    )
    datasets_file: Path | None = Field(default=None, description="JSON file with more datasets in the same shape.")
    demo_dataset: bool = Field(
        default=True,
        description="Offer the built-in 'demo-synthetic' COCO-format set (8 synthetic images, made under "
        "jobs_dir on first use), so /v1/evaluate works out of the box.",
    )
    checkpoint_dir: Path | None = Field(
        default=None, description="Folder whose checkpoint files (.pth/.pt) jobs may name by file name."
    )
    jobs_dir: Path = Field(
        default=Path("var/jobs"), description="Where predictions files (and embedded-mode records) are written."
    )
    job_queue: str = Field(default="ditepose-eval", description="Celery queue of the evaluation tasks.")
    embedded_workers: int = Field(default=1, ge=1, le=8, description="Evaluation threads in embedded mode.")
    shard_size: int = Field(
        default=500, ge=1,
        description="Images per shard of an evaluation job: a job over more images is split into shards, each "
        "its own task (any worker may run it), merged and scored once at the end. A request may ask for "
        "smaller shards (its shard_size).",
    )
    max_shards: int = Field(
        default=32, ge=1, le=1024,
        description="At most this many shards per job (larger shards instead); 1 turns sharding off.",
    )
    soft_time_limit_s: float = Field(default=3600.0, gt=0, description="A job running longer fails (checked per batch).")
    hard_time_limit_s: float = Field(
        default=3900.0, gt=0, description="Celery kills a task running longer (prefork pool only)."
    )
    visibility_timeout_s: int = Field(
        default=4000, ge=1,
        description="Redis broker: an unacknowledged task (its worker died) is redelivered after this long. "
        "Keep it above hard_time_limit_s: a task still running past it is delivered again (the job's lease "
        "keeps that copy waiting, but it costs a retry loop).",
    )
    lock_ttl_s: float = Field(
        default=30.0, gt=0,
        description="A running job's lease; renewed every batch. A job whose lease ran out may be taken over.",
    )
    redis_timeout_s: float = Field(default=2.0, gt=0, description="Socket timeout towards Redis.")
    recent_jobs: int = Field(default=50, ge=1, le=1000, description="Jobs GET /v1/jobs lists (newest first).")

    # ---------------------------------------------------------------- video jobs
    videos: dict[str, Path] = Field(
        default_factory=dict,
        description='Catalogue of server-side videos a POST /v1/videos JSON body may name: {"name": "/path/x.mp4"}.',
    )
    video_dir: Path | None = Field(
        default=None, description="Folder whose video files POST /v1/videos may name by file name (as checkpoint_dir).",
    )
    video_max_upload_bytes: int = Field(
        default=1 << 30, ge=1024, description="Largest video upload POST /v1/videos accepts (413 past it).",
    )
    video_segment_s: float = Field(
        default=60.0, gt=0,
        description="A video longer than this is cut at keyframes into segments of about this many seconds, one "
        "task each (any worker may run it), stitched into one set of tracks at the end.",
    )
    video_overlap_frames: int = Field(
        default=8, ge=0, le=300, description="Frames a segment runs before its start, where its tracks meet the "
        "previous segment's (at least the job's detect_interval).",
    )
    video_result_ttl_s: float = Field(
        default=7 * 24 * 3600.0, gt=0,
        description="Uploads and result files of finished video jobs are deleted this long after the job ended "
        "(swept by the API on every POST /v1/videos, at most once a minute).",
    )

    @model_validator(mode="after")
    def _check_job_limits(self) -> Settings:
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ValueError("hard_time_limit_s must exceed soft_time_limit_s")
        return self

    @field_validator("detector")
    @classmethod
    def _check_detector(cls, value: str) -> str:
        from ditepose.model.detectors import DETECTORS

        if value != "auto" and value not in DETECTORS:
            raise ValueError(f"unknown detector {value!r}: use 'auto' or one of {list(DETECTORS)}")
        return value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        value = value.strip()
        if value != "auto":
            for part in value.split(","):
                part = part.strip()
                if part != "cpu" and not (part == "cuda" or part.startswith("cuda:")):
                    raise ValueError(f"unknown device {part!r}: use 'auto', 'cpu' or 'cuda:N'")
        return value

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        if not self.models:
            raise ValueError("at least one model is needed")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.default_model is not None and self.default_model not in names and self.model_repository is None:
            raise ValueError(f"default_model {self.default_model!r} is not one of {names}")
        return self

    @property
    def resolved_max_in_flight(self) -> int:
        """``max_in_flight``, or the default derived from the queue and batch sizes."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        crops = self.queue_size + self.resolved_workers_per_device() * self.max_batch_size
        return max(1, len(self.models) * crops // 2)

    def _cpu_only(self) -> bool:
        return all(device.startswith("cpu") for device in self.resolved_devices())

    def resolved_workers_per_device(self) -> int:
        """``workers_per_device``, or one worker per core on a CPU-only host (at most 8), else 1."""
        if self.workers_per_device is not None:
            return self.workers_per_device
        return max(1, min(8, os.cpu_count() or 1)) if self._cpu_only() else 1

    def resolved_torch_threads(self) -> int | None:
        """``torch_threads``, or the cores shared out among the CPU workers; None keeps torch's default."""
        if self.torch_threads is not None:
            return self.torch_threads
        if not self._cpu_only():
            return None
        return max(1, (os.cpu_count() or 1) // self.resolved_workers_per_device())

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.models[0].name

    def resolved_api_key(self) -> str | None:
        """The API key from ``api_key`` or ``api_key_file``; None when auth is off."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text().strip().splitlines()
            if not lines or not lines[0].strip():
                raise ValueError(f"api_key_file {self.api_key_file} is empty")
            return lines[0].strip()
        return None

    def resolved_devices(self) -> list[str]:
        """Device names to start a worker on."""
        import torch

        if self.devices == "auto":
            if torch.cuda.is_available():
                return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            return ["cpu"]
        return [part.strip() for part in self.devices.split(",") if part.strip()]

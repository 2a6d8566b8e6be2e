"""What the pool serves: a loaded model, its version and its serving options.

It lives below :mod:`ditepose.service.core` because the worker pool (batching) holds models;
:mod:`ditepose.service.core.model_loader` builds them from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ditepose.model.keypoints import KeypointSpec, get_keypoint_spec
from ditepose.model.quality import ModelQuality, recorded_quality
from ditepose.model.repository import ServingOptions


@dataclass(frozen=True)
class LoadedModel(ServingOptions):
    """A model ready to serve: the module on the CPU plus what clients need to know, and its own
    serving options (ModelSpec / the repository manifest; keyword-only, None: the service's defaults)."""

    name: str
    arch: str
    dataset: str
    num_joints: int
    input_size: tuple[int, int]  # (W, H)
    module: nn.Module
    checkpoint: str | None
    demo_weights: bool
    load_s: float
    extra: dict = field(default_factory=dict)
    version: str = "1"
    source: str = "flag"  # 'flag' (--model / DITEPOSE_MODELS) or 'repository'
    # device -> the engine serving this version there (backend, precision, why, agreement summary):
    # filled by the pool as it builds the version's engines (EngineChoice.to_dict), shown by /v1/models
    engines: dict[str, dict] = field(default_factory=dict, compare=False)

    @property
    def spec(self) -> KeypointSpec:
        return get_keypoint_spec(self.dataset)

    @property
    def quality(self) -> ModelQuality:
        """What the checkpoint is known to score (shown by /v1/models, ListModels, the demo page)."""
        return recorded_quality(self.checkpoint, self.demo_weights, self.extra)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "dataset": self.dataset,
            "num_joints": self.num_joints,
            "joints": list(self.spec.joint_names),
            "skeleton": [list(edge) for edge in self.spec.skeleton],
            "input_size": list(self.input_size),
            "checkpoint": self.checkpoint,
            "demo_weights": self.demo_weights,
            "quality": self.quality.to_dict(),
            "metadata": _jsonable(self.extra),
            "version": self.version,
            "source": self.source,
            "options": self.serving_options(),
            "engines": _jsonable(self.engines),
        }


def _jsonable(value: object) -> object:
    """Checkpoint metadata may hold tensors or tuples; keep what JSON can carry."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

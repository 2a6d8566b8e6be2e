"""The one model loader: a :class:`~ditepose.service.core.settings.ModelSpec` -> :class:`LoadedModel`.

Served models and the models of evaluation jobs (a served name, or a checkpoint of the
checkpoint folder) load here, so a job scores exactly what the service serves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ditepose.model.checkpoint import DEFAULT_INPUT_SIZE
from ditepose.model.keypoints import KeypointSpec, get_keypoint_spec
from ditepose.service.core.settings import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: the module on the CPU plus what clients need to know."""

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

    @property
    def spec(self) -> KeypointSpec:
        return get_keypoint_spec(self.dataset)

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
            "metadata": _jsonable(self.extra),
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


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load one model; a missing project default checkpoint falls back to random (demo) weights."""
    from ditepose import model as models

    started = time.perf_counter()
    path: Path | None = spec.checkpoint
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint of model {spec.name!r} not found: {path}")
    if path is None:
        path = models.default_checkpoint_path()
    if path is not None:
        # Our format carries its metadata; the authors' mmpose files are recognised by layout.
        module, meta = models.load_pose_model(path, map_location="cpu")
        arch, dataset, num_joints = meta.arch, meta.dataset, int(meta.num_joints)
        size = spec.input_size or meta.input_size
        input_size = (int(size[0]), int(size[1]))
        extra, demo, checkpoint = dict(meta.extra or {}), False, str(path)
    else:
        log.warning(
            "!!! model %r: no checkpoint given and the project's default checkpoint is missing; "
            "serving RANDOM weights (demo_weights=true), poses will be meaningless. "
            "Set DITEPOSE_MODELS or use `ditepose serve --model NAME=CHECKPOINT`.",
            spec.name,
        )
        dataset = spec.dataset
        num_joints = get_keypoint_spec(dataset).num_joints
        with torch.random.fork_rng():  # the same random weights in every process (API, job workers)
            torch.manual_seed(0)
            module = models.build_model(spec.arch, num_joints=num_joints)
        size = spec.input_size or DEFAULT_INPUT_SIZE[dataset]
        arch, input_size, extra, demo, checkpoint = spec.arch, (int(size[0]), int(size[1])), {}, True, None
    module.check_input_size(input_size[1], input_size[0])
    module.eval()
    return LoadedModel(
        name=spec.name,
        arch=arch,
        dataset=dataset,
        num_joints=num_joints,
        input_size=input_size,
        module=module,
        checkpoint=checkpoint,
        demo_weights=demo,
        load_s=time.perf_counter() - started,
        extra=extra,
    )


def load_models(specs: list[ModelSpec]) -> list[LoadedModel]:
    return [load_model(spec) for spec in specs]


def load_models_isolated(specs: list[ModelSpec]) -> tuple[list[LoadedModel], dict[str, str]]:
    """Load every model that loads; a bad one (missing, corrupt, wrong architecture) is reported
    as ``{name: reason}`` instead of taking the whole service down. Raises only when none loads."""
    loaded: list[LoadedModel] = []
    failed: dict[str, str] = {}
    for spec in specs:
        try:
            loaded.append(load_model(spec))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if len(reason) > 500:
                reason = reason[:500] + "..."
            failed[spec.name] = reason
            log.error("model %r failed to load and is not served: %s", spec.name, reason)
    if not loaded:
        raise RuntimeError("no model could be loaded: " + "; ".join(f"{n}: {r}" for n, r in failed.items()))
    return loaded, failed

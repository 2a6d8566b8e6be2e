"""The one model loader: a :class:`~ditepose.service.core.settings.ModelSpec` -> :class:`LoadedModel`.

Served models and the models of evaluation jobs (a served name, or a checkpoint of the
checkpoint folder) load here, so a job scores exactly what the service serves.

Every loaded model has a version, which each pose response names: a model repository's version
number, or, for a ``--model name=path`` checkpoint, the first 12 hex digits of the file's sha256
(``demo`` for random demo weights), so the same file always reports the same version.
:func:`check_model` is the test a new version passes before it serves: strict state-dict keys
(the loader's), a forward pass on fixed reference inputs, outputs of the right shape, all finite.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ditepose.model.checkpoint import DEFAULT_INPUT_SIZE
from ditepose.model.keypoints import get_keypoint_spec
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.core.settings import ModelSpec

log = logging.getLogger(__name__)


@runtime_checkable
class InputSizeChecked(Protocol):
    """A pose network that says whether it can take an input size (every network of :mod:`ditepose.model`)."""

    def check_input_size(self, height: int, width: int) -> None: ...


def file_version(path: str | Path) -> str:
    """The version of a ``--model`` checkpoint: the first 12 hex digits of its sha256."""
    from ditepose.model.repository import file_sha256

    return file_sha256(path)[:12]


def load_model(spec: ModelSpec, version: str | None = None, source: str = "flag") -> LoadedModel:
    """Load one model; a missing project default checkpoint falls back to random (demo) weights.

    ``version``: the repository's version number; None names a checkpoint by its sha256 prefix."""
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
    if not isinstance(module, InputSizeChecked):
        raise TypeError(f"{type(module).__name__} cannot check its input size")
    module.check_input_size(input_size[1], input_size[0])
    module.eval()
    if version is None:
        version = "demo" if checkpoint is None else file_version(checkpoint)
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
        version=version,
        source=source,
        flip_test=spec.flip_test,
        decoder=spec.decoder,
        max_batch_size=spec.max_batch_size,
        precision=spec.precision,
        engine=spec.engine,
    )


def reference_inputs(model: LoadedModel, count: int = 2) -> torch.Tensor:
    """Fixed crops [count, 3, H, W] (seeded normal noise, the scale of normalised images)."""
    width, height = model.input_size
    generator = torch.Generator().manual_seed(20220701)
    return torch.randn(count, 3, height, width, generator=generator)


def check_outputs(model: LoadedModel, heatmaps: torch.Tensor, where: str, count: int = 2) -> None:
    """Raise ValueError unless ``heatmaps`` are what ``model`` must answer for ``count`` :func:`reference_inputs`."""
    width, height = model.input_size
    expected = (count, model.num_joints)
    if tuple(heatmaps.shape[:2]) != expected or heatmaps.ndim != 4:
        raise ValueError(f"{where}: heatmaps of shape {tuple(heatmaps.shape)} for {count} crops of {width}x{height}; "
                         f"expected [{count}, {model.num_joints}, h, w]")
    finite = torch.isfinite(heatmaps)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{where}: {bad} of {heatmaps.numel()} outputs on the reference inputs are not finite "
                         "(NaN/inf weights?)")


def check_model(model: LoadedModel) -> None:
    """The forward check on the CPU module itself (start-up, before any engine exists)."""
    with torch.inference_mode():
        heatmaps = model.module(reference_inputs(model))
    check_outputs(model, heatmaps.float(), f"model {model.name!r} version {model.version}")


def check_engine(model: LoadedModel, infer, device: str) -> None:
    """The forward check (also the warm-up) of one engine of ``model`` on ``device``: one crop, so a
    bucketed engine (OpenVINO) compiles only the batch-1 bucket its agreement gate already compiled."""
    heatmaps = infer(reference_inputs(model, 1))
    check_outputs(model, heatmaps.float().cpu(), f"model {model.name!r} version {model.version} on {device}", 1)


def short_reason(exc: BaseException) -> str:
    """An exception as one bounded line for /v1/models, /readyz and the log."""
    reason = f"{type(exc).__name__}: {exc}"
    return reason[:500] + "..." if len(reason) > 500 else reason


def load_models_isolated(
    specs: list[ModelSpec], allow_none: bool = False
) -> tuple[list[LoadedModel], dict[str, str]]:
    """Load every model that loads; a bad one (missing, corrupt, wrong architecture) is reported
    as ``{name: reason}`` instead of taking the whole service down. Raises only when none loads
    (unless ``allow_none``: a model repository may still bring models)."""
    loaded: list[LoadedModel] = []
    failed: dict[str, str] = {}
    for spec in specs:
        try:
            loaded.append(load_model(spec))
        except Exception as exc:
            reason = short_reason(exc)
            failed[spec.name] = reason
            log.error("model %r failed to load and is not served: %s", spec.name, reason)
    if not loaded and not allow_none:
        raise RuntimeError("no model could be loaded: " + "; ".join(f"{n}: {r}" for n, r in failed.items()))
    return loaded, failed

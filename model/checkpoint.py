"""Checkpoint I/O: the authors' mmpose checkpoints load unchanged; ours add serving metadata.

Our file is the mmpose layout (``{'state_dict': {'backbone.…', 'keypoint_head.…'}}``) plus a
``ditepose_meta`` dict, so tools that read mmpose checkpoints read ours too. Everything is loaded
with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditepose.model.dite_hrnet import TopDownPoseNet
from ditepose.model.keypoints import spec_for_num_joints
from ditepose.model.registry import build_model, get_config

FORMAT = "ditepose/1"
DEFAULT_INPUT_SIZE = {"coco": (192, 256), "mpii": (256, 256)}


class CheckpointError(ValueError):
    """A checkpoint that does not fit: unreadable, wrong architecture, missing or extra keys."""


@dataclass
class CheckpointMeta:
    """What the service needs to serve a checkpoint without extra flags."""

    arch: str
    dataset: str
    num_joints: int
    input_size: tuple[int, int]  # (W, H)
    overrides: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        data["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        return cls(
            arch=str(data["arch"]),
            dataset=str(data["dataset"]),
            num_joints=int(data["num_joints"]),
            input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
            overrides=dict(data.get("overrides") or {}),
            extra=dict(data.get("extra") or {}),
        )


def _read(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def _state_dict_of(obj: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} has no tensor state_dict")
    # DistributedDataParallel prefixes every key with 'module.'
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming missing keys, unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        def _show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" … (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_show(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_show(shapes)}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))


def load_checkpoint(module: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load an mmpose-layout or DitePose checkpoint into ``module`` (strict keys and shapes).

    Returns the checkpoint's metadata dict (ours under ``ditepose_meta``, else mmpose's ``meta``).
    """
    obj = _read(path, map_location)
    state = _state_dict_of(obj, path)
    check_state_dict(module, state, source=f"checkpoint {path}")
    module.load_state_dict(state, strict=True)
    return dict(obj.get("ditepose_meta") or obj.get("meta") or {})


def save_checkpoint(path: str | Path, module: nn.Module, meta: CheckpointMeta, **extra_state: Any) -> Path:
    """Write ``module`` in the mmpose layout with our metadata; ``extra_state`` adds e.g. optimizer state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = getattr(module, "module", module)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    payload = {"format": FORMAT, "ditepose_meta": meta.to_dict(), "state_dict": state, **extra_state}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint under the real name
    return path


def infer_meta(state: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> CheckpointMeta:
    """Recognise an authors' checkpoint by its layout: modules per stage and joints in the head."""
    if "keypoint_head.final_layer.weight" not in state:
        raise CheckpointError("not a Dite-HRNet top-down checkpoint: no 'keypoint_head.final_layer.weight'")
    num_joints = int(state["keypoint_head.final_layer.weight"].shape[0])
    modules = []
    for stage in range(3):
        pattern = re.compile(rf"^backbone\.stage{stage}\.(\d+)\.")
        indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
        modules.append(max(indices) + 1 if indices else 0)
    archs: dict[tuple[int, ...], str] = {(2, 4, 2): "dite_hrnet_18", (3, 8, 3): "dite_hrnet_30"}
    arch = archs.get(tuple(modules))
    if arch is None:
        raise CheckpointError(f"unrecognised architecture: modules per stage {tuple(modules)}")
    meta = meta or {}
    try:
        dataset = str(meta.get("dataset") or spec_for_num_joints(num_joints).name)
    except KeyError as exc:
        raise CheckpointError(str(exc)) from None
    size = meta.get("input_size") or DEFAULT_INPUT_SIZE.get(dataset, (192, 256))
    return CheckpointMeta(arch=arch, dataset=dataset, num_joints=num_joints, input_size=(int(size[0]), int(size[1])))


def load_pose_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[TopDownPoseNet, CheckpointMeta]:
    """Build the right network for a checkpoint (ours or the authors') and load it, in eval mode."""
    obj = _read(path, map_location)
    state = _state_dict_of(obj, path)
    if obj.get("ditepose_meta"):
        meta = CheckpointMeta.from_dict(obj["ditepose_meta"])
    else:
        meta = infer_meta(state, obj.get("meta") if isinstance(obj.get("meta"), dict) else None)
    try:
        config_overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.overrides.items()}
        get_config(meta.arch, meta.num_joints, **config_overrides)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    module = build_model(meta.arch, num_joints=meta.num_joints, **config_overrides)
    check_state_dict(module, state, source=f"checkpoint {path}")
    module.load_state_dict(state, strict=True)
    module.eval()
    return module, meta

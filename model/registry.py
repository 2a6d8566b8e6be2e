"""Named Dite-HRNet variants, registered in one place, and ``build_model``."""

from __future__ import annotations

import dataclasses
from typing import Any

from ditepose.model.dite_hrnet import DiteHRNetConfig, TopDownPoseNet

VARIANTS: dict[str, DiteHRNetConfig] = {
    "dite_hrnet_18": DiteHRNetConfig(name="dite_hrnet_18", num_modules=(2, 4, 2)),
    "dite_hrnet_30": DiteHRNetConfig(name="dite_hrnet_30", num_modules=(3, 8, 3)),
}

_OVERRIDABLE = {f.name for f in dataclasses.fields(DiteHRNetConfig)} - {"name", "num_joints"}


def list_models() -> list[str]:
    return sorted(VARIANTS)


def get_config(name: str, num_joints: int = 17, **overrides: Any) -> DiteHRNetConfig:
    """The registered config of ``name`` with ``num_joints`` and any field overrides applied."""
    try:
        base = VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {list_models()}") from None
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; allowed: {sorted(_OVERRIDABLE)}")
    normalised: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(base, num_joints=num_joints, **normalised)


def build_model(name: str, num_joints: int = 17, **overrides: Any) -> TopDownPoseNet:
    """Build a registered variant, e.g. ``build_model('dite_hrnet_18', dsc_groups=(1, 1, 2, 4))``."""
    return TopDownPoseNet(get_config(name, num_joints, **overrides))

"""The one spelling of inference precisions: engines, settings, manifests and CLIs all read it here.

``Precision`` is what an engine computes in; ``PrecisionSetting`` adds ``"auto"``, which a
setting, a manifest or a flag may say and :func:`resolve_precision` turns into a precision once
the device is known (fp16 on CUDA, fp32 elsewhere). Pure Python on purpose: the service's
settings import it without importing an engine.
"""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "fp16", "bf16"]
PrecisionSetting = Literal["auto", Precision]

PRECISIONS: tuple[Precision, ...] = get_args(Precision)
PRECISION_SETTINGS: tuple[PrecisionSetting, ...] = get_args(PrecisionSetting)


def parse_precision_setting(value: object) -> PrecisionSetting:
    """``value`` as a precision setting (``"auto"`` allowed); ValueError names the choices."""
    if not isinstance(value, str) or value not in PRECISION_SETTINGS:
        raise ValueError(f"precision must be one of {list(PRECISION_SETTINGS)}, got {value!r}")
    return value


def parse_precision(value: object) -> Precision:
    """``value`` as an engine precision (no ``"auto"``); ValueError names the choices."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {value!r}")
    return value


def resolve_precision(setting: str, device: str) -> Precision:
    """The precision a setting means on ``device``: ``"auto"`` is fp16 on CUDA, fp32 elsewhere."""
    if parse_precision_setting(setting) == "auto":
        return "fp16" if str(device).startswith("cuda") else "fp32"
    return parse_precision(setting)

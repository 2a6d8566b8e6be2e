"""The one spelling of the engine setting (``DITEPOSE_ENGINE``, a manifest's ``engine``, ``--engine``).

Pure Python like :mod:`~ditepose.model.engines.precision`: settings and manifests read it without
building anything; :mod:`~ditepose.model.engines.select` turns it into a backend.
"""

from __future__ import annotations

from typing import Literal, get_args

EngineSetting = Literal["auto", "torch", "openvino"]
ENGINE_SETTINGS: tuple[EngineSetting, ...] = get_args(EngineSetting)


def parse_engine_setting(value: object) -> EngineSetting:
    """``value`` as an engine setting; ValueError names the choices."""
    if not isinstance(value, str) or value not in ENGINE_SETTINGS:
        raise ValueError(f"engine must be one of {list(ENGINE_SETTINGS)}, got {value!r}")
    return value

"""One spelling of precisions: the engine, the service's settings and the repository's manifests agree."""

from __future__ import annotations

from typing import get_args

import pytest

from ditepose.model.engines import (
    PRECISION_SETTINGS,
    PRECISIONS,
    parse_precision,
    parse_precision_setting,
    resolve_precision,
)


def test_the_precisions_and_the_settings_that_add_auto() -> None:
    assert PRECISIONS == ("fp32", "fp16", "bf16")
    assert PRECISION_SETTINGS == ("auto", "fp32", "fp16", "bf16")


def test_parse_accepts_the_spelled_values_and_names_the_choices_otherwise() -> None:
    assert parse_precision("bf16") == "bf16"
    assert parse_precision_setting("auto") == "auto"
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'fp16', 'fp32'\], got 'auto'"):
        parse_precision("auto")  # an engine computes in a precision; "auto" is for settings
    with pytest.raises(ValueError, match="'auto', 'fp32', 'fp16', 'bf16'"):
        parse_precision_setting("int8")
    with pytest.raises(ValueError, match="got None"):
        parse_precision_setting(None)


def test_auto_means_fp16_on_cuda_and_fp32_elsewhere() -> None:
    assert resolve_precision("auto", "cuda:1") == "fp16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp64", "cpu")


def test_settings_and_manifests_read_the_same_list() -> None:
    from ditepose.model.repository import ManifestError, ModelManifest
    from ditepose.service.core.settings import ModelSpec, Settings

    assert get_args(Settings.model_fields["precision"].annotation) == PRECISION_SETTINGS
    assert ModelSpec(name="m", precision="bf16").precision == "bf16"
    with pytest.raises(ValueError):
        ModelSpec(name="m", precision="int8")
    assert ModelManifest.from_dict({"precision": "fp16"}).precision == "fp16"
    with pytest.raises(ManifestError, match=r"key 'precision' must be one of \['auto', 'fp32', 'fp16', 'bf16'\]"):
        ModelManifest.from_dict({"precision": "int8"}, source="m/manifest.json")

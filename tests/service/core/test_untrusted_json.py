"""The untrusted-JSON reader: pydantic's parser under a size and a depth limit, errors naming the field."""

from __future__ import annotations

import math

import pytest
from pydantic import TypeAdapter

from ditepose.service.core.errors import ServiceError
from ditepose.service.core.untrusted_json import ANY_JSON, JSON_OBJECT, nesting_depth, read_json

LIMIT = 1024 * 1024


def _error(raw: str | bytes, adapter: TypeAdapter = ANY_JSON, **limits: int) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        read_json(raw, adapter, field="boxes", max_bytes=limits.pop("max_bytes", LIMIT), code="bad_boxes", **limits)
    assert info.value.code == "bad_boxes"
    assert info.value.message.startswith("boxes"), info.value.message
    return info.value


@pytest.mark.parametrize("depth", [250, 5000, 100_000])
def test_nesting_past_the_parser_limit_is_a_clear_error_not_a_recursion_error(depth: int) -> None:
    for raw in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth, "[" * depth):
        error = _error(raw)
        assert "not valid JSON" in error.message
    assert "nested too deeply" in _error("[" * 5000 + "]" * 5000).message


def test_nesting_within_the_parser_but_past_our_limit_names_the_limit() -> None:
    error = _error("[" * 40 + "]" * 40)
    assert "nested 40 levels deep; the limit is 32" in error.message
    assert read_json("[" * 32 + "]" * 32, ANY_JSON, field="boxes", max_bytes=LIMIT) is not None
    assert "limit is 2" in _error("[[[1]]]", max_depth=2).message


def test_size_is_checked_before_parsing() -> None:
    error = _error("[" + "1," * 1000 + "1]", max_bytes=100)
    assert "2003 bytes of JSON; the limit is 100" in error.message


def test_syntax_and_shape_errors_name_the_field_and_never_echo_the_input() -> None:
    secret = "x" * 500
    for raw in (f'["{secret}"', f"{{{secret}", b"\xff\xfe", "", '"\\ud800"'):
        error = _error(raw)
        assert secret not in error.message and "not valid JSON" in error.message
    error = _error("[1, 2]", JSON_OBJECT)
    assert error.message == "boxes: Input should be an object"
    error = _error('[[1, "a"]]', TypeAdapter(list[list[float]]))
    assert error.message.startswith("boxes.0.1: "), error.message


def test_what_json_loads_accepted_still_parses() -> None:
    value = read_json('{"a": [1, 2.5, null, true, "é"], "b": {"c": -1e300}, "a2": NaN}', JSON_OBJECT,
                      field="body", max_bytes=LIMIT)
    assert value["a"] == [1, 2.5, None, True, "é"] and value["b"] == {"c": -1e300}
    assert isinstance(value["a2"], float) and math.isnan(value["a2"])
    assert read_json(b"[[10, 20, 30, 40]]", ANY_JSON, field="boxes", max_bytes=LIMIT) == [[10, 20, 30, 40]]
    assert read_json(str(10**30), ANY_JSON, field="n", max_bytes=LIMIT) == 10**30


def test_nesting_depth_counts_levels_without_recursion() -> None:
    assert nesting_depth(1) == 0 and nesting_depth([]) == 1 and nesting_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(50_000):
        deep = [deep]
    assert nesting_depth(deep) == 50_001

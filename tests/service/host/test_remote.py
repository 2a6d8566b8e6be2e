"""What crosses the pipe keeps its meaning: batcher errors by class, refusals by message."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ditepose.service.batching.batcher import (
    BatcherClosed,
    BatcherError,
    DeadlineExceeded,
    InferenceFailed,
    Overloaded,
)
from ditepose.service.core.errors import from_batcher_error
from ditepose.service.core.settings import Settings
from ditepose.service.host.remote import error_kind, make_error
from ditepose.service.server import refuse_for_processes


@pytest.mark.parametrize(("error", "code"), [
    (Overloaded("full"), "overloaded"), (DeadlineExceeded("late"), "timeout"),
    (InferenceFailed("boom"), "inference_failed"), (BatcherClosed("closed"), "unavailable"),
])
def test_a_host_error_is_the_same_error_on_the_front_end(error: BatcherError, code: str) -> None:
    again = make_error(error_kind(error), str(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert from_batcher_error(again).code == code


def test_an_unexpected_host_error_is_an_internal_error() -> None:
    again = make_error(error_kind(KeyError("x")), "KeyError: 'x'")
    assert type(again) is BatcherError
    assert from_batcher_error(again).code == "internal"


def test_a_model_repository_is_refused_with_several_processes_and_nothing_else_is() -> None:
    assert refuse_for_processes(Settings(_env_file=None)) is None
    why = refuse_for_processes(SimpleNamespace(model_repository=Path("/srv/models")))  # type: ignore[arg-type]
    assert why is not None and "api_processes=1" in why and "/srv/models" in why

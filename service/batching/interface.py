"""The pool as its callers see it: :class:`InferencePool`, the one interface of the worker pool.

Two classes implement it: :class:`~ditepose.service.batching.pool.WorkerPool` (workers in this
process) and :class:`~ditepose.service.host.remote.RemotePool` (a front-end of ``--api-processes``,
whose workers are the inference host's). The pose service, the REST routes, the gRPC server and
the metrics are typed against this Protocol, so the type checker holds both to it and no caller
has to ask a pool what it can do.

Where a remote pool lacks a capability, the interface says how it answers:

* versions: :meth:`InferencePool.lease` yields the single served (model, batcher) pair;
  :meth:`InferencePool.retiring` is always None (no swaps run on a front-end);
* counters it does not keep (:attr:`InferencePool.swaps`, :attr:`InferencePool.model_requests`)
  are empty, and :meth:`InferencePool.count_request` counts nothing;
* :attr:`InferencePool.default_model` is None: the settings name the default model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import torch

from ditepose.model.detectors import StagedDetector
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.batching.worker import BatchObserver, WorkerStatus


class Announcement(Protocol):
    """A submission on its way (see :meth:`PoolBatcher.announce`): settled when it arrives or is abandoned."""

    @property
    def settled(self) -> bool: ...

    def settle(self) -> None: ...


ArrivalT = TypeVar("ArrivalT", bound=Announcement)


class PoolBatcher(Protocol[ArrivalT]):
    """A model's or detector's queue as a request sees it. ``submit`` takes the announcements of
    the same batcher's ``announce`` (hence the type parameter)."""

    @property
    def name(self) -> str: ...

    @property
    def detector(self) -> str | None: ...

    @property
    def depth(self) -> int: ...

    @property
    def rejected(self) -> int: ...

    @property
    def expired(self) -> int: ...

    def check_admission(self) -> None:
        """Raise ``Overloaded`` when the queue would take nothing more (shed before decoding)."""

    def announce(self) -> ArrivalT:
        """Tell the workers crops are coming (they keep a batch open for them)."""

    async def submit(
        self, crops: torch.Tensor, timeout_s: float | None = None, arrival: ArrivalT | None = None
    ) -> torch.Tensor:
        """Queue ``crops`` and await their outputs."""


# A batcher of either pool: its announcements go back to itself only, which the type cannot say.
AnyBatcher = PoolBatcher[Any]


class ServedPair(Protocol):
    """The version of a model a request holds: the model and the batcher whose engines run it."""

    @property
    def model(self) -> LoadedModel: ...

    @property
    def batcher(self) -> AnyBatcher: ...

    @property
    def version(self) -> str: ...


class InferencePool(Protocol):
    """What the pose service, the transports and the metrics use of a worker pool."""

    @property
    def models(self) -> Mapping[str, LoadedModel]:
        """The served models by name (their served version)."""

    @property
    def failed_models(self) -> Mapping[str, str]:
        """Models that did not load: name -> why."""

    @property
    def devices(self) -> Sequence[str]: ...

    @property
    def default_model(self) -> str | None:
        """The model of requests that name none, when the pool decided it (None: the settings say)."""

    @property
    def ready(self) -> bool:
        """Started, not stopped, and every worker alive."""

    @property
    def batchers(self) -> Mapping[str, AnyBatcher]:
        """Every queue: one per served model, ``detect:<name>`` per person detector."""

    @property
    def swaps(self) -> Mapping[str, int]:
        """Completed swaps per model (empty where none run)."""

    @property
    def model_requests(self) -> Mapping[tuple[str, str, str], int]:
        """Answered requests per (model, version, 'ok'|'error') (empty where not counted)."""

    def lease(self, name: str) -> AbstractContextManager[ServedPair]:
        """The served version of ``name`` (KeyError if none), held for the block."""

    def count_request(self, name: str, version: str, outcome: str) -> None: ...

    def retiring(self, name: str) -> ServedPair | None:
        """The old version of ``name`` still draining after a swap, if any."""

    def batcher(self, model: str) -> AnyBatcher: ...

    def detector_batcher(self, name: str) -> AnyBatcher | None: ...

    def add_detector(self, detector: StagedDetector, max_batch_size: int = 8) -> AnyBatcher: ...

    def add_observer(self, observer: BatchObserver) -> None: ...

    def worker_status(self) -> list[WorkerStatus]: ...

    def queue_depths(self) -> dict[str, int]: ...

    def stop(self, timeout_s: float = 10.0) -> None: ...

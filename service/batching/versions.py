"""Model versions in a running pool: which version serves, who holds it, swaps and drains.

A served model can be replaced by a new version while requests flow (:meth:`ModelVersions.swap`):
the new version's engines are built and checked on every device beside the old ones, then the
served (model, batcher) pair is replaced under the pool lock. A request takes the pair once
(:meth:`ModelVersions.lease`), so its crops, its pipeline and the batcher it submits to always
belong to one version; the old version keeps running what its requests queued and is freed
(engines closed, CUDA cache emptied) when the last request holding it has finished. At most two
versions of a model are resident: a swap first waits for the previous old version to drain, and
that is the only drain wait (a loader passed to :meth:`ModelVersions.swap` runs after it, so a
third version is never even loaded).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ditepose.service.batching.batcher import DynamicBatcher
from ditepose.service.batching.infer import InferFn
from ditepose.service.batching.loaded_model import LoadedModel
from ditepose.service.batching.worker import close_engines, release_memory

log = logging.getLogger(__name__)

# check(model, infer, device) raises when the engine of a new version must not serve (see swap)
EngineCheck = Callable[[LoadedModel, InferFn, str], None]


class SwapRefused(RuntimeError):
    """A swap could not start: the previous old version of the model is still draining."""


class ServedModel:
    """One resident version of a model: what requests take together (see :meth:`ModelVersions.lease`)."""

    def __init__(self, model: LoadedModel, batcher: DynamicBatcher) -> None:
        self.model = model
        self.batcher = batcher
        self.leases = 0  # requests holding this version now
        self.retiring = False
        self.swapped_at = time.time()

    @property
    def version(self) -> str:
        return self.model.version


class VersionHost(Protocol):
    """What :class:`ModelVersions` needs of its pool (:class:`~ditepose.service.batching.pool.WorkerPool`):
    the lock every batcher and worker shares, the served names, and the engines of a version."""

    condition: threading.Condition
    models: dict[str, LoadedModel]
    batchers: dict[str, DynamicBatcher]
    failed_models: dict[str, str]
    devices: list[str]

    @property
    def stopped(self) -> bool: ...

    def build_infers(self, model: LoadedModel, check: EngineCheck | None = None) -> dict[str, InferFn]: ...

    def new_batcher(self, name: str, max_batch_size: int | None = None, detector: str | None = None,
                    version: str | None = None, key: str | None = None) -> DynamicBatcher: ...

    def attach(self, batcher: DynamicBatcher, infers: dict[str, InferFn]) -> None: ...

    def detach(self, batchers: Sequence[DynamicBatcher]) -> list[InferFn]: ...


class ModelVersions:
    """The served and draining versions of a pool's models, their leases and the swap counters."""

    def __init__(self, pool: VersionHost, drain_timeout_s: float) -> None:
        self._pool = pool
        self.drain_timeout_s = drain_timeout_s  # how long a swap waits for the previous old version
        self._served: dict[str, ServedModel] = {}
        self._retiring: dict[str, ServedModel] = {}  # name -> the old version still draining after a swap
        self._swap_locks: dict[str, threading.Lock] = {}
        self._generation = 0
        self.swaps: dict[str, int] = {}  # name -> completed swaps (Prometheus)
        self.model_requests: dict[tuple[str, str, str], int] = {}  # (name, version, ok|error) -> requests
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------ bookkeeping (pool lock held)
    def serve(self, model: LoadedModel, batcher: DynamicBatcher) -> ServedModel:
        """Record ``model`` as the served version of its name (a model that joins the pool)."""
        entry = self._served[model.name] = ServedModel(model, batcher)
        return entry

    def forget(self, name: str) -> list[DynamicBatcher]:
        """``name`` leaves the pool: drop its versions; returns the draining version's batcher, if any."""
        self._served.pop(name, None)
        old = self._retiring.pop(name, None)
        return [] if old is None else [old.batcher]

    def draining(self) -> list[ServedModel]:
        """The old versions still draining, one per model at most."""
        return list(self._retiring.values())

    # ------------------------------------------------------------ what requests see
    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[ServedModel]:
        """The served version of ``name`` (KeyError if none), held until the block ends: a swap
        meanwhile does not free it, so the caller's crops run on the version it prepared them for."""
        condition = self._pool.condition
        with condition:
            entry = self._served[name]
            entry.leases += 1
        try:
            yield entry
        finally:
            with condition:
                entry.leases -= 1
                if entry.retiring and entry.leases == 0:
                    condition.notify_all()

    def count_request(self, name: str, version: str, outcome: str) -> None:
        """A request answered by ``name``'s ``version`` (``outcome`` 'ok' or 'error'), for Prometheus."""
        key = (name, version, outcome)
        with self._count_lock:
            self.model_requests[key] = self.model_requests.get(key, 0) + 1

    def served(self, name: str) -> ServedModel:
        """The served version of ``name`` now (KeyError if none), without holding it."""
        return self._served[name]

    def retiring(self, name: str) -> ServedModel | None:
        """The old version of ``name`` still draining after a swap, if any."""
        return self._retiring.get(name)

    def resident_versions(self, name: str) -> list[str]:
        """Versions of ``name`` in memory now: the served one, then a draining one (at most two)."""
        entries = [self._served.get(name), self._retiring.get(name)]
        return [entry.version for entry in entries if entry is not None]

    def wait_drained(self, name: str, timeout_s: float | None = None) -> bool:
        """Wait until no old version of ``name`` is draining; False after ``timeout_s`` (default:
        :attr:`drain_timeout_s`)."""
        deadline = time.monotonic() + (self.drain_timeout_s if timeout_s is None else timeout_s)
        condition = self._pool.condition
        with condition:
            while name in self._retiring:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                condition.wait(min(left, 0.5))
        return True

    # ------------------------------------------------------------ swaps
    def swap(self, name: str, load: Callable[[], LoadedModel], check: EngineCheck | None = None,
             drain_timeout_s: float | None = None) -> ServedModel:
        """Serve the version ``load()`` returns instead of the served version of ``name`` (or beside
        the others, for a new name).

        First waits up to ``drain_timeout_s`` (default :attr:`drain_timeout_s`: twice the request
        deadline, which bounds every queued item) for the previous old version to be freed, and
        raises :class:`SwapRefused` if it is still draining: at most two versions are resident.
        Then loads, builds and ``check``-s the new engines on every device (any exception: nothing
        changes and it propagates), and replaces the served pair under the pool lock: new requests
        get the new version, and the old one finishes what its requests queued and is freed once
        none holds it."""
        with self._pool.condition:
            lock = self._swap_locks.setdefault(name, threading.Lock())
        with lock:
            if not self.wait_drained(name, drain_timeout_s):
                raise SwapRefused(f"model {name!r}: version {self._retiring[name].version} is still draining "
                                  "from the previous swap; at most two versions are resident")
            model = load()
            if model.name != name:
                raise ValueError(f"a swap of {name!r} was handed model {model.name!r}")
            if name not in self._served:
                return self._serve_new(model, check)
            return self._replace(model, check)

    def _serve_new(self, model: LoadedModel, check: EngineCheck | None) -> ServedModel:
        """A swap to a name the pool does not serve yet: the model joins beside the others."""
        pool = self._pool
        if model.name in pool.batchers:
            raise ValueError(f"{model.name!r} is not a served model of this pool")
        infers = pool.build_infers(model, check)
        batcher = pool.new_batcher(model.name, max_batch_size=model.max_batch_size, version=model.version)
        with pool.condition:
            pool.attach(batcher, infers)
            pool.batchers[model.name] = batcher
            pool.models[model.name] = model
            entry = self.serve(model, batcher)
            pool.failed_models.pop(model.name, None)
            pool.condition.notify_all()
        log.info("model %r version %s now served", model.name, model.version)
        return entry

    def _replace(self, model: LoadedModel, check: EngineCheck | None) -> ServedModel:
        """The switch itself: the new pair serves, the old one drains (freed by :meth:`_retire`)."""
        pool, name = self._pool, model.name
        infers = pool.build_infers(model, check)
        with pool.condition:
            self._generation += 1
            batcher = pool.new_batcher(name, max_batch_size=model.max_batch_size, version=model.version,
                                       key=f"{name}#{self._generation}")
            pool.attach(batcher, infers)
            old = self._served[name]
            entry = self.serve(model, batcher)
            pool.batchers[name] = batcher
            pool.models[name] = model
            old.retiring = True
            self._retiring[name] = old
            self.swaps[name] = self.swaps.get(name, 0) + 1
            pool.condition.notify_all()
        log.info("model %r: version %s now served; version %s drains", name, model.version, old.version)
        # The thread gets the name, not ``old``: a Thread keeps its args until its target returns,
        # which would keep the retired version referenced after it is freed.
        threading.Thread(target=self._retire, args=(name,), name=f"ditepose-retire-{name}", daemon=True).start()
        return entry

    def _retire(self, name: str) -> None:
        """Free the old version of ``name`` once no request holds it and its queue is empty.

        It stays in :attr:`_retiring` until its batcher is closed and its engines are released, so
        :meth:`wait_drained` returning means the old version is gone, not merely unqueued."""
        pool = self._pool
        with pool.condition:
            entry = self._retiring.get(name)
            if entry is None:  # the model left the pool before this thread ran
                return
            while not pool.stopped and (entry.leases or not entry.batcher.idle):
                pool.condition.wait(0.5)
            infers = pool.detach([entry.batcher])
        served = pool.models[name].version if name in pool.models else "?"
        entry.batcher.close(f"version {entry.version} of model {name!r} was replaced by version {served}; "
                            "submit again")
        close_engines(infers)
        version = entry.version
        with pool.condition:
            if self._retiring.get(name) is entry:
                del self._retiring[name]
            del entry, infers
            pool.condition.notify_all()
        release_memory(pool.devices)
        log.info("model %r: version %s freed", name, version)

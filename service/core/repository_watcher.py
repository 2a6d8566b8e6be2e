"""Serving from a model repository: load at start, poll for new versions, reload on demand, swap.

The repository's format (``<name>/<version>/checkpoint.pth`` + ``manifest.json``) belongs to
:mod:`ditepose.model.repository`; this module decides what the pool serves from it. Every
``repository_poll_s`` (or at once on ``POST /v1/models/{name}/reload`` / gRPC ``ReloadModel``)
each model's manifest is resolved to a version; when that differs from the served one (a newer
version, a pin, an unpin, changed serving options) the version is loaded on the CPU, its engines
are built and checked on every device beside the old ones (:func:`~ditepose.service.core.model_loader.check_engine`)
and the pool swaps it in (:meth:`~ditepose.service.batching.pool.WorkerPool.swap_model`). A
version that fails is recorded (``/v1/models``, ``/readyz``, the log,
``ditepose_model_load_failures_total``) and not retried by the poller until its files or the
manifest change; the served version keeps serving. A model whose folder disappears keeps
serving what it has (removing a model from a running service takes a restart): an operator's
mistaken ``rm`` must not fail traffic.

``--model name=path`` models are reloadable too: a reload re-reads the file and swaps when its
content (its sha256 version) changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditepose.model.repository import ManifestError, ResolvedVersion, list_versions, resolve, scan
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.batching.versions import SwapRefused
from ditepose.service.core.model_loader import (
    LoadedModel,
    check_engine,
    check_model,
    file_version,
    load_model,
    short_reason,
)
from ditepose.service.core.settings import ModelSpec, Settings

log = logging.getLogger(__name__)


@dataclass
class ModelState:
    """What /v1/models and ListModels say about one model's versions."""

    name: str
    source: str  # 'flag' or 'repository'
    served_version: str | None = None
    available: list[int] = field(default_factory=list)  # complete versions in the repository
    pinned: int | None = None
    state: str = "loading"  # loading | serving | failed (nothing served) | swapping
    error: str | None = None  # the last failure, cleared when a version is swapped in
    failed_versions: dict[str, str] = field(default_factory=dict)  # version -> why it was rejected
    swapped_at: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "served_version": self.served_version, "available_versions": self.available,
                "pinned_version": self.pinned, "state": self.state, "error": self.error,
                "failed_versions": dict(self.failed_versions), "swapped_at": self.swapped_at}


class ModelRepositoryWatcher:
    """Owns the version bookkeeping of every served model; one per pool, built with it by the
    composition root (:func:`ditepose.service.core.serving.build_pool`), which also starts and
    stops it. The pose service reaches it as :attr:`PoseService.versions`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository: Path | None = settings.model_repository
        self.poll_s = settings.repository_poll_s
        self.pool: WorkerPool | None = None
        self.states: dict[str, ModelState] = {}
        self.load_failures: dict[tuple[str, str], int] = {}  # (model, version) -> count (Prometheus)
        self._specs: dict[str, ModelSpec] = {}
        self._rejected: dict[str, tuple] = {}  # name -> signature of the candidate that failed
        self._served_sig: dict[str, tuple] = {}  # name -> signature of what is served
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- start-up
    def flag_specs(self) -> list[ModelSpec]:
        """The ``models`` setting; with a repository and no models set explicitly, none (not the
        default demo model)."""
        if self.repository is not None and "models" not in self.settings.model_fields_set:
            specs: list[ModelSpec] = []
        else:
            specs = list(self.settings.models)
        self._specs = {spec.name: spec for spec in specs}
        return specs

    def initial_models(self, taken: set[str]) -> list[LoadedModel]:
        """The repository's models at start: each model's resolved version, or, when that one fails
        its checks and is not pinned, the newest older version that passes."""
        if self.repository is None:
            return []
        try:
            found = scan(self.repository)
        except FileNotFoundError as exc:
            log.error("model repository: %s; polling for it every %.1f s", exc, self.poll_s)
            return []
        loaded = []
        for name, model_dir in found.items():
            if name in taken:
                self._collision(name)
                continue
            state = self.states[name] = ModelState(name, "repository")
            try:
                resolved = resolve(model_dir)
            except ManifestError as exc:
                self._failed(state, "manifest", exc)
                continue
            state.available = list_versions(model_dir)
            if resolved is None:
                state.state, state.error = "failed", f"no complete version in {model_dir}"
                continue
            state.pinned = resolved.version if resolved.pinned else None
            candidates = [resolved.version] if resolved.pinned else \
                [v for v in reversed(state.available) if v <= resolved.version]
            for version in candidates:
                try:
                    model = self._load(resolved if version == resolved.version else _at_version(resolved, version))
                    check_model(model)
                except Exception as exc:
                    self._failed(state, str(version), exc)
                    continue
                loaded.append(model)
                self._served_sig[name] = _signature(resolved if version == resolved.version
                                                    else _at_version(resolved, version))
                state.served_version, state.state, state.swapped_at = model.version, "serving", time.time()
                break
        return loaded

    def attach(self, pool: WorkerPool) -> None:
        """Manage ``pool``'s versions from now on (:meth:`start` starts the poller)."""
        self.pool = pool
        for name, model in pool.models.items():
            if name not in self.states:
                self.states[name] = ModelState(name, model.source, model.version, state="serving",
                                               swapped_at=time.time())
        for name, reason in pool.failed_models.items():
            self.states.setdefault(name, ModelState(name, "flag", state="failed", error=reason))
        for state in self.states.values():
            if state.source == "repository" and state.served_version is None:
                state.state = "failed"
                pool.failed_models.setdefault(state.name, state.error or "no version could be loaded")

    def start(self) -> None:
        if self.repository is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="ditepose-repository", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception:  # the poller must outlive a bad scan (e.g. the volume went away)
                log.exception("model repository poll failed")

    # ---------------------------------------------------------------- polling and reloads
    def poll_once(self) -> None:
        """One scan of the repository: every model whose resolved version changed is swapped."""
        if self.repository is None:
            return
        try:
            found = scan(self.repository)
        except FileNotFoundError as exc:
            log.warning("model repository: %s", exc)
            return
        for name, model_dir in found.items():
            if self._stop.is_set():
                return
            if name in self._specs:
                self._collision(name)
                continue
            self.sync(name, model_dir, forced=False)
        for name, state in list(self.states.items()):  # a reload may add one meanwhile
            if state.source == "repository" and name not in found and state.served_version is not None:
                state.error = (f"the folder of model {name!r} left the repository; version "
                               f"{state.served_version} keeps serving until a restart")

    def reload(self, name: str) -> ModelState:
        """Reload ``name`` now (KeyError when the service has no model of that name): a repository
        model resolves its manifest again (and retries a version that failed before); a ``--model``
        checkpoint is re-read and swapped if its content changed."""
        if name in self._specs:
            return self._reload_flag(name)
        if self.repository is not None:
            model_dir = self.repository / name
            if not name.startswith(".") and model_dir.is_dir():
                return self.sync(name, model_dir, forced=True)
        if name in self.states:
            state = self.states[name]
            state.error = f"model {name!r} is no longer in the repository {self.repository}"
            return state
        raise KeyError(name)

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def sync(self, name: str, model_dir: Path, forced: bool) -> ModelState:
        """Serve what ``model_dir``'s manifest resolves to, if that is not what is served."""
        with self._lock(name):
            state = self.states.setdefault(name, ModelState(name, "repository"))
            state.available = list_versions(model_dir)
            try:
                resolved = resolve(model_dir)
            except ManifestError as exc:
                signature: tuple = ("manifest", str(exc))
                if forced or self._rejected.get(name) != signature:
                    self._rejected[name] = signature
                    self._failed(state, "manifest", exc)
                return state
            if resolved is None:
                state.error = f"no complete version in {model_dir}"
                return state
            state.pinned = resolved.version if resolved.pinned else None
            signature = _signature(resolved)
            if self._served_sig.get(name) == signature:
                return state
            if not forced and self._rejected.get(name) == signature:
                return state  # reported already; retried when its files or the manifest change, or on reload
            try:
                self._swap_in(state, lambda: self._load(resolved), str(resolved.version))
            except SwapRefused as exc:
                log.warning("model %r: %s", name, exc)  # not the version's fault: tried again next time
            except Exception:
                self._rejected[name] = signature
            else:
                self._served_sig[name] = signature
                self._rejected.pop(name, None)
            return state

    def _reload_flag(self, name: str) -> ModelState:
        spec = self._specs[name]
        with self._lock(name):
            state = self.states.setdefault(name, ModelState(name, "flag"))
            if spec.checkpoint is None:
                return state  # the project's default checkpoint or demo weights: nothing to re-read
            try:
                version = file_version(spec.checkpoint)
            except OSError as exc:
                self._failed(state, "unreadable", exc)
                return state
            if version == state.served_version:
                return state
            try:
                self._swap_in(state, lambda: load_model(spec, version=version), version)
            except SwapRefused as exc:
                state.error = str(exc)
            except Exception:
                pass  # recorded by _swap_in; the served version keeps serving
            return state

    def _swap_in(self, state: ModelState, load: Callable[[], LoadedModel], version: str) -> None:
        """Load, check on every device and swap; on failure record it and re-raise."""
        pool = self.pool
        assert pool is not None, "attach the watcher to its pool first"
        previous = state.state
        state.state = "swapping"
        try:
            # the pool's one drain wait comes first: the new version loads only once a third copy
            # could not be resident (SwapRefused when the previous old version is still draining)
            pool.load_and_swap(state.name, load, check=check_engine)
        except SwapRefused:
            state.state = previous
            raise
        except Exception as exc:
            state.state = previous if state.served_version is not None else "failed"
            self._failed(state, version, exc)
            raise
        state.served_version, state.state, state.error = version, "serving", None
        state.failed_versions.pop(version, None)
        state.swapped_at = time.time()

    def _load(self, resolved: ResolvedVersion) -> LoadedModel:
        options = resolved.manifest.to_model_options()
        spec = ModelSpec(name=resolved.name, checkpoint=resolved.checkpoint, **options)
        return load_model(spec, version=str(resolved.version), source="repository")

    def _failed(self, state: ModelState, version: str, exc: BaseException) -> None:
        reason = short_reason(exc)
        state.error = f"version {version}: {reason}"
        state.failed_versions[version] = reason
        while len(state.failed_versions) > 20:
            state.failed_versions.pop(next(iter(state.failed_versions)))
        key = (state.name, version)
        self.load_failures[key] = self.load_failures.get(key, 0) + 1
        serving = f"version {state.served_version} keeps serving" if state.served_version else "nothing served"
        log.error("model %r version %s rejected (%s): %s", state.name, version, serving, reason)

    def _collision(self, name: str) -> None:
        state = self.states.get(name)
        if state is not None and state.source == "flag":
            state.error = (f"the repository also has a model {name!r}; the --model/DITEPOSE_MODELS one is "
                           "served and the repository's is ignored")

    def describe(self, name: str) -> dict[str, Any]:
        state = self.states.get(name)
        return state.describe() if state is not None else {}


def _signature(resolved: ResolvedVersion) -> tuple:
    """What identifies a candidate: its version, its file and the manifest's serving options."""
    try:
        stat = resolved.checkpoint.stat()
        files: tuple[int | None, int | None] = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        files = (None, None)
    return (resolved.version, str(resolved.checkpoint), *files,
            tuple(sorted(resolved.manifest.to_model_options().items())))


def _at_version(resolved: ResolvedVersion, version: int) -> ResolvedVersion:
    """``resolved`` moved to an older complete ``version`` of the same model (start-up fallback)."""
    from dataclasses import replace

    checkpoints = [p for p in (resolved.model_dir / str(version)).iterdir() if p.suffix in (".pth", ".pt")]
    return replace(resolved, version=version, checkpoint=checkpoints[0], sidecar={})

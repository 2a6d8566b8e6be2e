"""ProcessEngine (backend ``torch``, ``process=True``): an InferenceEngine in a child process, called like one.

Why: at batch 1 most of a Dite-HRNet forward pass is the fixed cost of ~2,000 small ops, and
the Python half of it holds the GIL. Two engines on two threads of one process therefore scale
little (measured ~1.0x on overhead-bound inputs, 1.25-1.4x at 256x192), while two processes
with one torch thread each run fully in parallel. The parent sends the batch as raw bytes over
a pipe (a 256x192 crop is 0.6 MB: well under a millisecond) and waits without holding the GIL.

A child that dies (killed, out of memory, a native crash) fails the call in flight with
``EngineProcessDied``; the next call starts a fresh child. ``close()`` stops it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def stat_cpu_seconds(path: Path) -> float:
    """utime + stime, in seconds, from a Linux ``/proc/<pid>[/task/<tid>]/stat`` file."""
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class EngineProcessDied(RuntimeError):
    """The child process ended while (or before) running a batch."""


def _child_main(conn: Connection, module_bytes: bytes, engine_kwargs: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    from ditepose.model.engines.torch_engine import InferenceEngine

    module = pickle.loads(module_bytes)
    engine = InferenceEngine(module, "cpu", **engine_kwargs)
    conn.send(("ready", engine.describe()))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent closed its end
            return
        if message is None:
            return
        shape, data = message
        try:
            batch = torch.from_numpy(np.frombuffer(data, np.float32).reshape(shape).copy())
            out = engine(batch).numpy()
            conn.send(("ok", (out.shape, out.tobytes())))
        except Exception as exc:  # the caller gets the engine's own error, the child keeps serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessEngine:
    """``InferenceEngine(module, 'cpu', **engine_kwargs)`` run in a child with ``threads`` torch threads.

    One call at a time (a lock serialises callers): give each worker thread its own instance.
    """

    def __init__(self, module: nn.Module, threads: int = 1, start_timeout_s: float = 120.0, **engine_kwargs: Any) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._module_bytes = pickle.dumps(module.cpu())
        self.threads = threads
        self.engine_kwargs = engine_kwargs
        self.start_timeout_s = start_timeout_s
        self.num_joints = int(getattr(module, "num_joints", 0))
        self.restarts = -1  # the first start is not a restart
        self._lock = threading.Lock()
        self._process: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._description: dict[str, Any] = {}
        self._start()

    # ------------------------------------------------------------ child lifecycle
    def _start(self) -> None:
        context = mp.get_context("spawn")  # no fork of a process with threads and OpenMP state
        parent, child = context.Pipe()
        process = context.Process(
            target=_child_main,
            args=(child, self._module_bytes, self.engine_kwargs, self.threads),
            name="ditepose-engine",
            daemon=True,
        )
        process.start()
        child.close()
        if not parent.poll(self.start_timeout_s):
            process.kill()
            raise EngineProcessDied(f"the engine process did not start within {self.start_timeout_s} s")
        try:
            _, description = parent.recv()
        except EOFError as exc:
            process.join(5)
            raise EngineProcessDied(f"the engine process exited while starting (code {process.exitcode})") from exc
        self._process, self._conn, self._description = process, parent, description
        self.restarts += 1

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the current child has used so far; 0.0 if unknown."""
        try:
            return stat_cpu_seconds(Path(f"/proc/{self.pid}/stat")) if self.pid is not None else 0.0
        except OSError:
            return 0.0

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(None)
                self._conn.close()
            if self._process is not None:
                self._process.join(5)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join(5)
            self._process = self._conn = None

    def __del__(self) -> None:  # best effort: daemon children die with the parent anyway
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    # ------------------------------------------------------------ calls
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(batch).__name__}")
        if batch.dim() != 4:
            raise ValueError(f"expected an NCHW batch, got shape {tuple(batch.shape)}")
        data = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            if not self.alive():
                log.warning("engine process gone (exit code %s): starting a new one",
                            self._process.exitcode if self._process is not None else None)
                self._start()
            assert self._conn is not None
            try:
                self._conn.send((data.shape, data.tobytes()))
                status, payload = self._conn.recv()
            except (EOFError, OSError) as exc:
                code = self._process.exitcode if self._process is not None else None
                if self._process is not None:
                    self._process.join(1)
                    code = self._process.exitcode
                raise EngineProcessDied(f"the engine process died running a batch (exit code {code})") from exc
        if status == "error":
            raise RuntimeError(payload)
        shape, raw = payload
        return torch.from_numpy(np.frombuffer(raw, np.float32).reshape(shape).copy())

    def describe(self) -> dict[str, Any]:
        return {**self._description, "process": True, "pid": self.pid, "torch_threads": self.threads,
                "restarts": self.restarts}

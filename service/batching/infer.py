"""``infer(crops) -> heatmaps`` callables: a model's engine on one device, or a pool's batcher.

The worker pool only needs a callable per model and device (:func:`make_served_engine`, the pool's
reading of :func:`ditepose.model.engines.select.choose_engine`: OpenVINO on a CPU where it is
installed and agrees with the fp32 torch engine, else the project's optimised torch engine, or that
engine in a child process). :class:`BatcherInfer` is the other way round: an ``infer`` for the
evaluation loop that sends the crops through a pool's batcher as background work, so an
evaluation job is batched with (and yields to) live requests instead of competing with them
for the cores.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from ditepose.model.engines import Backend, Engine, InferFn, Precision, buckets_up_to, build_engine
from ditepose.model.engines.openvino import serving_buckets
from ditepose.model.engines.select import EngineChoice, choose_engine
from ditepose.service.batching.batcher import DynamicBatcher

__all__ = ["BatcherInfer", "InferFn", "make_infer", "make_served_engine"]

log = logging.getLogger(__name__)


def make_served_engine(
    module: nn.Module, device: str, precision: str = "auto", process: bool = False, threads: int | None = None,
    cuda_graphs: bool = False, max_batch_size: int = 32, input_hw: tuple[int, int] = (256, 192),
    engine: str = "auto", shared_by: int = 1,
) -> tuple[InferFn, EngineChoice]:
    """The engine that serves ``module`` on ``device``, and why it was chosen
    (:func:`~ditepose.model.engines.select.choose_engine`: ``engine`` auto | torch | openvino, the
    agreement gate for anything but the fp32 torch engine).

    ``process``: on CPU, a torch engine runs in a child process with ``threads`` torch threads
    (default 1); an OpenVINO engine runs in this process (its calls release the GIL). ``threads``:
    also OpenVINO's inference threads. ``shared_by``: worker threads calling this one engine (OpenVINO
    then runs a stream per thread). ``cuda_graphs``: on a CUDA device, one graph per batch bucket
    (powers of two up to ``max_batch_size``), all captured here at ``input_hw`` so that no request
    pays for a capture; ignored on CPU devices. OpenVINO compiles its buckets (1 and 4:
    :data:`~ditepose.model.engines.openvino.SERVING_BUCKETS`, each costs memory and larger ones gain no
    speed on a CPU) here, from its disk cache when it has them, so their memory is part of the idle
    footprint and no request waits for a compile."""
    on_cpu, graphed = device.startswith("cpu"), cuda_graphs and device.startswith("cuda")

    def build(backend: Backend, resolved: Precision) -> Engine:
        if backend == "openvino":
            return build_engine(module, device, resolved, "openvino", threads=threads, shared_by=shared_by,
                                batch_buckets=serving_buckets(max_batch_size), warmup_hw=input_hw)
        return build_engine(
            module, device, resolved, process=process and on_cpu, threads=threads,
            cuda_graphs=graphed, batch_buckets=buckets_up_to(max_batch_size) if graphed else None,
            warmup_hw=input_hw if graphed else None,
        )

    if process and on_cpu and engine == "auto":  # DITEPOSE_WORKER_PROCESSES asks for torch engine processes
        served, choice = choose_engine(module, device, precision, "torch", build, input_hw=input_hw)
        choice = replace(choice, reason="auto: worker processes run the torch engine in child processes "
                                        "(OpenVINO runs in the worker's own process: set engine 'openvino')")
    else:
        served, choice = choose_engine(module, device, precision, engine, build, input_hw=input_hw)
    log.info("engine on %s: %s %s (%s)", device, choice.backend, choice.precision, choice.reason)
    return served, choice


def make_infer(
    module: nn.Module, device: str, precision: str = "auto", process: bool = False, threads: int | None = None,
    cuda_graphs: bool = False, max_batch_size: int = 32, input_hw: tuple[int, int] = (256, 192),
    engine: str = "auto", shared_by: int = 1,
) -> InferFn:
    """The infer callable of :func:`make_served_engine` (the service's default CPU engine with the
    defaults: OpenVINO where it is installed and agrees, else the torch engine)."""
    return make_served_engine(module, device, precision, process, threads, cuda_graphs, max_batch_size, input_hw,
                              engine, shared_by)[0]


class BatcherInfer:
    """``infer(crops)`` through ``batcher`` as a background submission (blocks the calling thread)."""

    def __init__(self, batcher: DynamicBatcher, timeout_s: float) -> None:
        self.batcher = batcher
        self.timeout_s = timeout_s

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        return self.batcher.submit_sync(crops, self.timeout_s, background=True)

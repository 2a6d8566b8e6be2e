"""``build_engine``: the one way to get an engine, and the table that picks its backend.

Every caller (the service's worker pool through ``make_infer``, ``ditepose export check``, the
benches) asks here, so a backend is added in one place: write a builder with the signature of
:data:`EngineBuilder`, add its name to :data:`Backend` and the builder to :data:`BACKENDS`.

    torch        the project's optimised network (:class:`InferenceEngine`), in this process or,
                 with ``process=True`` on a CPU, in a child process (:class:`ProcessEngine`)
    onnxruntime  an ONNX file on onnxruntime's CPU provider (:class:`OnnxEngine`)
    openvino     the network exported per batch bucket and compiled by OpenVINO's CPU plugin, fp32 or
                 bf16 (:class:`~ditepose.model.engines.openvino.OpenVinoEngine`; compiled models are
                 cached on disk). Which backend *serves* is :mod:`~ditepose.model.engines.select`'s
                 choice (``engine = auto | torch | openvino``, behind the agreement gate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ditepose.model.engines.base import Engine
from ditepose.model.engines.precision import Precision, resolve_precision

Backend = Literal["torch", "onnxruntime", "openvino"]
ModelSource = nn.Module | str | Path  # a network (torch) or a file in the backend's format (onnxruntime)


@dataclass(frozen=True)
class EngineOptions:
    """The switches of :func:`build_engine`; a backend refuses those it cannot honour."""

    process: bool = False  # torch on a CPU: run the engine in a child process (no shared GIL)
    threads: int | None = None  # torch threads of a child process (default 1); onnxruntime's intra-op threads
    compile: bool = False  # torch.compile
    cuda_graphs: bool = False  # one CUDA graph per batch bucket (CUDA only)
    fuse_bn: bool = True  # BN folding and the fast dynamic kernels
    dynamic: str = "fast"  # torch: the dynamic kernels' implementation (bench/engine.py compares them)
    channels_last: bool | str = "auto"  # torch: the memory format ("auto": what measured fastest)
    batch_buckets: tuple[int, ...] | None = None  # fixed batch sizes (default: the engine's own)
    warmup_hw: tuple[int, int] | None = None  # warm up now at this input size (compiles, captures graphs)
    shared_by: int = 1  # openvino: threads calling one engine at once (> 1: throughput mode, a stream each)


EngineBuilder = Callable[[ModelSource, str, Precision, EngineOptions], Engine]


def _changed(options: EngineOptions) -> list[str]:
    """The switches ``options`` sets away from their defaults (a backend refuses those it lacks)."""
    defaults = asdict(EngineOptions())
    return [name for name, value in asdict(options).items() if value != defaults[name]]


def _torch_engine(model: ModelSource, device: str, precision: Precision, options: EngineOptions) -> Engine:
    from ditepose.model.engines.process_engine import ProcessEngine
    from ditepose.model.engines.torch_engine import InferenceEngine

    if not isinstance(model, nn.Module):
        raise ValueError(f"the torch backend runs a network, got {type(model).__name__} (an ONNX file runs "
                         "on backend 'onnxruntime')")
    if options.process:
        if not device.startswith("cpu") or options.cuda_graphs:
            raise ValueError(f"a child-process engine runs on the CPU (no CUDA graphs), not {device!r}")
        child = ProcessEngine(model, threads=options.threads or 1, precision=precision, fuse_bn=options.fuse_bn,
                              compile=options.compile, batch_buckets=options.batch_buckets,
                              dynamic=options.dynamic, channels_last=options.channels_last)
        if options.warmup_hw is not None:
            child(torch.zeros(1, 3, *options.warmup_hw))
        return child
    engine = InferenceEngine(model, device, precision, fuse_bn=options.fuse_bn, compile=options.compile,
                             cuda_graphs=options.cuda_graphs, batch_buckets=options.batch_buckets,
                             dynamic=options.dynamic, channels_last=options.channels_last)
    if options.warmup_hw is not None:
        engine.warmup(input_hw=options.warmup_hw)
    return engine


def _onnxruntime_engine(model: ModelSource, device: str, precision: Precision, options: EngineOptions) -> Engine:
    from ditepose.model.engines.onnxruntime_engine import OnnxEngine

    if isinstance(model, nn.Module):
        raise ValueError("the onnxruntime backend runs an ONNX file: export the network first "
                         "(ditepose export onnx)")
    if device != "cpu":
        raise ValueError(f"the onnxruntime backend runs on onnxruntime's CPU provider; device {device!r} does not apply")
    refused = ([f"precision {precision}"] if precision != "fp32" else []) + [
        name for name in _changed(options) if name not in ("threads", "warmup_hw")]
    if refused:
        raise ValueError(f"the onnxruntime backend runs the ONNX file as exported; not applicable: {', '.join(refused)}")
    engine = OnnxEngine(model, num_threads=options.threads)
    if options.warmup_hw is not None:
        engine.warmup(input_hw=options.warmup_hw)
    return engine


def _openvino_engine(model: ModelSource, device: str, precision: Precision, options: EngineOptions) -> Engine:
    from ditepose.model.dite_hrnet import TopDownPoseNet
    from ditepose.model.engines.openvino import OpenVinoEngine

    if not isinstance(model, TopDownPoseNet):
        raise ValueError(f"the openvino backend compiles a pose network, got {type(model).__name__}")
    if device != "cpu":
        raise ValueError(f"the openvino backend runs on OpenVINO's CPU plugin; device {device!r} does not apply")
    refused = ([f"precision {precision}"] if precision == "fp16" else []) + [
        name for name in _changed(options) if name not in ("threads", "batch_buckets", "warmup_hw", "shared_by")]
    if refused:
        raise ValueError(f"the openvino backend compiles the exported graph; not applicable: {', '.join(refused)}")
    # latency: one stream for one calling thread; throughput: one stream per thread sharing the engine
    shared = options.shared_by > 1
    engine = OpenVinoEngine(model, precision=precision, mode="throughput" if shared else "latency",
                            threads=options.threads, streams=options.shared_by if shared else None,
                            batch_buckets=options.batch_buckets, input_hw=options.warmup_hw or (256, 192))
    if options.warmup_hw is not None:
        engine.warmup(input_hw=options.warmup_hw)
    return engine


# The backend table: a new backend is one more entry here and in ``Backend``.
BACKENDS: dict[Backend, EngineBuilder] = {
    "torch": _torch_engine,
    "onnxruntime": _onnxruntime_engine,
    "openvino": _openvino_engine,
}


def build_engine(
    model: ModelSource,
    device: str = "cpu",
    precision: str = "fp32",
    backend: Backend = "torch",
    *,
    process: bool = False,
    threads: int | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    fuse_bn: bool = True,
    dynamic: str = "fast",
    channels_last: bool | str = "auto",
    batch_buckets: tuple[int, ...] | None = None,
    warmup_hw: tuple[int, int] | None = None,
    shared_by: int = 1,
) -> Engine:
    """An engine for ``model`` on ``device`` in ``precision`` (``"auto"``: fp16 on CUDA, fp32 elsewhere).

    What the backend or the device cannot do (fp16 on onnxruntime, CUDA graphs on a CPU) is a
    ValueError here, before any work is done with the engine."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    options = EngineOptions(process=process, threads=threads, compile=compile, cuda_graphs=cuda_graphs,
                            fuse_bn=fuse_bn, dynamic=dynamic, channels_last=channels_last,
                            batch_buckets=batch_buckets, warmup_hw=warmup_hw, shared_by=shared_by)
    return BACKENDS[backend](model, str(device), resolve_precision(precision, str(device)), options)

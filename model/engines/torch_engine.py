"""InferenceEngine (backend ``torch``): an optimised, device-resident copy of a pose network behind one call.

CPU float32 NCHW batch in, CPU float32 heatmaps out; everything else (BN folding, fast dynamic
kernels, memory format, autocast, torch.compile, CUDA graphs) is a constructor switch, and
``describe()`` says which ones are on. Defaults are what measured fastest (bench/engine.py).
Build it through :func:`ditepose.model.engines.build_engine` unless a test needs its switches.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ditepose.model.dite_hrnet import TopDownPoseNet
from ditepose.model.engines.base import buckets_up_to, check_buckets, run_in_buckets
from ditepose.model.engines.precision import Precision, parse_precision
from ditepose.model.fast_blocks import FastPoseNet
from ditepose.model.optimize import optimize_for_inference

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[Precision, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# the default buckets of a compiled or graphed engine; a service passes buckets_up_to(max_batch_size)
COMPILE_BUCKETS = buckets_up_to(32)  # (1, 2, 4, 8, 16, 32)
GRAPH_BUCKETS = buckets_up_to(256)  # (1, 2, ..., 128, 256)


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _keep_fp32_exact(device: torch.device) -> None:
    """Turn cuDNN's TF32 off for fp32 convolutions on CUDA.

    PyTorch lets cuDNN run fp32 convolutions in TF32 (10-bit mantissa) by default: fp32 here
    means fp32 (the float64 reference within 2e-3); fp16/bf16 are the fast options. The switch
    is process-wide; it changes only fp32 convolutions."""
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        log.info("cuDNN TF32 off for fp32 convolutions (InferenceEngine precision fp32 on %s)", device)
        torch.backends.cudnn.allow_tf32 = False


def _default_buckets(compile: bool, cuda_graphs: bool) -> tuple[int, ...]:
    return GRAPH_BUCKETS if cuda_graphs else COMPILE_BUCKETS if compile else ()


def _compiled(module: nn.Module, buckets: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(module)`` allowed one graph per bucket (the default limit, 8, would
    silently fall back to eager past it)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * buckets)
    return torch.compile(module, dynamic=False)


class InferenceEngine:
    """Owns an eval-mode copy of ``module`` on ``device``; call it with a CPU float32 NCHW batch."""

    def __init__(
        self,
        module: nn.Module,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        fuse_bn: bool = True,
        channels_last: bool | str = "auto",
        compile: bool = False,
        cuda_graphs: bool = False,
        dynamic: str = "fast",
        batch_buckets: tuple[int, ...] | None = None,
    ) -> None:
        self.device = _parse_device(device)
        self.precision: Precision = parse_precision(precision)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be True, False or 'auto', got {channels_last!r}")
        if self.precision == "fp32":
            _keep_fp32_exact(self.device)
        if fuse_bn and not isinstance(module, TopDownPoseNet):
            log.warning("%s is not a TopDownPoseNet: running it unoptimised", type(module).__name__)
            fuse_bn = False
        self.fuse_bn = fuse_bn
        self.dynamic = dynamic if fuse_bn else "grouped"
        # channels-last: oneDNN's NCHW depth-wise convs are several times slower (bench/engine.py);
        # the unfused module keeps its NCHW graph on CPU unless asked
        self.channels_last = (fuse_bn or self.device.type == "cuda") if channels_last == "auto" else bool(channels_last)
        self.module = self._device_copy(module)
        self.num_joints = int(getattr(module, "num_joints", 0))
        self.compiled = bool(compile)
        self.buckets = check_buckets(_default_buckets(compile, cuda_graphs) if batch_buckets is None else batch_buckets)
        self._forward: Callable[[torch.Tensor], torch.Tensor] = (
            _compiled(self.module, len(self.buckets)) if compile else self.module)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        # one memory pool for every captured graph; the lock keeps them from ever running at once
        # (threads sharing this engine would otherwise race on a graph's static input and output)
        self._graph_pool: Any = None
        self._graph_lock = threading.Lock()

    def _device_copy(self, module: nn.Module) -> nn.Module:
        """The network this engine runs, on its device: folded (a new module) or a deep copy,
        so ``module`` is never touched."""
        if self.fuse_bn and isinstance(module, TopDownPoseNet):
            fast: FastPoseNet = optimize_for_inference(module, dynamic=self.dynamic).float()
            fast.channels_last = self.channels_last
            return fast.to(self.device).eval()
        net = copy.deepcopy(module).float().requires_grad_(False).to(self.device).eval()
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and not self.fuse_bn:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision != "fp32":
            # inside a CUDA graph autocast's weight-cast cache would hold tensors of the capture,
            # so graphed engines cast in the graph itself (PyTorch's advice for graphs + autocast)
            with torch.autocast(self.device.type, dtype=TORCH_DTYPES[self.precision],
                                cache_enabled=not self.cuda_graphs):
                return self._forward(x)
        return self._forward(x)

    def _graphed(self, x: torch.Tensor) -> torch.Tensor:
        """Replay a CUDA graph captured for this input shape (captured on first sight)."""
        with self._graph_lock:
            return self._replay(x)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        if key not in self._graphs:
            static_in = x.clone()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels/allocator outside the capture
                    self._run(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                static_out = self._run(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(batch).__name__}")
        if batch.dim() != 4:  # channel and size checks are the network's own (its errors are clearer)
            raise ValueError(f"expected an NCHW batch, got shape {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            raise ValueError("empty batch")
        with torch.inference_mode():
            x = batch.to(self.device, torch.float32, non_blocking=True)
            out = run_in_buckets(self._one_bucket, x, self.buckets) if self.buckets else self._run(x)
            out = out.float().cpu() if self.device.type == "cuda" else out.float()
        return out.clone()  # a normal tensor (callers may modify it in place), never a graph's buffer

    def _one_bucket(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of exactly one bucket's size (:func:`run_in_buckets` pads and splits)."""
        return self._graphed(x) if self.cuda_graphs else self._run(x)

    def warmup(self, batch_sizes: list[int] | tuple[int, ...] | None = None,
               input_hw: tuple[int, int] = (256, 192)) -> float:
        """Run each batch size once (compiles, captures graphs, warms allocators); returns seconds.

        Default: every bucket of a compiled or graphed engine, else batch 1."""
        start = time.perf_counter()
        for size in batch_sizes or self.buckets or (1,):
            self(torch.zeros(size, 3, *input_hw))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "torch",
            "device": str(self.device),
            "precision": self.precision,
            "fuse_bn": self.fuse_bn,
            "dynamic_kernels": self.dynamic,
            "channels_last": self.channels_last,
            "compile": self.compiled,
            "cuda_graphs": self.cuda_graphs,
            "batch_buckets": list(self.buckets),
            "num_threads": torch.get_num_threads(),
            "optimized_module": isinstance(self.module, FastPoseNet),
        }

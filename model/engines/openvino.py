"""OpenVINO engines on the CPU: the pose network (and, through :class:`BucketedOpenVino`, NanoDet).

Why: on a CPU the runtime is the lever. Measured on a 2-core AVX-512/BF16 machine (issue 26),
OpenVINO runs Dite-HRNet-18's 'fast' graph at batch 1 about 1.35x faster than the fused torch
:class:`~ditepose.model.engine.InferenceEngine` in f32 and about 2x in bf16.

How a network gets here: the torch module is exported by ``torch.onnx.export`` at one fixed batch
size per bucket (the 'fast' graph of :func:`~ditepose.model.optimize.optimize_for_inference`;
``openvino.convert_model`` on the torch module took 3-10x longer and yields dynamic weight shapes
the CPU plugin refuses), read by OpenVINO and saved as IR (``.xml``/``.bin``, fp32 weights) under
the cache folder, keyed by a fingerprint of the weights, the graph, the batch and the input size.
Compiled models go to OpenVINO's own blob cache (``CACHE_DIR``) beside it, so a second start with
the same weights neither exports nor compiles: it loads the blob.

A call pads its batch with zeros up to the next bucket (powers of two up to ``max_batch``) or
splits it past the largest one (:func:`~ditepose.model.engines.base.run_in_buckets`), like the torch
engine's buckets; each bucket and input size compiles on first use (or in :meth:`warmup`).

``mode``: ``latency`` (one stream, ``threads`` threads: one engine per worker thread) or
``throughput`` (OpenVINO's streams share ``threads``: one engine per process, called from several
threads at once; each calling thread gets its own infer request). ``precision``: ``fp32`` sets
OpenVINO's inference precision to f32 explicitly (it picks bf16 by default on CPUs that have it),
``bf16`` asks for bf16 and is refused on a CPU without it. Whether bf16 may serve is not decided
here: :mod:`ditepose.model.engines.agreement` judges it against the fp32 torch engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ditepose.model.engines.base import buckets_up_to, run_in_buckets
from ditepose.model.export import OPSET

log = logging.getLogger(__name__)

OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
MODES = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
DEFAULT_MAX_BATCH = 32
# The batch sizes a server compiles on a CPU. Every compiled bucket holds its own memory: measured
# on the 2-core Xeon (Dite-HRNet-18, 256x192, one thread, warm cache) bucket 1 alone adds 211 MiB
# of RSS and the six powers of two up to 32 add 1,110 MiB per engine, while the time per crop is flat
# past 4 (49, 45, 38, 38, 42, 44 ms per crop at 1, 2, 4, 8, 16, 32). Larger batches run as fours.
SERVING_BUCKETS = (1, 4)


def serving_buckets(max_batch: int) -> tuple[int, ...]:
    """:data:`SERVING_BUCKETS` up to ``max_batch`` (a model capped at 2 crops compiles 1 and 2)."""
    return tuple(sorted({b for b in SERVING_BUCKETS if b < max_batch} | {min(max_batch, max(SERVING_BUCKETS))}))
# part of every cache key: bump it when the exported graph changes for the same weights
GRAPH_VERSION = "fast-onnx-1"

# an exporter writes the network as ONNX at (path, batch, (height, width))
Exporter = Callable[[Path, int, tuple[int, int]], None]

_core_lock = threading.Lock()
_core: Any = None


def openvino_core() -> Any:
    """The process's one ``openvino.Core`` (created on first use: importing OpenVINO costs ~0.3 s)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core


def openvino_version() -> str:
    import openvino

    return str(openvino.__version__)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ditepose/openvino``, else ``~/.cache/ditepose/openvino``."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ditepose" / "openvino"


def cpu_supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (AVX512_BF16 or AMX)."""
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def module_fingerprint(module: nn.Module, *extra: object) -> str:
    """sha256 of the module's class, state (names, dtypes, shapes, values) and ``extra``, 16 hex digits.

    Two modules with the same weights share cache entries; any changed weight gives a new key."""
    digest = hashlib.sha256(f"{type(module).__qualname__}|{extra!r}|{GRAPH_VERSION}".encode())
    for name, tensor in module.state_dict().items():
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# torch.onnx.export keeps process-global state (GLOBALS.in_onnx_export): two exports at once in two
# threads (a worker compiling a new bucket while a hot swap builds the next version) break each other
_export_lock = threading.Lock()


def export_onnx_fixed(net: nn.Module, path: Path, example: torch.Tensor, output_names: list[str]) -> None:
    """``torch.onnx.export`` of ``net`` at ``example``'s fixed shape (input ``images``), one at a time."""
    with _export_lock, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shape checks: the export fixes the shape
        torch.onnx.export(net, (example,), str(path), input_names=["images"], output_names=output_names,
                          opset_version=OPSET, dynamo=False)


def check_options(precision: str, mode: str, threads: int | None, streams: int | None) -> None:
    """ValueError naming the first option this machine or OpenVINO cannot honour."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {sorted(OPENVINO_PRECISIONS)}, got {precision!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if (threads is not None and threads < 1) or (streams is not None and streams < 1):
        raise ValueError(f"threads and streams must be >= 1, got threads={threads}, streams={streams}")
    if precision == "bf16" and not cpu_supports_bf16():
        raise ValueError("bf16 asked for, but this CPU has no bf16 support in OpenVINO "
                         "(needs AVX512_BF16 or AMX): serve it in fp32")


class BucketedOpenVino:
    """One network on OpenVINO's CPU plugin: an IR and a compiled model per (bucket, input size),
    cached on disk, and the padded/split call over them. Single-output networks only."""

    def __init__(self, exporter: Exporter, fingerprint: str, *, precision: str = "fp32", mode: str = "latency",
                 threads: int | None = None, streams: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_buckets: tuple[int, ...] | None = None, cache_dir: str | Path | None = None) -> None:
        check_options(precision, mode, threads, streams)
        buckets = tuple(sorted(set(batch_buckets))) if batch_buckets else buckets_up_to(max_batch)
        if buckets[0] < 1:
            raise ValueError(f"batch buckets must be positive batch sizes, got {batch_buckets!r}")
        self.exporter, self.fingerprint = exporter, fingerprint
        self.precision, self.mode, self.buckets = precision, mode, buckets
        self.threads = threads or torch.get_num_threads()
        self.streams = 1 if mode == "latency" else streams
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._compiled: dict[tuple[int, int, int], Any] = {}
        self._compile_lock = threading.Lock()
        self._requests = threading.local()  # per calling thread: (batch, h, w) -> InferRequest
        self.compile_seconds: dict[str, float] = {}
        self.cache_hits = 0  # IRs found on disk, not exported

    # ------------------------------------------------------------------------------ compilation
    def config(self) -> dict[str, Any]:
        """The CPU plugin's properties for every compiled model of this engine."""
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[self.precision],
            "PERFORMANCE_HINT": MODES[self.mode],
            "INFERENCE_NUM_THREADS": self.threads,
            "CACHE_DIR": str(self.cache_dir / "blobs"),
            # Pinned threads cannot leave a core that HTTP, decoding or a second engine keeps busy:
            # with pinning on, two 1-thread engines in one process ran 15.5 img/s at batch 4 on the
            # 2-core Xeon (one 2-thread engine beside them 3.6); unpinned 68.7 (53.3), same run.
            "ENABLE_CPU_PINNING": False,
        }
        if self.streams is not None:
            config["NUM_STREAMS"] = self.streams
        return config

    def ir_path(self, batch: int, input_hw: tuple[int, int]) -> Path:
        height, width = input_hw
        # the full version names a build ("2026.4.1-22982-...-releases/2026/4"): a hash of it keeps one folder
        build = hashlib.sha256(openvino_version().encode()).hexdigest()[:8]
        return self.cache_dir / "ir" / f"{self.fingerprint}-b{batch}-{height}x{width}-ov{build}.xml"

    def _ensure_ir(self, batch: int, input_hw: tuple[int, int]) -> Path:
        """The IR of one bucket: from the cache, else exported and written atomically."""
        xml = self.ir_path(batch, input_hw)
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            self.cache_hits += 1
            return xml
        import openvino

        xml.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=xml.parent) as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            self.exporter(onnx_path, batch, input_hw)
            staged = Path(tmp) / "model.xml"
            openvino.save_model(openvino_core().read_model(str(onnx_path)), str(staged), compress_to_fp16=False)
            # weights first: an .xml on disk always has its .bin (concurrent starts write the same bytes)
            os.replace(staged.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(staged, xml)
        return xml

    def compiled(self, batch: int, input_hw: tuple[int, int]) -> Any:
        """The compiled model of one bucket and input size (exported/compiled on first use)."""
        key = (batch, *input_hw)
        found = self._compiled.get(key)
        if found is not None:
            return found
        with self._compile_lock:
            if key not in self._compiled:
                start = time.perf_counter()
                xml = self._ensure_ir(batch, input_hw)
                self._compiled[key] = openvino_core().compile_model(str(xml), "CPU", self.config())
                seconds = time.perf_counter() - start
                self.compile_seconds[f"b{batch}-{input_hw[0]}x{input_hw[1]}"] = round(seconds, 3)
                log.info("OpenVINO %s %s: compiled batch %d at %dx%d in %.2f s", self.precision, self.mode, batch,
                         input_hw[1], input_hw[0], seconds)
            return self._compiled[key]

    # ----------------------------------------------------------------------------------- calls
    def _request(self, batch: int, input_hw: tuple[int, int]) -> Any:
        """This thread's infer request on the bucket's compiled model (requests are not thread-safe)."""
        table: dict[tuple[int, int, int], Any] | None = getattr(self._requests, "table", None)
        if table is None:
            table = self._requests.table = {}
        key = (batch, *input_hw)
        if key not in table:
            table[key] = self.compiled(batch, input_hw).create_infer_request()
        return table[key]

    def _run_bucket(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass of exactly a bucket's batch (padding is the caller's)."""
        request = self._request(int(x.shape[0]), (int(x.shape[-2]), int(x.shape[-1])))
        array = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        result = request.infer({0: array}, share_inputs=True)  # outputs come back as copies
        return torch.from_numpy(result[0])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(batch).__name__}")
        if batch.dim() != 4:
            raise ValueError(f"expected an NCHW batch, got shape {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            raise ValueError("empty batch")
        return run_in_buckets(self._run_bucket, batch.detach().to("cpu", torch.float32), self.buckets)

    def warmup(self, input_shape: tuple[int, int, int], batch_sizes: list[int] | tuple[int, ...] | None = None) -> float:
        """Compile (or load) and run every bucket once (or ``batch_sizes``); returns seconds."""
        start = time.perf_counter()
        for size in batch_sizes or self.buckets:
            self(torch.zeros(size, *input_shape))
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        compiled = next(iter(self._compiled.values()), None)
        # what the plugin runs (f32 / bf16), read back from a compiled model rather than assumed
        effective = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() if compiled is not None else None
        return {
            "backend": "openvino", "openvino": openvino_version(), "device": "cpu", "precision": self.precision,
            "inference_precision": effective, "mode": self.mode, "threads": self.threads, "streams": self.streams,
            "batch_buckets": list(self.buckets), "cache_dir": str(self.cache_dir), "fingerprint": self.fingerprint,
            "compiled": sorted(self.compile_seconds), "compile_seconds": dict(self.compile_seconds),
            "ir_cache_hits": self.cache_hits,
        }

    def close(self) -> None:
        """Drop the compiled models (their memory goes when the last infer request does)."""
        with self._compile_lock:
            self._compiled.clear()
        self._requests = threading.local()


class OpenVinoNetwork:
    """What every network on :class:`BucketedOpenVino` shares: its CPU float32 copy, exported to ONNX
    (input ``images``, one named output) at each bucket the runtime compiles, and the runtime itself.
    Subclasses check their inputs and describe themselves."""

    def __init__(self, net: nn.Module, fingerprint: str, output_name: str, **runtime_options: Any) -> None:
        """``runtime_options``: :class:`BucketedOpenVino`'s keywords (precision, mode, threads, streams,
        max_batch, batch_buckets, cache_dir); a bad one raises ValueError here."""
        self._net = net.float().cpu().eval()
        self._output_name = output_name
        self.runtime = BucketedOpenVino(self._export, fingerprint, **runtime_options)
        self.precision = self.runtime.precision

    def _export(self, path: Path, batch: int, input_hw: tuple[int, int]) -> None:
        export_onnx_fixed(self._net, path, torch.zeros(batch, 3, *input_hw), [self._output_name])

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.runtime.buckets

    def close(self) -> None:
        self.runtime.close()


class OpenVinoEngine(OpenVinoNetwork):
    """A ``TopDownPoseNet`` on OpenVINO with the ``InferenceEngine`` call interface: CPU float32 NCHW
    crops of any batch size in, float32 heatmaps out (module docstring)."""

    def __init__(self, module: nn.Module, precision: str = "fp32", mode: str = "latency", threads: int | None = None,
                 streams: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_buckets: tuple[int, ...] | None = None, cache_dir: str | Path | None = None,
                 input_hw: tuple[int, int] = (256, 192)) -> None:
        from ditepose.model.dite_hrnet import TopDownPoseNet
        from ditepose.model.optimize import optimize_for_inference

        if not isinstance(module, TopDownPoseNet):
            raise TypeError(f"OpenVinoEngine takes a TopDownPoseNet, got {type(module).__name__}")
        module.check_input_size(*input_hw)
        self.num_joints = module.num_joints
        self.input_hw = input_hw
        self._check_size = module.check_input_size
        # 'fast' dynamic convs: the graph that exports at a fixed batch and runs fastest (issue 26)
        super().__init__(optimize_for_inference(module, dynamic="fast"), module_fingerprint(module, "dite-hrnet", "fast"),
                         "heatmaps", precision=precision, mode=mode, threads=threads, streams=streams,
                         max_batch=max_batch, batch_buckets=batch_buckets, cache_dir=cache_dir)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() == 4:
            if batch.shape[1] != 3:
                raise ValueError(f"expected 3 input channels, got shape {tuple(batch.shape)}")
            self._check_size(int(batch.shape[-2]), int(batch.shape[-1]))
        return self.runtime(batch)

    def warmup(self, batch_sizes: list[int] | tuple[int, ...] | None = None,
               input_hw: tuple[int, int] | None = None) -> float:
        """Compile (or load from the cache) every bucket, or ``batch_sizes``; returns seconds."""
        return self.runtime.warmup((3, *(input_hw or self.input_hw)), batch_sizes)

    def describe(self) -> dict[str, Any]:
        return {**self.runtime.describe(), "optimized_module": True, "dynamic_kernels": "fast",
                "num_joints": self.num_joints}

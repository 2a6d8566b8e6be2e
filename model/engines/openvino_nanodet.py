"""The NanoDet person detector on OpenVINO: its network and GFL decode as one CPU graph.

:class:`OpenVinoNanoDet` is a drop-in for the torch forward inside
:class:`~ditepose.model.detectors.NanoDetDetector` (its ``device_forward("cpu")``): NanoDet input
[N, 3, 416, 416] in, person candidates [N, 3549, 5] out (x1, y1, x2, y2 in input pixels, score),
computed by :class:`~ditepose.model.nanodet.PersonCandidatesNet` exported at each batch bucket.
Buckets, disk cache, precision and latency/throughput modes are those of
:class:`~ditepose.model.engines.openvino.BucketedOpenVino`.

:class:`OpenVinoNanoDetDetector` is the detector with that forward on the CPU (other devices keep
the torch network), so every caller of a ``StagedDetector`` gets it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ditepose.model.detectors import DeviceForward, NanoDetDetector
from ditepose.model.engines.openvino import OpenVinoNetwork, module_fingerprint, serving_buckets
from ditepose.model.nanodet import INPUT_SIZE, NanoDet, PersonCandidatesNet

DEFAULT_DETECTOR_MAX_BATCH = 8  # the service's det_max_batch_size default


class OpenVinoNanoDet(OpenVinoNetwork):
    """NanoDet + decode on OpenVINO: ``__call__(input [N, 3, 416, 416]) -> candidates [N, A, 5]``."""

    def __init__(self, net: NanoDet, precision: str = "fp32", mode: str = "latency", threads: int | None = None,
                 streams: int | None = None, max_batch: int = DEFAULT_DETECTOR_MAX_BATCH,
                 batch_buckets: tuple[int, ...] | None = None, cache_dir: str | Path | None = None) -> None:
        super().__init__(PersonCandidatesNet(net), module_fingerprint(net, "nanodet", "person-candidates"),
                         "candidates", precision=precision, mode=mode, threads=threads, streams=streams,
                         max_batch=max_batch, batch_buckets=batch_buckets or serving_buckets(max_batch),
                         cache_dir=cache_dir)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"NanoDet takes [N, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {tuple(batch.shape)}")
        return self.runtime(batch)

    def warmup(self, batch_sizes: list[int] | tuple[int, ...] | None = None) -> float:
        """Compile (or load from the cache) every bucket, or ``batch_sizes``; returns seconds."""
        return self.runtime.warmup((3, INPUT_SIZE, INPUT_SIZE), batch_sizes)

    def describe(self) -> dict[str, Any]:
        return {**self.runtime.describe(), "network": "nanodet"}


class OpenVinoNanoDetDetector(NanoDetDetector):
    """:class:`NanoDetDetector` whose CPU forward pass runs on OpenVINO (CUDA devices keep torch).

    ``openvino`` options go to :class:`OpenVinoNanoDet` (precision, mode, threads, max_batch, ...)."""

    def __init__(self, score_thr: float = 0.3, nms_iou: float = 0.6, max_persons: int = 100,
                 weights_dir: Path | None = None, device: str = "cpu", **openvino: Any) -> None:
        super().__init__(score_thr, nms_iou, max_persons, weights_dir, device)
        self.runner = OpenVinoNanoDet(self.model, **openvino)
        # compile (or load) every bucket now: their memory belongs to the idle footprint, and no
        # request waits for a compile
        self.runner.warmup()

    def device_forward(self, device: str) -> DeviceForward:
        if torch.device(device).type != "cpu":
            return super().device_forward(device)
        return self.runner

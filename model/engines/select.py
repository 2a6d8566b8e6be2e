"""Which engine serves a pose network: ``engine = auto | torch | openvino``, resolved and gated here.

One resolver for the service's pool, ``ditepose predict``, ``ditepose evaluate`` and ``ditepose
export check``, so a setting means the same everywhere:

* CUDA: always the torch engine (CUDA graphs, autocast); an explicit ``openvino`` is an error.
* CPU, ``auto``: OpenVINO when it is importable and its engine passes the agreement gate at the
  chosen precision, else the torch engine; the reason is logged and kept in :class:`EngineChoice`
  (``/v1/models`` and gRPC ``ListModels`` show it).
* CPU, ``openvino``: OpenVINO or a clear error (not installed, or refused by the gate).
* CPU, ``torch``: the torch engine; bf16 goes through the same gate.

The gate (:mod:`ditepose.model.engines.agreement`): a candidate that is not the fp32 torch engine
itself is run beside it on the shipped reference crops, and refused when more than
``AgreementBounds.max_moved_share`` of the joints move more than ``AgreementBounds.shift_px``
input pixels (the one place those numbers are stated; docs/models.md quotes them). A verdict is
remembered per (weights, backend, precision, input size, bounds, runtime build) in this process
and on disk beside OpenVINO's compiled models, so a restart with the same weights neither
compiles nor re-runs the gate.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ditepose.model.engines.agreement import (
    AgreementBounds,
    AgreementRefused,
    AgreementReport,
    check_agreement,
    torch_fp32_reference,
)
from ditepose.model.engines.base import Engine
from ditepose.model.engines.build import Backend
from ditepose.model.engines.precision import Precision, resolve_precision
from ditepose.model.engines.setting import parse_engine_setting

log = logging.getLogger(__name__)

# builds the candidate engine of one backend and precision (the caller knows threads, buckets, ...)
CandidateBuilder = Callable[[Backend, Precision], Engine]


def openvino_missing() -> str | None:
    """None when OpenVINO and the ONNX exporter it compiles from import here, else why not (one line).

    The engine exports each network with ``torch.onnx.export``, which needs the ``onnx`` package: an
    install with OpenVINO but without it (the runtime image) must fall back, not fail the model."""
    for package, what in (("openvino", "OpenVINO is not installed"),
                          ("onnx", "the onnx package, which exports networks for OpenVINO, is not installed")):
        try:
            importlib.import_module(package)
        except ImportError as exc:
            return f"{what} ({exc})"
    return None


@dataclass(frozen=True)
class EngineChoice:
    """The engine that serves: backend, precision, why, and the gate's report (None: not gated,
    i.e. the fp32 torch engine, the reference itself, or any CUDA engine)."""

    backend: Backend
    precision: Precision
    reason: str
    agreement: AgreementReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """What /v1/models and ListModels show: the agreement as its summary, not per joint."""
        report = self.agreement
        summary = None if report is None else {
            "passed": report.passed, "moved_share": report.moved_share, "moved": report.moved,
            "joints": report.joints, "max_px": _finite(report.max_px),
            "p99_px": _finite(max(report.joint_p99_px, default=0.0)), "shift_px": report.bounds.shift_px,
            "max_moved_share": report.bounds.max_moved_share, "verdict": report.verdict(),
        }
        return {"backend": self.backend, "precision": self.precision, "reason": self.reason, "agreement": summary}


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


class EngineRefused(ValueError):
    """An explicitly asked-for engine cannot serve here; the message says why."""


# ------------------------------------------------------------------------------------ the gate
_verdicts: dict[str, AgreementReport] = {}
_verdicts_lock = threading.Lock()


def _verdict_key(module: nn.Module, backend: Backend, precision: Precision, input_hw: tuple[int, int],
                 bounds: AgreementBounds) -> str:
    from ditepose.model.engines.openvino import module_fingerprint

    runtime = str(torch.__version__)
    if backend == "openvino":
        from ditepose.model.engines.openvino import openvino_version

        runtime = openvino_version()
    cpu = torch.backends.cpu.get_cpu_capability()
    return module_fingerprint(module, "gate", backend, precision, input_hw, bounds.shift_px,
                              bounds.max_moved_share, runtime, cpu)


def _verdict_file(key: str) -> Path:
    from ditepose.model.engines.openvino import default_cache_dir

    return default_cache_dir() / "agreement" / f"{key}.json"


def _read_verdict(key: str, bounds: AgreementBounds) -> AgreementReport | None:
    with _verdicts_lock:
        if key in _verdicts:
            return _verdicts[key]
    try:
        data = json.loads(_verdict_file(key).read_text())
        report = AgreementReport(
            label=data["label"], input_hw=(int(data["input_hw"][0]), int(data["input_hw"][1])), crops=int(data["crops"]),
            heatmap_max_abs=float(data["heatmap_max_abs"]), heatmap_peak=float(data["heatmap_peak"]),
            joint_p50_px=tuple(float(v) for v in data["joint_p50_px"]),
            joint_p99_px=tuple(float(v) for v in data["joint_p99_px"]), max_px=float(data["max_px"]),
            moved=int(data["moved"]), bounds=bounds)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no verdict on disk (or an unreadable one): run the gate
    with _verdicts_lock:
        _verdicts[key] = report
    return report


def _write_verdict(key: str, report: AgreementReport) -> None:
    with _verdicts_lock:
        _verdicts[key] = report
    if not all(v is not None for v in (_finite(report.heatmap_max_abs), _finite(report.max_px))):
        return  # a NaN answer is not worth remembering: the next start judges again
    target = _verdict_file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_suffix(f".{os.getpid()}.tmp")
        staged.write_text(json.dumps(report.to_dict()))
        os.replace(staged, target)
    except OSError as exc:  # a read-only cache only costs the next start a gate run
        log.warning("agreement verdict not cached (%s): %s", target, exc)


def gate(module: nn.Module, candidate: Engine, backend: Backend, precision: Precision,
         input_hw: tuple[int, int], bounds: AgreementBounds | None = None) -> AgreementReport:
    """The agreement report of ``candidate`` against the fp32 torch engine of ``module`` (cached).

    The crops go through the candidate one at a time: a bucketed engine then compiles only its
    batch-1 bucket, which the pool warms anyway."""
    bounds = bounds or AgreementBounds()
    key = _verdict_key(module, backend, precision, input_hw, bounds)
    report = _read_verdict(key, bounds)
    if report is None:
        def one_by_one(crops: torch.Tensor) -> torch.Tensor:
            return torch.cat([candidate(crop) for crop in crops.split(1)])

        report = check_agreement(one_by_one, torch_fp32_reference(module), input_hw,
                                 label=f"{backend} {precision}", bounds=bounds)
        _write_verdict(key, report)
    return report


# ------------------------------------------------------------------------------------ resolving
@runtime_checkable
class _Closable(Protocol):
    """An engine holding more than memory (OpenVINO requests, an engine process): it has ``close``."""

    def close(self) -> None: ...


def _close(engine: Engine) -> None:
    if isinstance(engine, _Closable):
        engine.close()


def _gated(module: nn.Module, build: CandidateBuilder, backend: Backend, precision: Precision,
           input_hw: tuple[int, int], bounds: AgreementBounds | None) -> tuple[Engine, AgreementReport | None]:
    """The engine of ``backend``/``precision``; gated unless it is the fp32 torch reference itself.
    Raises :class:`AgreementRefused` (engine closed) when the gate refuses it."""
    if backend == "torch" and precision == "fp32":
        return build(backend, precision), None
    known = _read_verdict(_verdict_key(module, backend, precision, input_hw, bounds or AgreementBounds()),
                          bounds or AgreementBounds())
    if known is not None and not known.passed:
        raise AgreementRefused(known)  # judged before (this process or a previous start): nothing to build
    engine = build(backend, precision)
    try:
        report = known or gate(module, engine, backend, precision, input_hw, bounds)
    except BaseException:
        _close(engine)
        raise
    if not report.passed:
        _close(engine)
        raise AgreementRefused(report)
    return engine, report


def choose_engine(module: nn.Module, device: str, precision: str, requested: str, build: CandidateBuilder,
                  input_hw: tuple[int, int] = (256, 192),
                  bounds: AgreementBounds | None = None) -> tuple[Engine, EngineChoice]:
    """The engine that serves ``module`` on ``device`` and why (module docstring for the rules).

    ``precision``: a setting (``"auto"``: fp16 on CUDA, fp32 on the CPU). ``build(backend,
    precision)`` makes a candidate. Raises :class:`EngineRefused` for an explicit engine that
    cannot serve, :class:`AgreementRefused` for a precision the gate refuses (its verdict says why)."""
    setting = parse_engine_setting(requested)
    resolved = resolve_precision(precision, device)
    if not device.startswith("cpu"):
        if setting == "openvino":
            raise EngineRefused(f"engine 'openvino' runs on the CPU only; device {device!r} runs the torch engine "
                                "(set engine 'auto' or 'torch')")
        return build("torch", resolved), EngineChoice("torch", resolved, f"{device}: the torch engine serves GPUs")
    if setting == "torch":
        engine, report = _gated(module, build, "torch", resolved, input_hw, bounds)
        return engine, EngineChoice("torch", resolved, "engine 'torch' was asked for", report)
    missing = openvino_missing()
    if missing is not None:
        if setting == "openvino":
            raise EngineRefused(f"engine 'openvino' was asked for, but {missing}: install it "
                                "(pip install openvino) or set engine 'auto' or 'torch'")
        log.warning("engine auto: %s; serving the torch engine", missing)
        engine, report = _gated(module, build, "torch", resolved, input_hw, bounds)
        return engine, EngineChoice("torch", resolved, f"auto: {missing}", report)
    try:
        engine, report = _gated(module, build, "openvino", resolved, input_hw, bounds)
    except AgreementRefused as refused:
        if setting == "openvino":
            raise
        log.warning("engine auto: OpenVINO %s %s; serving the torch engine", resolved, refused)
        fallback, fallback_report = _gated(module, build, "torch", resolved, input_hw, bounds)
        return fallback, EngineChoice("torch", resolved, f"auto: OpenVINO {refused}", fallback_report)
    except ValueError as exc:  # OpenVINO cannot honour the precision here (bf16 on a CPU without it)
        if setting == "openvino":
            raise EngineRefused(f"engine 'openvino': {exc}") from exc
        log.warning("engine auto: OpenVINO cannot serve %s (%s); serving the torch engine", resolved, exc)
        fallback, fallback_report = _gated(module, build, "torch", resolved, input_hw, bounds)
        return fallback, EngineChoice("torch", resolved, f"auto: OpenVINO cannot serve it: {exc}", fallback_report)
    reason = "auto: OpenVINO is installed and agrees with the fp32 torch engine" if setting == "auto" \
        else "engine 'openvino' was asked for"
    return engine, EngineChoice("openvino", resolved, reason, report)



def build_chosen_engine(module: nn.Module, device: str = "cpu", precision: str = "auto", engine: str = "auto",
                        input_hw: tuple[int, int] = (256, 192)) -> tuple[Engine, EngineChoice]:
    """:func:`choose_engine` with each backend's default build (the CLIs' engine: ``ditepose predict``,
    ``evaluate``, ``export check``); the choice is logged."""
    from ditepose.model.engines.build import build_engine

    def build(backend: Backend, resolved: Precision) -> Engine:
        return build_engine(module, device, resolved, backend)

    served, choice = choose_engine(module, device, precision, engine, build, input_hw=input_hw)
    log.info("engine on %s: %s %s (%s)", device, choice.backend, choice.precision, choice.reason)
    return served, choice

"""The engine resolver (``engine = auto | torch | openvino``) and its agreement gate, on real engines.

Small inputs (64x64: the network takes any multiple of 32) keep the OpenVINO compiles short; the
shipped demo checkpoint gives trained weights, so the agreement numbers mean what they mean in
service. A refusal is forced with a stated tight bound (0.001 px, no joint may move), never with a
fake engine. OpenVINO's absence is simulated in a child process (``sys.modules["openvino"] = None``
makes ``import openvino`` fail): a fake for an absent package, the one fault this machine cannot
produce otherwise since OpenVINO is installed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ditepose.model import build_model, load_checkpoint
from ditepose.model.engines import Backend, Engine, Precision, build_engine
from ditepose.model.engines.agreement import AgreementBounds, AgreementRefused
from ditepose.model.engines.select import EngineRefused, choose_engine, openvino_missing
from ditepose.model.engines.setting import parse_engine_setting
from tests.conftest import subprocess_env

INPUT_HW = (64, 64)
TIGHT = AgreementBounds(shift_px=1e-3, max_moved_share=0.0)  # any joint moving 0.001 px is refused


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory: pytest.TempPathFactory):
    """An empty OpenVINO/verdict cache for this module, so every gate here really runs (64x64 compiles fast)."""
    from ditepose.model import weight_store
    from ditepose.model.engines import select

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DITEPOSE_WEIGHTS_DIR", str(weight_store.weights_dir()))  # NanoDet's weights stay found
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(select, "_verdicts", {})
        yield


@pytest.fixture(scope="module")
def demo18(demo_checkpoint: Path) -> torch.nn.Module:
    model = build_model("dite_hrnet_18")
    load_checkpoint(model, demo_checkpoint)
    return model.eval()


def builder(module: torch.nn.Module, built: list[tuple[str, str]] | None = None):
    """Candidate engines as the service builds them (one bucket: the gate runs crops one by one)."""
    def build(backend: Backend, precision: Precision) -> Engine:
        if built is not None:
            built.append((backend, precision))
        return build_engine(module, "cpu", precision, backend, batch_buckets=(1,) if backend == "openvino" else None)

    return build


needs_openvino = pytest.mark.skipif(openvino_missing() is not None, reason="openvino is not installed")


@needs_openvino
def test_auto_picks_openvino_when_it_agrees(demo18):
    engine, choice = choose_engine(demo18, "cpu", "auto", "auto", builder(demo18), input_hw=INPUT_HW)
    assert (choice.backend, choice.precision) == ("openvino", "fp32")
    assert engine.describe()["backend"] == "openvino"
    assert choice.agreement is not None and choice.agreement.passed and choice.agreement.moved == 0
    summary = choice.to_dict()
    assert summary["agreement"]["verdict"].startswith("accepted: openvino fp32")
    assert "agrees with the fp32 torch engine" in summary["reason"]
    assert engine(torch.zeros(3, 3, *INPUT_HW)).shape == (3, 17, 16, 16)


@needs_openvino
def test_refused_bf16_says_why_and_auto_falls_back_to_torch(demo18, caplog):
    with pytest.raises(AgreementRefused, match=r"refused: openvino bf16: \d+ of 340 joints .* moved more than 0.001 px"):
        choose_engine(demo18, "cpu", "bf16", "openvino", builder(demo18), input_hw=INPUT_HW, bounds=TIGHT)
    built: list[tuple[str, str]] = []
    with pytest.raises(AgreementRefused, match="refused: torch bf16"):  # torch bf16 goes through the same gate
        choose_engine(demo18, "cpu", "bf16", "auto", builder(demo18, built), input_hw=INPUT_HW, bounds=TIGHT)
    # tried in this order; a refusal judged before (in this process, or cached on disk) builds nothing
    assert built in ([("openvino", "bf16"), ("torch", "bf16")], [("torch", "bf16")], [])
    assert "refused: openvino bf16" in caplog.text  # the log says why OpenVINO was passed over
    # fp32 with the same tight bound: OpenVINO fp32 moves no joint by 0.001 px, so it serves
    _, choice = choose_engine(demo18, "cpu", "fp32", "auto", builder(demo18), input_hw=INPUT_HW, bounds=TIGHT)
    assert choice.backend == "openvino" and choice.agreement is not None and choice.agreement.passed


def test_torch_fp32_is_the_reference_and_is_not_gated(demo18):
    built: list[tuple[str, str]] = []
    engine, choice = choose_engine(demo18, "cpu", "fp32", "torch", builder(demo18, built), input_hw=INPUT_HW,
                                   bounds=TIGHT)
    assert built == [("torch", "fp32")] and choice.agreement is None and choice.to_dict()["agreement"] is None
    assert engine.describe()["backend"] == "torch"


def test_cuda_devices_run_torch_and_refuse_openvino(demo18):
    built: list[tuple[str, str]] = []
    with pytest.raises(EngineRefused, match="runs on the CPU only"):
        choose_engine(demo18, "cuda:0", "auto", "openvino", builder(demo18, built))
    assert built == []  # refused before anything is built
    with pytest.raises(ValueError, match="engine must be one of"):
        parse_engine_setting("tensorrt")


ABSENT = textwrap.dedent("""
    import json, sys
    sys.modules[sys.argv[1]] = None  # fake: the package absent (import fails), see the module docstring
    import torch
    from ditepose.model import build_model
    from ditepose.model.engines import build_engine
    from ditepose.model.engines.select import EngineRefused, choose_engine
    module = build_model("dite_hrnet_18").eval()
    build = lambda backend, precision: build_engine(module, "cpu", precision, backend)
    engine, choice = choose_engine(module, "cpu", "auto", "auto", build, input_hw=(64, 64))
    try:
        choose_engine(module, "cpu", "auto", "openvino", build, input_hw=(64, 64))
        refused = None
    except EngineRefused as exc:
        refused = str(exc)
    from ditepose.model.detectors import nanodet_backend
    try:
        nanodet_backend("openvino")
        detector_refused = None
    except EngineRefused as exc:
        detector_refused = str(exc)
    print(json.dumps({"choice": choice.to_dict(), "backend": engine.describe()["backend"], "refused": refused,
                      "detector_auto": nanodet_backend("auto"), "detector_refused": detector_refused}))
""")


@pytest.mark.parametrize(("package", "why"), [
    ("openvino", "OpenVINO is not installed"),
    # OpenVINO installed but not the exporter (the runtime Docker image once): fall back, not fail the model
    ("onnx", "the onnx package, which exports networks for OpenVINO, is not installed"),
])
def test_auto_falls_back_to_torch_when_openvino_is_absent(package, why):
    done = subprocess.run([sys.executable, "-c", ABSENT, package], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["backend"] == "torch" and answer["choice"]["backend"] == "torch"
    assert answer["choice"]["reason"].startswith(f"auto: {why}")
    assert f"engine 'openvino' was asked for, but {why}" in answer["refused"]
    assert answer["detector_auto"] == "torch"
    assert f"asked for the NanoDet detector, but {why}" in answer["detector_refused"]


@needs_openvino
def test_the_detector_follows_the_engine_setting(nanodet):
    from ditepose.model.detectors import NanoDetDetector, build_detector
    from ditepose.model.engines.openvino_nanodet import OpenVinoNanoDetDetector

    assert isinstance(build_detector("nanodet", engine="auto"), OpenVinoNanoDetDetector)
    assert isinstance(build_detector("nanodet", engine="openvino"), OpenVinoNanoDetDetector)
    plain = build_detector("nanodet", engine="torch")
    assert isinstance(plain, NanoDetDetector) and not isinstance(plain, OpenVinoNanoDetDetector)

"""The OpenVINO engines agree with the torch engine, bucket by bucket, and start from their disk cache.

Bounds (measured on a 2-core Xeon with AVX512_BF16, OpenVINO 2026.4.1):
* fp32, trained weights (the shipped demo checkpoint) on the shipped reference crops: max |OpenVINO -
  torch engine| 6.6e-7 on heatmaps peaking at 1.13; held to :data:`FP32_TOL` = 1e-4;
* fp32, the authors' calibrated random weights on their golden inputs: within 2e-3 of the float64
  reference, the bound ``../shared/fixtures/reference/README.md`` sets for every optimised fp32 path;
* NanoDet fp32 on docs/riders.jpg: candidates within 1.2e-4 px, scores within 5e-7; held to 1e-3.
Each engine compiles few buckets (export + compile takes seconds per bucket on 2 cores).
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="openvino is not installed")

from ditepose.model import build_model, load_checkpoint
from ditepose.model.engines.agreement import AgreementBounds, compare_heatmaps, reference_crops
from ditepose.model.engines.openvino import OpenVinoEngine, cpu_supports_bf16, module_fingerprint
from ditepose.model.engines.torch_engine import InferenceEngine
from tests.model.support import assert_refuses, load_reference, mirrored_golden_batch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CHECKPOINT = REPO_ROOT / "model" / "weights" / "dite_hrnet_18_coco_demo.pth"
FP32_TOL = 1e-4
REFERENCE_TOL = 2e-3
BUCKETS = (2, 4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def demo18() -> torch.nn.Module:
    model = build_model("dite_hrnet_18")
    load_checkpoint(model, DEMO_CHECKPOINT)
    return model.eval()


@pytest.fixture(scope="module")
def torch18(demo18: torch.nn.Module) -> InferenceEngine:
    return InferenceEngine(demo18)


@pytest.fixture(scope="module")
def engine18(demo18: torch.nn.Module, cache_dir: Path) -> OpenVinoEngine:
    return OpenVinoEngine(demo18, batch_buckets=BUCKETS, cache_dir=cache_dir)


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 9])  # below, at each bucket (padded), split past the largest
def test_fp32_agrees_with_the_torch_engine_at_every_bucket(engine18, torch18, batch):
    crops = reference_crops((256, 192))[:batch]
    with torch.inference_mode():
        expected = torch18(crops)
    got = engine18(crops)
    assert got.shape == expected.shape == (batch, 17, 64, 48)
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max()) < FP32_TOL


def test_build_engine_picks_openvino_from_its_table(demo18, torch18, engine18, cache_dir, monkeypatch):
    """``build_engine(..., backend="openvino")`` is the same engine (here from the disk cache engine18 filled)."""
    from ditepose.model.engines.build import build_engine
    from ditepose.model.engines.openvino import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir.parent / "xdg"))
    (default_cache_dir().parent).mkdir(parents=True, exist_ok=True)
    default_cache_dir().symlink_to(cache_dir, target_is_directory=True)
    engine = build_engine(demo18, "cpu", "fp32", backend="openvino", batch_buckets=BUCKETS)
    crops = reference_crops((256, 192))[:3]
    with torch.inference_mode():
        expected = torch18(crops)
    assert engine.describe()["backend"] == "openvino"
    assert float((engine(crops) - expected).abs().max()) < FP32_TOL
    for refused in ({"device": "cuda:0"}, {"precision": "fp16"}, {"cuda_graphs": True}, {"process": True}):
        kwargs = {"device": "cpu", "precision": "fp32", **refused}
        with pytest.raises(ValueError, match="openvino"):
            build_engine(demo18, backend="openvino", batch_buckets=BUCKETS, **kwargs)


def test_padding_and_splitting_compile_only_the_buckets(engine18):
    engine18(reference_crops((256, 192))[:7])  # 4, then 3 padded to 4
    described = engine18.describe()
    assert set(described["compiled"]) <= {f"b{b}-256x192" for b in BUCKETS}
    assert described["backend"] == "openvino"
    assert described["precision"] == "fp32"
    assert described["inference_precision"] == "f32"  # set explicitly: OpenVINO's CPU default may be bf16


def test_samples_of_a_padded_batch_do_not_mix(engine18):
    crops = reference_crops((256, 192))[:3]
    together = engine18(crops)
    alone = torch.cat([engine18(crops[i : i + 1]) for i in range(3)])
    assert float((together - alone).abs().max()) < FP32_TOL


def test_a_second_engine_starts_from_the_disk_cache(demo18, engine18, cache_dir, monkeypatch):
    engine18.warmup([2])
    irs = sorted(p.name for p in (cache_dir / "ir").iterdir())
    blobs = sorted(p.name for p in (cache_dir / "blobs").iterdir())
    assert any(name.endswith(".xml") for name in irs) and any(name.endswith(".bin") for name in irs)
    assert blobs, "OpenVINO wrote no compiled blob"
    second = OpenVinoEngine(demo18, batch_buckets=BUCKETS, cache_dir=cache_dir)

    def no_export(*args: object) -> None:
        raise AssertionError("the second engine exported again instead of reading the cached IR")

    monkeypatch.setattr(second.runtime, "exporter", no_export)
    crops = reference_crops((256, 192))[:1]
    assert float((second(crops) - engine18(crops)).abs().max()) == 0.0
    assert second.runtime.cache_hits == 1
    assert sorted(p.name for p in (cache_dir / "blobs").iterdir()) == blobs  # the compiled blob was reused


def test_other_weights_get_other_cache_entries(demo18):
    changed = build_model("dite_hrnet_18")
    changed.load_state_dict(demo18.state_dict())
    with torch.no_grad():
        changed.keypoint_head.final_layer.bias[0] += 1e-3
    assert module_fingerprint(changed, "x") != module_fingerprint(demo18, "x")
    assert module_fingerprint(demo18, "x") == module_fingerprint(demo18, "x")


def test_a_non_default_input_size(demo18, cache_dir):
    engine = OpenVinoEngine(demo18, batch_buckets=(2,), cache_dir=cache_dir, input_hw=(128, 96))
    crops = reference_crops((128, 96))[:3]  # padded to 2 + 2
    with torch.inference_mode():
        expected = InferenceEngine(demo18)(crops)
    got = engine(crops)
    assert got.shape == (3, 17, 32, 24)
    assert float((got - expected).abs().max()) < FP32_TOL


@pytest.mark.slow  # a -30 export at 256x256
def test_dite_hrnet_30_matches_the_float64_reference(reference_dir, cache_dir):
    model, golden = load_reference(reference_dir, "dite_hrnet_30")
    engine = OpenVinoEngine(model, batch_buckets=(2,), cache_dir=cache_dir, input_hw=(256, 256))
    inputs = golden["input"].float()
    batch = torch.cat([inputs, inputs[:1].flip(-1)])  # 3 distinct samples: one bucket, then a padded one
    got = engine(batch)
    assert float((got[:2].double() - golden["heatmaps_eval_fp64"]).abs().max()) < REFERENCE_TOL
    with torch.inference_mode():
        expected = InferenceEngine(model)(batch)
    assert float((got - expected).abs().max()) < REFERENCE_TOL
    assert float((engine(batch[:1]) - got[:1]).abs().max()) < REFERENCE_TOL  # batch 1, padded


def test_dite_hrnet_18_matches_the_float64_reference(reference_dir, cache_dir):
    model, golden = load_reference(reference_dir, "dite_hrnet_18")
    engine = OpenVinoEngine(model, batch_buckets=(4,), cache_dir=cache_dir)
    got = engine(mirrored_golden_batch(reference_dir).float())
    assert float((got[:2].double() - golden["heatmaps_eval_fp64"]).abs().max()) < REFERENCE_TOL


def test_throughput_mode_serves_threads_at_once(demo18, cache_dir):
    engine = OpenVinoEngine(demo18, mode="throughput", threads=2, streams=2, batch_buckets=(2,), cache_dir=cache_dir)
    crops = reference_crops((256, 192))[:4]
    expected = engine(crops)
    results: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        results[i] = engine(crops)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(float((out - expected).abs().max()) == 0.0 for out in results.values()) and len(results) == 2
    described = engine.describe()
    assert described["mode"] == "throughput" and described["streams"] == 2
    assert int(engine.runtime.compiled(2, (256, 192)).get_property("NUM_STREAMS")) == 2


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 in OpenVINO")
def test_bf16_is_judged_by_the_agreement_check(demo18, torch18, cache_dir):
    """Measured: 4 of 340 joints (1.2%) moved more than 4 px (all low-confidence hips and knees of the
    demo checkpoint), heatmap max-abs error 0.014 of peak 1.13: accepted under the default bounds;
    refused under bounds that allow no joint to move by half a pixel, saying why."""
    engine = OpenVinoEngine(demo18, precision="bf16", batch_buckets=(4,), cache_dir=cache_dir)
    assert engine.describe()["precision"] == "bf16"
    crops = reference_crops((256, 192))
    with torch.inference_mode():
        expected = torch18(crops)
    got = engine(crops)
    report = compare_heatmaps(expected, got, (256, 192), "openvino bf16")
    assert engine.describe()["inference_precision"] == "bf16"
    assert 0 < report.heatmap_max_abs < 0.05
    assert report.passed and report.moved_share <= 0.05, report.verdict()
    strict = compare_heatmaps(expected, got, (256, 192), "openvino bf16", AgreementBounds(0.5, 0.0))
    assert not strict.passed
    assert strict.verdict().startswith("refused: openvino bf16:")
    assert "moved more than 0.5 px" in strict.verdict() and "Serve it in fp32" in strict.verdict()


def test_bad_options_are_refused(demo18):
    with pytest.raises(ValueError, match="precision"):
        OpenVinoEngine(demo18, precision="fp16")
    with pytest.raises(ValueError, match="mode"):
        OpenVinoEngine(demo18, mode="fastest")
    with pytest.raises(TypeError, match="TopDownPoseNet"):
        OpenVinoEngine(torch.nn.Conv2d(3, 17, 1))
    with pytest.raises(ValueError, match="not supported"):
        OpenVinoEngine(demo18, input_hw=(250, 192))


def test_bad_inputs_are_refused(engine18):
    assert_refuses(engine18, [
        (torch.zeros(3, 256, 192), ValueError, "NCHW"),
        (torch.zeros(0, 3, 256, 192), ValueError, "empty"),
        (torch.zeros(1, 1, 256, 192), ValueError, "channels"),
        (torch.zeros(1, 3, 250, 192), ValueError, "not supported"),
    ])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_nanodet_on_openvino_finds_the_same_people(nanodet, cache_dir):
    from ditepose.model.engines.openvino_nanodet import OpenVinoNanoDetDetector

    detector = OpenVinoNanoDetDetector(batch_buckets=(2,), cache_dir=cache_dir)
    image = np.ascontiguousarray(cv2.imread(str(REPO_ROOT / "docs" / "riders.jpg"))[..., ::-1])
    expected_boxes, expected_scores = nanodet.detect(image)
    boxes, scores = detector.detect(image)
    assert len(expected_boxes) == len(boxes) == 3
    assert all(_iou(a, b) > 0.999 for a, b in zip(expected_boxes, boxes, strict=True))
    assert float(np.abs(expected_scores - scores).max()) < 1e-3
    batch = torch.cat([nanodet.preprocess(image), nanodet.preprocess(image[:, ::-1].copy()),
                       nanodet.preprocess(image[::-1].copy())])  # 3 images: a full bucket, then a padded one
    with torch.inference_mode():
        expected = nanodet.device_forward("cpu")(batch)
    got = detector.device_forward("cpu")(batch)
    assert got.shape == expected.shape == (3, 3549, 5)
    assert float((got - expected).abs().max()) < 1e-3
    assert detector.runner.describe()["network"] == "nanodet"

"""``ditepose predict`` as a user runs it: a subprocess on a real COCO photo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2

from ditepose.model.keypoints import COCO
from tests.conftest import REPO_ROOT, python_cmd, subprocess_env

IMAGE = "000000397133.jpg"  # 640x427, one standing person annotated at (388, 69, 109, 277)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        python_cmd("predict", *args), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
        timeout=300,
    )


def test_predict_json_and_drawing(coco_mini: Path, tmp_path: Path) -> None:
    image = str(coco_mini / "val2017" / IMAGE)
    out = tmp_path / "vis.jpg"
    proc = _run(image, "--random-weights", "--json", "--boxes", "[[388, 69, 109, 277, 0.9]]", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert (result["width"], result["height"]) == (640, 427)
    (person,) = result["persons"]
    assert person["bbox"] == [388, 69, 109, 277]
    assert [k["name"] for k in person["keypoints"]] == list(COCO.joint_names)
    # keypoints stay within the padded box (1.25 x (0.75*277) wide, 1.25 x 277 tall)
    for kp in person["keypoints"]:
        assert 388 + 54.5 - 140 <= kp["x"] <= 388 + 54.5 + 140
        assert 69 + 138.5 - 185 <= kp["y"] <= 69 + 138.5 + 185
    drawn = cv2.imread(str(out))
    assert drawn is not None and drawn.shape == (427, 640, 3)


def test_predict_errors_are_clear(coco_mini: Path, tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "missing.jpg"), "--random-weights")
    assert proc.returncode == 2
    assert "cannot read image" in proc.stderr and "missing.jpg" in proc.stderr
    proc = _run(str(coco_mini / "val2017" / IMAGE), "--random-weights", "--boxes", "[[1, 2, 3]]")
    assert proc.returncode == 2 and "boxes" in proc.stderr


def test_predict_missing_checkpoint_names_it(coco_mini: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no.pth"
    proc = _run(str(coco_mini / "val2017" / IMAGE), "--checkpoint", str(missing))
    assert proc.returncode == 2 and "no.pth" in proc.stderr

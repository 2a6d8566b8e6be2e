"""``POST /v1/pose?render=png`` draws with model/draw.py, as ``ditepose predict --out`` does."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ditepose.model.draw import draw_poses
from ditepose.model.keypoints import COCO
from ditepose.model.pipeline import PersonPose
from tests.service.conftest import COCO_BOXES, post_pose


def test_png_is_draw_poses_of_the_json_answer(server, coco_image_path) -> None:
    png = io.BytesIO()
    Image.open(coco_image_path).convert("RGB").save(png, format="PNG")
    image = np.asarray(Image.open(png).convert("RGB"))
    options = {"boxes": COCO_BOXES, "model": "hrnet18", "decoder": "dark"}
    with server.client() as client:
        answer = post_pose(client, png.getvalue(), **options).json()
        drawn = post_pose(client, png.getvalue(), params={"render": "png"}, **options)
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"
    assert drawn.headers["X-Persons"] == str(len(answer["persons"])) == "3"
    persons = [
        PersonPose(np.array(p["bbox"], np.float32), p["score"],
                   np.array([[k["x"], k["y"], k["score"]] for k in p["keypoints"]], np.float32))
        for p in answer["persons"]
    ]
    expected = draw_poses(image, persons, COCO)  # the defaults of `ditepose predict --out`
    got = np.asarray(Image.open(io.BytesIO(drawn.content)).convert("RGB"))
    assert got.shape == image.shape
    assert (got != image).any()
    np.testing.assert_array_equal(got, expected)

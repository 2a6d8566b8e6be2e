"""What a checkpoint is known to score, said where the model is served.

A client choosing a model, and a person opening the demo page, should see at once whether the
network behind it is any good. ``demo_weights`` only says "random weights"; it is false for the
shipped demo checkpoint, which is trained (on 80 images) and scores AP 0.0023 on held-out
COCO images. So every served model carries a :class:`ModelQuality`: the evaluation its checkpoint
records (dataset, boxes, the primary metric), or "not evaluated", and one plain sentence for
people. ``/v1/models``, gRPC ``ListModels`` and the demo page show it.

Where the numbers come from: the trainer stores its last validation in the checkpoint's metadata
(``extra["metrics"]``, ``extra["boxes"]``, and ``extra["evaluated_on"]`` naming the data). The
shipped demo checkpoint predates ``evaluated_on``; its data is known (coco-mini val, pinned by
``tests/model/test_demo_checkpoint.py``) and named here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ditepose.model.defaults import DEFAULT_CHECKPOINT_NAME, WEIGHTS_DIR

PRIMARY_METRICS = ("AP", "PCKh")  # COCO keypoints, MPII

DEMO_EVALUATED_ON = "coco-mini val (79 COCO val2017 images, 68 people)"
DEMO_NOTE = ("DEMO checkpoint: trained by this project on 80 coco-mini images only (no full COCO here); "
             "it scores AP {ap:.4f} on held-out COCO images and is NOT usable on real photos. "
             "Serve a checkpoint trained on full COCO (ditepose train, or the authors' weights) for real use.")
RANDOM_NOTE = "RANDOM weights (no checkpoint found): the poses are meaningless."
NOT_EVALUATED_NOTE = ("Not evaluated: the checkpoint records no evaluation. Score it with `ditepose evaluate` "
                      "or POST /v1/evaluate.")


@dataclass(frozen=True)
class ModelQuality:
    """The recorded evaluation of a served checkpoint; ``evaluated`` False: nothing is recorded."""

    evaluated: bool
    note: str
    dataset: str | None = None  # what it was evaluated on
    boxes: str | None = None  # "gt" or the detector whose boxes were used
    metric: str | None = None  # the primary metric: "AP" (COCO) or "PCKh" (MPII)
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    demo_checkpoint: bool = False  # the project's shipped demo checkpoint

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_shipped_demo(checkpoint: str | None) -> bool:
    """Whether ``checkpoint`` is the demo checkpoint shipped in ``model/weights``."""
    if not checkpoint:
        return False
    path = Path(checkpoint)
    return path.name == DEFAULT_CHECKPOINT_NAME and path.resolve().parent == WEIGHTS_DIR.resolve()


def _numbers(metrics: object) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        return {}
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def recorded_quality(checkpoint: str | None, random_weights: bool, extra: Mapping[str, Any]) -> ModelQuality:
    """The quality a model's checkpoint records (``extra``: the checkpoint's metadata)."""
    if random_weights:
        return ModelQuality(evaluated=False, note=RANDOM_NOTE)
    metrics = _numbers(extra.get("metrics"))
    metric = next((name for name in PRIMARY_METRICS if name in metrics), None)
    demo = is_shipped_demo(checkpoint)
    if metric is None:
        return ModelQuality(evaluated=False, note=NOT_EVALUATED_NOTE, demo_checkpoint=demo)
    dataset = extra.get("evaluated_on") or (DEMO_EVALUATED_ON if demo else None)
    boxes = extra.get("boxes")
    value = metrics[metric]
    if demo:
        note = DEMO_NOTE.format(ap=value)
    else:
        where = f" on {dataset}" if dataset else " on its training run's validation set (not named in the checkpoint)"
        note = f"Recorded evaluation: {metric} {value:.4f}{where}, {boxes or 'gt'} boxes."
    return ModelQuality(evaluated=True, note=note, dataset=str(dataset) if dataset else None,
                        boxes=str(boxes) if boxes else None, metric=metric, value=value, metrics=metrics,
                        demo_checkpoint=demo)

"""The person detectors' constructor options, read from the service's settings: one place for
where a detector finds its weights, used by the service (:class:`~ditepose.service.core.pose_service.PoseService`)
and by evaluation jobs (:mod:`ditepose.service.jobs.plan`). Nothing is ever downloaded."""

from __future__ import annotations

from typing import Any

from ditepose.service.core.settings import Settings


def detector_options(settings: Settings, name: str, *, for_job: bool = False) -> dict[str, Any]:
    """Constructor options of detector ``name`` ('nanodet', 'torchvision'; others take none).

    A served detector also gets the service's score threshold and person cap. ``for_job``: the
    options a job plan stores as JSON (paths as strings) and hands to
    :func:`~ditepose.training.boxes.make_detector`, which sets the job's own threshold."""
    if name == "nanodet":  # served on the service's engine (auto: OpenVINO on CPUs where installed); jobs: torch
        if for_job:
            return {"weights_dir": str(settings.weights_dir)} if settings.weights_dir is not None else {}
        return {"score_thr": settings.det_score_threshold, "max_persons": settings.max_boxes,
                "weights_dir": settings.weights_dir, "engine": settings.engine}
    if name == "torchvision":
        weights = settings.torchvision_weights
        is_file = weights.endswith((".pth", ".pt")) or "/" in weights
        options = {"arch": settings.torchvision_arch, **({"weights_path": weights} if is_file else {"weights": weights})}
        return options if for_job else {**options, "max_persons": settings.max_boxes, "download": False}
    return {}

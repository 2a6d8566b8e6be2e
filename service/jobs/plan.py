"""The resolved, server-side form of an evaluation request: what a worker needs to run it.

A :class:`JobPlan` is made by the API (:class:`~ditepose.service.jobs.manager.JobService`)
from a client's :class:`~ditepose.service.jobs.schemas.EvaluateRequest`, stored with the job
record as JSON (:meth:`JobPlan.to_dict`) and read back by whichever worker runs the job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ditepose.service.core.settings import DatasetSpec, ModelSpec


@dataclass(frozen=True)
class EvalOptions:
    flip_test: bool = True
    decoder: str = "default"
    use_gt_boxes: bool = True
    batch_size: int = 32
    max_images: int | None = None  # COCO only: the first N images that hold persons


@dataclass(frozen=True)
class JobPlan:
    """A model (a served name, or a checkpoint of the checkpoint folder) on a named dataset."""

    model: ModelSpec
    served: bool  # True: a served model, taken from the serving pool when the job runs there
    dataset_name: str
    dataset: DatasetSpec
    options: EvalOptions

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.model_dump(mode="json"),
            "served": self.served,
            "dataset_name": self.dataset_name,
            "dataset": self.dataset.model_dump(mode="json"),
            "options": asdict(self.options),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobPlan:
        return cls(
            model=ModelSpec.model_validate(data["model"]),
            served=bool(data["served"]),
            dataset_name=str(data["dataset_name"]),
            dataset=DatasetSpec.model_validate(data["dataset"]),
            options=EvalOptions(**data["options"]),
        )

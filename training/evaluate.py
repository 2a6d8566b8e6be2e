"""Inference over a top-down dataset (flip test, mmpose decoding) and its metric table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ditepose.model.codec import decode_heatmaps, flip_test_merge
from ditepose.training.coco_eval import evaluate_coco
from ditepose.training.datasets import CocoKeypointDataset, MpiiKeypointDataset, TopDownDataset
from ditepose.training.mpii_eval import evaluate_mpii


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: TopDownDataset,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    flip: bool = True,
    decoder: str = "default",
    workers: int = 0,
) -> list[dict[str, Any]]:
    """One prediction per dataset sample: image_id, keypoints [K,3] in image pixels, box_score, area, bbox_id."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    out: list[dict[str, Any]] = []
    try:
        for batch in loader:
            x = batch["input"].to(device)
            heat = model(x).float().cpu().numpy()
            if flip:
                heat_f = model(torch.flip(x, dims=[3])).float().cpu().numpy()
                heat = flip_test_merge(heat, heat_f, dataset.spec.flip_pairs, shift=True)
            coords, scores = decode_heatmaps(heat, batch["center"].numpy(), batch["scale"].numpy(), decoder)
            for i in range(len(coords)):
                kpts = np.concatenate([coords[i], scores[i].reshape(-1, 1)], axis=1)
                out.append({
                    "image_id": int(batch["image_id"][i]), "keypoints": kpts,
                    "box_score": float(batch["bbox_score"][i]), "area": float(batch["area"][i]),
                    "bbox_id": int(batch["index"][i]),
                })
    finally:
        model.train(was_training)
    return out


def score(dataset: TopDownDataset, predictions: list[dict[str, Any]], mpii_gt: str | Path | None = None) -> dict[str, float]:
    """COCO AP table or MPII PCKh table for predictions made on ``dataset``."""
    if isinstance(dataset, CocoKeypointDataset):
        return evaluate_coco(predictions, dataset.coco, img_ids=dataset.eval_image_ids)
    if isinstance(dataset, MpiiKeypointDataset):
        if mpii_gt is None:
            raise ValueError("MPII evaluation needs the ground-truth file (mpii_gt_*.json/.npz/.mat)")
        ordered = sorted(predictions, key=lambda p: p["bbox_id"])
        return evaluate_mpii(np.stack([p["keypoints"][:, :2] for p in ordered]), mpii_gt)
    raise TypeError(f"no metric for {type(dataset).__name__}")


def primary_metric(dataset: TopDownDataset) -> str:
    return "AP" if isinstance(dataset, CocoKeypointDataset) else "PCKh"

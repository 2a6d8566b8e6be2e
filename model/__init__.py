"""Dite-HRNet networks, checkpoint I/O and the top-down pose pipeline."""

from ditepose.model.checkpoint import CheckpointMeta, load_checkpoint, load_pose_model, save_checkpoint
from ditepose.model.defaults import default_checkpoint_path
from ditepose.model.dite_hrnet import DiteHRNetConfig, TopDownPoseNet
from ditepose.model.keypoints import COCO, MPII, KeypointSpec, get_keypoint_spec
from ditepose.model.registry import build_model, get_config, list_models
from ditepose.model.transforms import get_affine_transform

__all__ = [
    "COCO",
    "MPII",
    "CheckpointMeta",
    "DiteHRNetConfig",
    "KeypointSpec",
    "TopDownPoseNet",
    "build_model",
    "default_checkpoint_path",
    "get_affine_transform",
    "get_config",
    "get_keypoint_spec",
    "list_models",
    "load_checkpoint",
    "load_pose_model",
    "save_checkpoint",
]

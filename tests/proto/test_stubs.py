"""The committed gRPC stubs are what ``proto/generate.py`` makes from ``pose.proto`` today."""

from __future__ import annotations

from pathlib import Path

from ditepose.proto.generate import GENERATED, generate
from tests.conftest import REPO_ROOT


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    committed = REPO_ROOT / "proto" / "ditepose" / "v1"
    for path in fresh:
        assert path.name in GENERATED
        current = (committed / path.name).read_text()
        assert path.read_text() == current, f"{path.name} is stale: run `python proto/generate.py`"


def test_stubs_import_from_repo_packages() -> None:
    from ditepose.proto.ditepose.v1 import pose_pb2, pose_pb2_grpc

    assert pose_pb2.DESCRIPTOR.package == "ditepose.v1"
    assert hasattr(pose_pb2_grpc, "PoseServiceStub")
    request = pose_pb2.StreamRequest(frame=pose_pb2.Frame(sequence_number=7, timestamp=0.25))
    again = pose_pb2.StreamRequest.FromString(request.SerializeToString())
    assert again.WhichOneof("kind") == "frame" and again.frame.sequence_number == 7
    # Unset optional fields are distinguishable from false/zero (flip_test defaults to true).
    assert not pose_pb2.PoseOptions().HasField("flip_test")

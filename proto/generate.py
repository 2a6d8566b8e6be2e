"""Regenerate the Python stubs of ``proto/ditepose/v1/pose.proto`` (committed to the repo).

Run from anywhere: ``python proto/generate.py``. The protos are compiled from a staging copy laid
out as the installed package (``ditepose/proto/ditepose/v1/pose.proto``), so the generated code
imports ``ditepose.proto.ditepose.v1.pose_pb2``, the project's one import root.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOS = ("proto/ditepose/v1/pose.proto",)
GENERATED = ("pose_pb2.py", "pose_pb2.pyi", "pose_pb2_grpc.py")


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Compile the protos into ``out_dir / "proto/ditepose/v1"``; return the generated files."""
    from grpc_tools import protoc

    target = out_dir / "proto" / "ditepose" / "v1"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "src"
        built = Path(tmp) / "out"
        built.mkdir()
        for proto in PROTOS:
            staged = stage / "ditepose" / proto
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO_ROOT / proto, staged)
        args = [
            "grpc_tools.protoc",
            f"-I{stage}",
            f"--python_out={built}",
            f"--pyi_out={built}",
            f"--grpc_python_out={built}",
            *(str(stage / "ditepose" / p) for p in PROTOS),
        ]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        for name in GENERATED:
            shutil.copyfile(built / "ditepose" / "proto" / "ditepose" / "v1" / name, target / name)
    return [target / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repo root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

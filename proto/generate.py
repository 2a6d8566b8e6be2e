"""Regenerate the Python stubs of ``proto/ditepose/v1/pose.proto`` (committed to the repo).

Run from anywhere: ``python proto/generate.py``. Protos are compiled with the repo root as the
include path, so the generated code imports ``proto.ditepose.v1.pose_pb2`` and works with the
repository's own packages (no sys.path tricks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOS = ("proto/ditepose/v1/pose.proto",)
GENERATED = ("pose_pb2.py", "pose_pb2.pyi", "pose_pb2_grpc.py")


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Compile the protos into ``out_dir`` (mirroring ``proto/ditepose/v1``); return the files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(REPO_ROOT / p) for p in PROTOS),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    target = out_dir / "proto" / "ditepose" / "v1"
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

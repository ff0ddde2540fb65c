"""Regenerate the committed gRPC/protobuf code: ``python -m proto.generate`` (or ``make proto``)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ["proto/swarmlm.proto"]
GENERATED = ["proto/swarmlm_pb2.py", "proto/swarmlm_pb2.pyi", "proto/swarmlm_pb2_grpc.py"]


def generate(out_dir: Path) -> None:
    """Write the generated modules under ``out_dir`` (``out_dir/proto/...``)."""
    from grpc_tools import protoc  # dev dependency, pinned in pyproject.toml

    (out_dir / "proto").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(ROOT / p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def main() -> int:
    generate(ROOT)
    for path in GENERATED:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the protobuf/gRPC modules from nodeagent/**/*.proto (`make proto`).

The generated *_pb2.py / *_pb2_grpc.py files are committed so users need no protoc. They are produced by
grpc_tools.protoc (pinned in pyproject.toml with grpcio-tools); the generated code checks at import that
the protobuf runtime is not older than the protoc that made it, so regenerate after bumping either pin.
Paths are given relative to the repository root so generated imports are absolute
(`from nodeagent.ca.proto import ca_pb2`).
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    well_known = str(resources.files("grpc_tools") / "_proto")
    protos = sorted(p.relative_to(ROOT) for p in (ROOT / "nodeagent").rglob("*.proto"))
    if not protos:
        print("no .proto files under nodeagent/", file=sys.stderr)
        return 1
    for proto in protos:
        # --pyi_out: typed stubs beside the generated code, so mypy checks how messages are used.
        args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={ROOT}", f"--pyi_out={ROOT}"]
        # Message-only protos (zds.proto) get no _pb2_grpc.py: it would hold nothing but imports.
        has_service = re.search(r"^\s*service\s", (ROOT / proto).read_text(), re.MULTILINE) is not None
        if has_service:
            args.append(f"--grpc_python_out={ROOT}")
        args.append(str(ROOT / proto))
        if protoc.main(args) != 0:
            print(f"protoc failed on {proto}", file=sys.stderr)
            return 1
        print(f"generated {proto.with_suffix('')}_pb2.py" + (" and _pb2_grpc.py" if has_service else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

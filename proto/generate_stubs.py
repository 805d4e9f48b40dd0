"""Generate the Python gRPC stubs next to the .proto files (run by `make install`; never hand-edit them).

python -m proto.generate_stubs
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from grpc_tools import protoc

    for proto in sorted((ROOT / "proto").glob("*.proto")):
        args = [
            "protoc",
            f"-I{ROOT}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
        ]
        if protoc.main([*args, str(proto.relative_to(ROOT))]) != 0:
            print(f"protoc failed on {proto}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

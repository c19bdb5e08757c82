#!/usr/bin/env python3
"""Generate csi_driver/csi/csi_pb2*.py(i) from proto/csi.proto with grpcio-tools.

The generated files are committed so that installing the driver needs no code generator; CI runs
this with --check, which fails when they differ from a fresh generation (e.g. after a hand edit).
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "csi_driver" / "csi"
NAMES = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def generate(dest: Path) -> None:
    # Map proto/ to the virtual directory csi_driver/csi: generated imports become package-absolute.
    args = [
        "protoc",
        f"-Icsi_driver/csi={ROOT / 'proto'}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={dest}",
        f"--pyi_out={dest}",
        f"--grpc_python_out={dest}",
        "csi_driver/csi/csi.proto",
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "csi_driver" / "csi"
        if check:
            stale = [n for n in NAMES
                     if not (OUT / n).exists() or not filecmp.cmp(fresh / n, OUT / n, False)]
            if stale:
                print(f"generated stubs differ from proto/csi.proto: {', '.join(stale)}; "
                      "run scripts/gen_proto.py", file=sys.stderr)
                return 1
            print("generated stubs are up to date")
            return 0
        for n in NAMES:
            (OUT / n).write_bytes((fresh / n).read_bytes())
        print(f"wrote {', '.join(NAMES)} to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

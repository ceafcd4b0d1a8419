"""Regenerates the committed gRPC stubs from proto/consortium.proto (needs grpcio-tools).

    python -m consortium.transport.codegen          # rewrite src/consortium/transport/proto/
    python -m consortium.transport.codegen --check  # exit 1 if the committed stubs are stale

The proto is compiled from a temporary tree that mirrors the package path, so the
generated modules import each other as `consortium.transport.proto.*` with no patching.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent / "proto"
PROTO_FILE = Path(__file__).resolve().parents[3] / "proto" / "consortium.proto"
GENERATED = ("consortium_pb2.py", "consortium_pb2.pyi", "consortium_pb2_grpc.py")
_REL = Path("consortium/transport/proto")


def generate(out_dir: Path, proto: Path = PROTO_FILE) -> list[Path]:
    """Compile `proto` into out_dir; returns the generated files. Raises RuntimeError on failure."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise RuntimeError("grpcio-tools is needed to regenerate the stubs (pip install -e '.[dev]')") from e
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / _REL
        src.mkdir(parents=True)
        shutil.copyfile(proto, src / "consortium.proto")
        args = [
            "grpc_tools.protoc",
            f"-I{tmp}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(_REL / "consortium.proto"),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            shutil.copyfile(src / name, out_dir / name)
            written.append(out_dir / name)
    return written


def stale_files(committed: Path = PACKAGE_DIR, proto: Path = PROTO_FILE) -> list[str]:
    """Names of committed stubs that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), proto)
        return [n for n in GENERATED if (Path(tmp) / n).read_bytes() != _read(committed / n)]


def _read(p: Path) -> bytes:
    return p.read_bytes() if p.is_file() else b""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        stale = stale_files()
        if stale:
            print(
                f"stale stubs: {', '.join(stale)} (run python -m consortium.transport.codegen)",
                file=sys.stderr,
            )
            return 1
        return 0
    for p in generate(PACKAGE_DIR):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

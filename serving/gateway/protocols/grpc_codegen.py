"""Regenerates the v2 gRPC code committed beside the .proto files, with grpcio-tools' protoc.

From ``grpc_predict_v2_messages.proto``: ``grpc_predict_v2_messages_pb2.py`` (the messages)
and its ``.pyi`` (their types, for mypy); from ``grpc_predict_v2.proto``:
``grpc_predict_v2_pb2_grpc.py`` (the service's stub, servicer and registration) and no
``_pb2`` module (why: that file's header). Paths inside the generated code are from the
repository's root (``from serving.gateway.protocols import ...``), so it imports as a
package. A unit test regenerates into a temporary folder and compares, so the committed code
cannot drift from the .proto files.

    make grpc-gen                 # python -m serving.gateway.protocols.grpc_codegen: in place
    generate(Path("/tmp/out"))    # the same files under /tmp/out/serving/gateway/protocols/

grpcio-tools is a test dependency (``pip install -e '.[test]'``); serving needs only grpcio
and protobuf at run time.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
"""The repository's root: the protoc include path, so generated imports are package paths."""
HERE = Path(__file__).resolve().parent
MESSAGES_PROTO = HERE / "grpc_predict_v2_messages.proto"
SERVICE_PROTO = HERE / "grpc_predict_v2.proto"
GENERATED = (
    HERE / "grpc_predict_v2_messages_pb2.py",
    HERE / "grpc_predict_v2_messages_pb2.pyi",
    HERE / "grpc_predict_v2_pb2_grpc.py",
)
"""The committed files, each generated under ``out_dir`` at its path from ``ROOT``."""


def protoc_runs(out_dir: Path) -> list[list[str]]:
    """protoc's arguments, one list per run: the messages (Python and stubs), then the
    service (gRPC code only)."""
    include = f"-I{ROOT}"
    return [
        ["protoc", include, f"--python_out={out_dir}", f"--pyi_out={out_dir}", str(MESSAGES_PROTO)],
        ["protoc", include, f"--grpc_python_out={out_dir}", str(SERVICE_PROTO)],
    ]


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir``; the files it wrote, in ``GENERATED``'s order. Raises
    ``RuntimeError`` when protoc fails (it prints why)."""
    from grpc_tools import protoc  # a test dependency: only the code generator needs it

    for arguments in protoc_runs(out_dir):
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(arguments)}")
    return [out_dir / path.relative_to(ROOT) for path in GENERATED]


def main() -> int:
    """Regenerate the committed files in place."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = generate(ROOT)
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    for path in written:
        logger.info("wrote %s", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

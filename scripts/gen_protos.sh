#!/usr/bin/env bash
# Regenerate autoglm_trt/serve/grpc/inference_pb2.py and inference_pb2_grpc.py from inference.proto.
#
# The generated modules are checked in. They are made with grpcio-tools 1.62.3 (protoc 25.1) on
# purpose: its Python gencode carries no protobuf runtime-version check and no grpcio version
# check, so the same files load under protobuf 5.26 ... 7.x and grpcio >= 1.62 (the GPU image
# ships grpcio 1.84 with protobuf 6 or 7; newer grpcio-tools would pin the runtime to >= its own
# protobuf). tests/serve/test_grpc_protos.py checks that the checked-in files match the .proto.
#
# The descriptors go into a private DescriptorPool (`inference_pb2.POOL`), not the process-wide
# default one: tritonclient registers its own `inference.*` messages there, and one process
# holding both (a test, an app embedding client and server) would fail with "duplicate symbol".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TOOLS_VERSION=1.62.3
TOOLS_DIR="${GRPC_TOOLS_DIR:-${TMPDIR:-/tmp}/autoglm-grpc-tools-$TOOLS_VERSION}"
if [ ! -d "$TOOLS_DIR/grpc_tools" ]; then
  "$PY" -m pip install --quiet --target "$TOOLS_DIR" "grpcio-tools==$TOOLS_VERSION"
fi
OUT_DIR=autoglm_trt/serve/grpc
PYTHONPATH="$TOOLS_DIR" "$PY" -c "
import sys
from grpc_tools import protoc
sys.exit(protoc.main(['protoc', '-I.', '--python_out=.', '--grpc_python_out=.',
                      '$OUT_DIR/inference.proto']))"
# Private descriptor pool (see above).
"$PY" - "$OUT_DIR/inference_pb2.py" <<'PYEOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
new, n = re.subn(r"^DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\(",
                 "# NOTE: a private pool, so tritonclient's own inference.* messages can coexist.\n"
                 "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile(",
                 src, flags=re.M)
if n != 1:
    sys.exit(f"gen_protos.sh: could not find the descriptor pool line in {path}")
open(path, "w").write(new)
PYEOF
echo "wrote $OUT_DIR/inference_pb2.py and $OUT_DIR/inference_pb2_grpc.py (grpcio-tools $TOOLS_VERSION)"

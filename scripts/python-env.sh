#!/usr/bin/env bash
# Creates (idempotently) the Python environment used by ampybus-proto's
# cross-language tests and golden-file generator: `.venv-ampyproto/` at the
# repository root, with the reference package `ampy-proto==2.1.1` installed.
#
# Needs only `python3` (with pip) and access to PyPI. Progress goes to
# stderr; the only line on stdout is the path of the environment's python.
#
# Usage: scripts/python-env.sh
set -euo pipefail

AMPY_PROTO_VERSION="2.1.1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-ampyproto"
PY="$VENV/bin/python"
BASE_PYTHON="${PYTHON:-python3}"

log() { echo "python-env: $*" >&2; }

has_ampy_proto() {
    [ -x "$PY" ] && "$PY" - "$AMPY_PROTO_VERSION" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata
import sys

from ampy.bars.v1 import bars_pb2  # noqa: F401  (the package must import)

sys.exit(0 if importlib.metadata.version("ampy-proto") == sys.argv[1] else 1)
PYEOF
}

mkdir -p "$VENV"
# Serialise concurrent runs (parallel test binaries) where flock exists.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV/.setup.lock"
    flock 9
fi
# Keep the environment out of git even without a matching .gitignore rule.
[ -f "$VENV/.gitignore" ] || echo '*' >"$VENV/.gitignore"

if has_ampy_proto; then
    log "ampy-proto==$AMPY_PROTO_VERSION already installed"
    echo "$PY"
    exit 0
fi

if [ ! -x "$PY" ]; then
    log "creating $VENV"
    if ! "$BASE_PYTHON" -m venv "$VENV" >&2; then
        # Debian-style pythons without ensurepip: make a pip-less venv and
        # install into it with the base interpreter's pip (pip >= 22.3).
        log "venv with pip failed; retrying without pip"
        "$BASE_PYTHON" -m venv --without-pip "$VENV" >&2
    fi
fi

log "installing ampy-proto==$AMPY_PROTO_VERSION"
if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --disable-pip-version-check --quiet \
        "ampy-proto==$AMPY_PROTO_VERSION" >&2
else
    "$BASE_PYTHON" -m pip --python "$PY" install --disable-pip-version-check \
        --quiet "ampy-proto==$AMPY_PROTO_VERSION" >&2
fi

if ! has_ampy_proto; then
    log "ampy-proto==$AMPY_PROTO_VERSION is not importable from $PY after install"
    exit 1
fi
echo "$PY"

#!/usr/bin/env bash
# The Python SDK (crates/ampybus-py): environment, build, tests, benchmark.
#
#   scripts/python-sdk.sh          # create/refresh .venv-ampybus/ and build + install the SDK into it
#   scripts/python-sdk.sh test     # the same, then pytest (extra arguments go to pytest)
#   scripts/python-sdk.sh bench    # a release build into the same venv, then the publish/consume
#                                  # benchmark against nats-py and the Rust core run in the same
#                                  # process (extra arguments go to the script; it waits for a
#                                  # 1-minute load average < 1 first, see --max-load/--load-wait)
#
# Idempotent. `.venv-ampybus/` (git-ignored) gets pinned tools: maturin (build backend), pytest,
# pytest-asyncio, protobuf, nats-py (benchmark baseline), ampy-proto (the seed's generated
# protobuf classes, for the cross-language tests; it is not the seed's `ampybus` package, so the
# import name `ampybus` stays ours) and asyncpg (the PostgreSQL driver of `ampybus.inbox`). The extension is built by `maturin develop` with the dev
# profile into the workspace's target dir (CARGO_TARGET_DIR if set), so tests, the CLI and the
# wheel share one profile and one set of compiled dependencies. The tests also use two Rust
# programs built here: the CLI (`target/debug/ampybus`) and `examples/proto_peer.rs`.
#
# Needs python3 (3.9+, with venv/pip), cargo, access to PyPI; `test` needs the brokers of
# scripts/brokers.sh (nats on 127.0.0.1:4222, redis on 127.0.0.1:6379) and PostgreSQL on
# 127.0.0.1:5432 (user postgres, no password; tests/test_inbox.py, AMPYBUS_TEST_PG_URL).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-ampybus"
PY="$VENV/bin/python"
BASE_PYTHON="${PYTHON:-python3}"
CRATE="$ROOT/crates/ampybus-py"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

# Pinned: bump together, then rerun this script.
REQUIREMENTS=(
    "maturin==1.16.0"
    "pytest==9.2.0"
    "pytest-asyncio==1.5.0"
    "protobuf==6.33.6"
    "nats-py==2.16.0"
    "ampy-proto==2.1.1"
    "asyncpg==0.32.0"
)

log() { echo "python-sdk: $*" >&2; }

mode="${1:-build}"
[ $# -gt 0 ] && shift

mkdir -p "$VENV"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV/.setup.lock"
    flock 9
fi
[ -f "$VENV/.gitignore" ] || echo '*' >"$VENV/.gitignore"

if [ ! -x "$PY" ]; then
    log "creating $VENV"
    "$BASE_PYTHON" -m venv "$VENV" >&2
fi

stamp="$VENV/.requirements"
want="$(printf '%s\n' "${REQUIREMENTS[@]}")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing ${REQUIREMENTS[*]}"
    "$PY" -m pip install --disable-pip-version-check --quiet "${REQUIREMENTS[@]}" >&2
    printf '%s\n' "$want" >"$stamp"
else
    log "pinned tools already installed"
fi

profile_args=()
profile_dir=debug
if [ "$mode" = "bench" ]; then
    profile_args=(--release)
    profile_dir=release
fi

log "building the extension (maturin develop ${profile_args[*]:-}; target dir $CARGO_TARGET_DIR)"
(
    cd "$CRATE"
    VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" develop --quiet \
        "${profile_args[@]}" >&2
)

if [ "$mode" = "build" ]; then
    "$PY" -c 'import ampybus; print("python-sdk: ampybus", ampybus.__version__, "installed in", __import__("sys").prefix)' >&2
    exit 0
fi

if [ "$mode" = "test" ]; then
    log "building the Rust peers of the tests (ampybus CLI, proto_peer example)"
    (cd "$ROOT" && cargo build --quiet -p ampybus-cli --bin ampybus && cargo build --quiet -p ampybus-py --example proto_peer) >&2
    export AMPYBUS_CLI="$CARGO_TARGET_DIR/$profile_dir/ampybus"
    export AMPYBUS_PROTO_PEER="$CARGO_TARGET_DIR/$profile_dir/examples/proto_peer"
    unset AMPYBUS_URL
    log "pytest crates/ampybus-py/tests"
    cd "$CRATE"
    exec "$PY" -m pytest -q "$@"
fi

if [ "$mode" = "bench" ]; then
    cd "$CRATE"
    exec "$PY" bench/bench_publish.py "$@"
fi

echo "usage: scripts/python-sdk.sh [build|test|bench] [args…]" >&2
exit 2

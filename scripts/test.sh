#!/usr/bin/env bash
# THE test command of the repository (CI runs it through .ci/run).
#
#   scripts/test.sh
#
# Runs, in order: rustfmt check, clippy (warnings are errors), the library's rustdoc (warnings
# are errors), every test of the workspace
# (cargo-nextest when installed, else cargo test), the doctests, then the Python SDK's pytest
# suite (scripts/python-sdk.sh test: builds crates/ampybus-py with maturin into .venv-ampybus/),
# then the instruction budget of the consumer runtime (scripts/perf-gate.sh: a release build of
# crates/ampybus/examples/runtime_cost under valgrind's callgrind, against docs/perf-budget.toml;
# valgrind is installed from Debian's packages when missing).
#
# Needs: rustup's cargo (with the rustfmt and clippy components), a C compiler (SQLite is
# built from source), python3 with pip (ampybus-proto's cross-language tests create
# .venv-ampyproto/ through scripts/python-env.sh), nats-server (Debian package; the NATS tests
# use the one on 127.0.0.1:4222 or start one through scripts/brokers.sh, and spawn their own
# for fault, TLS and permission tests), redis-server (Debian package; the Redis tests use the
# one on 127.0.0.1:6379 or start one through scripts/brokers.sh, and spawn their own for fault
# and ACL tests), a Kafka-API broker (the one on 127.0.0.1:9092, else tansu 0.6.0 with in-memory
# storage, built by scripts/brokers.sh into ~/.cache/ampybus/ once per machine and started
# there), PostgreSQL (the archive tests: postgres@127.0.0.1:5432 without a password, else
# Debian's postgresql started by scripts/brokers.sh; each test makes its own database, and the
# restart test runs its own initdb instance), an S3-compatible server (the blob store tests: the
# one on 127.0.0.1:9000, else moto's, installed by scripts/brokers.sh into ~/.cache/ampybus/ once
# per machine). Brokers this run started are stopped when it ends.
#
# Environment:
#   AMPYBUS_TEST_SCALE  multiplies the sizes of the heavier tests (default 1; 0.2 for a quick
#                       run, 5 for a soak run)
#   CARGO_BUILD_JOBS    as usual, to limit build parallelism
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export AMPYBUS_TEST_SCALE="${AMPYBUS_TEST_SCALE:-1}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Tests must not pick up a developer's bus.
unset AMPYBUS_URL

step() { printf '\n==> %s\n' "$*" >&2; }
started=$SECONDS

step "toolchain: $(cargo --version)"
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            step "installing the $component component"
            rustup component add "$component"
        else
            echo "error: cargo $component is missing and rustup is not available" >&2
            exit 2
        fi
    fi
done

# librdkafka (the Kafka binding) is built from source against OpenSSL and zlib.
if ! pkg-config --exists openssl zlib 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing Debian's libssl-dev, zlib1g-dev and pkg-config (librdkafka's build needs them)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y libssl-dev zlib1g-dev pkg-config >/dev/null 2>&1 \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y libssl-dev zlib1g-dev pkg-config >/dev/null; }
    else
        echo "error: OpenSSL and zlib headers are missing (apt-get install libssl-dev zlib1g-dev pkg-config)" >&2
        exit 2
    fi
fi

# promtool checks docs/grafana/alerts.yml (crates/ampybus/tests/alert_rules.rs): Debian's
# prometheus package, installed once when missing.
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing Debian's prometheus (promtool, for the alert rules test)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null; }
    else
        echo "error: promtool is missing (apt-get install prometheus)" >&2
        exit 2
    fi
fi

# tansu (the tests' Kafka-API broker when none answers on 127.0.0.1:9092) is built once per
# machine, about 12 minutes on 2 cores. On a machine without it the build starts now, beside
# clippy and the rustdoc build (it fills the cores they leave idle), and is waited for before the
# brokers start.
tansu_build_pid=
tansu_build_log="${TMPDIR:-/tmp}/ampybus-tansu-build.$$.log"
if ! bash scripts/brokers.sh status kafka >/dev/null 2>&1; then
    bash scripts/brokers.sh build kafka >"$tansu_build_log" 2>&1 &
    tansu_build_pid=$!
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "RUSTDOCFLAGS=-D warnings cargo doc -p ampybus --no-deps (the library's rustdoc: no broken or private links)"
RUSTDOCFLAGS="-D warnings" cargo doc -p ampybus --no-deps

if [ -x scripts/python-env.sh ] || [ -f scripts/python-env.sh ]; then
    step "python environment for the cross-language tests"
    bash scripts/python-env.sh >/dev/null
fi

step "test brokers (scripts/brokers.sh start nats redis kafka postgres s3: reuses a JetStream server on 127.0.0.1:4222, a Redis on 127.0.0.1:6379 a Kafka-API broker on 127.0.0.1:9092, PostgreSQL on 127.0.0.1:5432 and an S3 server on 127.0.0.1:9000; tansu is built once per machine, about 12 minutes; moto is installed once, under a minute)"
# Stop at exit what this run started (a broker that was already there is left alone).
trap 'bash scripts/brokers.sh stop nats redis kafka postgres s3 >/dev/null 2>&1 || true' EXIT
if [ -n "$tansu_build_pid" ]; then
    wait "$tansu_build_pid" || { cat "$tansu_build_log" >&2; echo "error: building tansu failed" >&2; exit 1; }
    rm -f "$tansu_build_log"
fi
bash scripts/brokers.sh start nats redis kafka postgres s3

step "AsyncAPI parser (scripts/asyncapi-validate.sh install: @asyncapi/parser into ~/.cache/ampybus once per machine, for crates/ampybus-cli/tests/registry.rs)"
bash scripts/asyncapi-validate.sh install

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --workspace (AMPYBUS_TEST_SCALE=$AMPYBUS_TEST_SCALE)"
    cargo nextest run --workspace --no-fail-fast
else
    step "cargo test --workspace (AMPYBUS_TEST_SCALE=$AMPYBUS_TEST_SCALE; cargo-nextest not installed)"
    cargo test --workspace --no-fail-fast --lib --bins --tests --examples
fi

step "cargo test --workspace --doc"
cargo test --workspace --doc

step "Python SDK: scripts/python-sdk.sh test (venv .venv-ampybus/, maturin develop, pytest; brokers as above)"
bash scripts/python-sdk.sh test

step "perf gate: scripts/perf-gate.sh (release runtime_cost under callgrind against docs/perf-budget.toml)"
bash scripts/perf-gate.sh

step "all checks passed in $((SECONDS - started)) s"

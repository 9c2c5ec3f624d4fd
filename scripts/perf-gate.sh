#!/usr/bin/env bash
# The instruction budget of the consumer runtime (issue 15 item 7).
#
#   scripts/perf-gate.sh
#
# Builds crates/ampybus/examples/runtime_cost in release, counts instructions per consumed
# message under callgrind (four runs: `small` and `large` messages, each also "setup" only,
# so fixed costs cancel) and allocations per message (a counting allocator, 20,000
# messages), prints both, and fails when either exceeds docs/perf-budget.toml by more than
# its tolerance. Installs Debian's valgrind when it is missing (as root with apt-get).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

budget=docs/perf-budget.toml
value() { sed -n "s/^$1 *= *\([0-9.]*\).*/\1/p" "$budget"; }
max_ir=$(value consume_instructions)
max_alloc=$(value consume_allocations)
tol=$(value tolerance_percent)
small=$(value small)
large=$(value large)

if ! command -v valgrind >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "perf-gate: installing Debian's valgrind" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y valgrind >/dev/null 2>&1 \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y valgrind >/dev/null; }
    else
        echo "error: valgrind is missing (apt-get install valgrind)" >&2
        exit 2
    fi
fi

cargo build --release -p ampybus --example runtime_cost >&2
exe=target/release/examples/runtime_cost
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

count() { # instructions of one run
    valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$exe" "$@" 2>&1 >/dev/null \
        | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
a=$(count "$small"); b=$(count "$large"); c=$(count "$small" setup); d=$(count "$large" setup)
ir=$(( ((b - a) - (d - c)) / (large - small) ))
alloc=$("$exe" 20000 | sed -n 's/.*(\([0-9.]*\) per message).*/\1/p')

echo "perf-gate: consume path: $ir instructions per message (budget $max_ir), $alloc allocations per message (budget $max_alloc), tolerance ${tol}%"
fail=0
if awk -v v="$ir" -v m="$max_ir" -v t="$tol" 'BEGIN { exit !(v > m * (1 + t / 100)) }'; then
    echo "error: perf-gate: $ir instructions per consumed message exceed the budget $max_ir by more than ${tol}% (docs/perf-budget.toml)" >&2
    fail=1
fi
if awk -v v="$alloc" -v m="$max_alloc" -v t="$tol" 'BEGIN { exit !(v > m * (1 + t / 100)) }'; then
    echo "error: perf-gate: $alloc allocations per consumed message exceed the budget $max_alloc by more than ${tol}% (docs/perf-budget.toml)" >&2
    fail=1
fi
if awk -v v="$ir" -v m="$max_ir" 'BEGIN { exit !(v < m * 0.9) }'; then
    echo "perf-gate: more than 10% under the budget: lower it in $budget" >&2
fi
exit "$fail"

#!/usr/bin/env bash
# The instruction budgets of the consumer runtime and of the publish path (issue 15 item 7).
#
#   scripts/perf-gate.sh
#
# Builds crates/ampybus/examples/runtime_cost and publish_cost in release, counts
# instructions per message under callgrind (for each, four runs: `small` and `large` messages,
# each also "setup" only, so fixed costs cancel; the consume path's figure is the middle of
# three such readings) and allocations per message (a counting
# allocator; the difference of runs of 20,000 and 80,000 messages, so that what is allocated
# once — the consumer's start and stop, the first message of each of the 1,000 keys and
# topics — cancels as well), prints them, and fails when any exceeds docs/perf-budget.toml
# by more than its tolerance. The publish path is counted on `publish_cost … batch`
# (`Headers::for_publish` + `Bus::publish_batch` of 1,000-message batches). Installs Debian's
# valgrind when it is missing (as root with apt-get).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

budget=docs/perf-budget.toml
value() { sed -n "s/^$1 *= *\([0-9.]*\).*/\1/p" "$budget"; }
max_ir=$(value consume_instructions)
max_alloc=$(value consume_allocations)
max_pub_ir=$(value publish_instructions)
max_pub_alloc=$(value publish_allocations)
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

cargo build --release -p ampybus --example runtime_cost --example publish_cost >&2
exe=target/release/examples/runtime_cost
pub_exe=target/release/examples/publish_cost
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

count() { # instructions of one run: count EXE ARGS…
    local exe=$1
    shift
    valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$exe" "$@" 2>&1 >/dev/null \
        | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
per_message() { # the difference method: per_message EXE [MODE]
    local a b c d
    a=$(count "$1" "$small" ${2:+"$2"}); b=$(count "$1" "$large" ${2:+"$2"})
    c=$(count "$1" "$small" ${2:-} setup); d=$(count "$1" "$large" ${2:-} setup)
    echo $(( ((b - a) - (d - c)) / (large - small) ))
}
allocs() { # allocations of one run (not under valgrind): allocs EXE N [MODE]
    "$@" | sed -n 's/.*allocations \([0-9]*\).*/\1/p'
}
alloc_per_message() { # the same difference method, 20,000 and 80,000 messages: EXE [MODE]
    local a b
    a=$(allocs "$1" 20000 ${2:+"$2"}); b=$(allocs "$1" 80000 ${2:+"$2"})
    if [ -z "$a" ] || [ -z "$b" ]; then
        echo "error: perf-gate: $1 printed no allocation count" >&2
        return 2
    fi
    awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", (b - a) / 60000 }'
}
median3() { # the middle of three readings of a command: median3 CMD ARGS…
    local a b c
    a=$("$@"); b=$("$@"); c=$("$@")
    printf '%s\n%s\n%s\n' "$a" "$b" "$c" | sort -n | sed -n 2p
}
# The consume path's reading follows batch sizes, which follow thread timing (±250 seen
# between runs of one build): the middle of three readings.
ir=$(median3 per_message "$exe")
alloc=$(alloc_per_message "$exe")
pub_ir=$(per_message "$pub_exe" batch)
pub_alloc=$(alloc_per_message "$pub_exe" batch)

echo "perf-gate: consume path: $ir instructions per message (budget $max_ir), $alloc allocations per message (budget $max_alloc), tolerance ${tol}%"
echo "perf-gate: publish path: $pub_ir instructions per message (budget $max_pub_ir), $pub_alloc allocations per message (budget $max_pub_alloc), tolerance ${tol}%"
fail=0
over() { # over VALUE BUDGET WHAT
    if awk -v v="$1" -v m="$2" -v t="$tol" 'BEGIN { exit !(v > m * (1 + t / 100)) }'; then
        echo "error: perf-gate: $1 $3 exceed the budget $2 by more than ${tol}% (docs/perf-budget.toml)" >&2
        fail=1
    fi
    if awk -v v="$1" -v m="$2" 'BEGIN { exit !(v < m * 0.9) }'; then
        echo "perf-gate: $3: more than 10% under the budget: lower it in $budget" >&2
    fi
}
over "$ir" "$max_ir" "instructions per consumed message"
over "$alloc" "$max_alloc" "allocations per consumed message"
over "$pub_ir" "$max_pub_ir" "instructions per published message"
over "$pub_alloc" "$max_pub_alloc" "allocations per published message"
exit "$fail"

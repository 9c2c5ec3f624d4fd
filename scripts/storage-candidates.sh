#!/usr/bin/env bash
# Issue 16: builds and runs bench/storage-candidates, which measures candidate storage designs
# for the embedded log (SQLite compact schema, LMDB through heed, a segmented append-only file)
# side by side with the same rows, plus the raw disk (dd) and a cross-process futex wake-up.
# See docs/embedded-log.md for the figures and the decision.
#
#   scripts/storage-candidates.sh                       # full run: 1,000,000 messages, 3 rounds
#   scripts/storage-candidates.sh --messages 100000     # any flag goes to the program
#   QUIET_WAIT=0 scripts/storage-candidates.sh ...      # do not wait for a quiet machine
#
# The program is its own cargo project, excluded from the workspace (CI never builds it); its
# target dir is bench/storage-candidates/target. It is built with CARGO_BUILD_JOBS=1 unless set.
#
# Data: ${STORAGE_BENCH_DIR:-bench/storage-candidates/target/data} (on the repository's disk;
# the script refuses a tmpfs, whose figures would say nothing about a disk), removed at the end.
# Up to ~2.5 GB at the default size.
#
# Before the first round it waits until the 1-minute load average is below ${QUIET_LOAD:-1}
# for at most ${QUIET_WAIT:-1200} seconds, then runs anyway and says so. The report (markdown
# table of medians, then every reading) goes to stdout and to
# bench/storage-candidates/target/report-<date>.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
proj=$repo/bench/storage-candidates
data=${STORAGE_BENCH_DIR:-$proj/target/data}

export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
echo "building $proj (release, CARGO_BUILD_JOBS=$CARGO_BUILD_JOBS)" >&2
cargo build --release --manifest-path "$proj/Cargo.toml" >&2
bin=$proj/target/release/storage-candidates

mkdir -p "$data"
fstype=$(df --output=fstype "$data" | tail -1 | tr -d ' ')
if [ "$fstype" = tmpfs ]; then
  echo "storage-candidates: $data is on tmpfs; set STORAGE_BENCH_DIR to a directory on a disk" >&2
  exit 2
fi
work=$(mktemp -d "$data/run.XXXXXX")
trap 'rm -rf "$work"' EXIT

limit=${QUIET_WAIT:-1200}
want=${QUIET_LOAD:-1}
waited=0
while :; do
  load=$(cut -d' ' -f1 /proc/loadavg)
  if awk -v l="$load" -v w="$want" 'BEGIN { exit !(l < w) }'; then
    echo "quiet: 1-minute load average $load after ${waited}s" >&2
    quiet="quiet (load $load < $want after ${waited}s)"
    break
  fi
  if [ "$waited" -ge "$limit" ]; then
    echo "not quiet after ${waited}s (load $load); measuring anyway" >&2
    quiet="NOT quiet: load $load after waiting ${waited}s"
    break
  fi
  sleep 10
  waited=$((waited + 10))
done

report=$proj/target/report-$(date -u +%Y%m%dT%H%M%SZ).md
{
  echo "# storage-candidates $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- commit $(git -C "$repo" rev-parse --short HEAD), $(nproc) cores, $(uname -r), data on $(df --output=source,fstype "$work" | tail -1 | tr -s ' ')"
  echo "- machine before the first round: $quiet"
  echo "- command: storage-candidates --dir $work $*"
  echo
  "$bin" --dir "$work" "$@"
} | tee "$report"
echo "report: $report" >&2

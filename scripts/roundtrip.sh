#!/usr/bin/env bash
# The quick start: build the CLI (release), publish 3 messages into ./ampybus-data and read
# them back as JSON lines (one envelope per line on stdout).
#
#   scripts/roundtrip.sh
#
# AMPYBUS_URL overrides the data directory (default ./ampybus-data).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p ampybus-cli >&2
bin=target/release/ampybus
url="${AMPYBUS_URL:-./ampybus-data}"
# A topic of its own per run, so the subscriber prints exactly these three messages.
topic="ampy.dev.news.v1.roundtrip.r$(date -u +%Y%m%dT%H%M%S)-$$"

"$bin" --url "$url" pub \
    --topic "$topic" \
    --producer "roundtrip@$(hostname 2>/dev/null || echo localhost)" \
    --source roundtrip.sh \
    --pk "greeting-1" \
    --payload "hello from ampybus" \
    --count 3

"$bin" --url "$url" sub --pattern "$topic" --json --max 3 --timeout 5

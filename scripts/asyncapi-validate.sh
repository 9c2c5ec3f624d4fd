#!/usr/bin/env bash
# Validates AsyncAPI documents with the official parser (@asyncapi/parser from the npm
# registry, run by the machine's Node.js). The parser is installed once into
# ${AMPYBUS_CACHE:-~/.cache/ampybus}/asyncapi-parser (skipped when already there).
#
#   scripts/asyncapi-validate.sh install        # only install
#   scripts/asyncapi-validate.sh FILE...        # install if needed, then validate each FILE
#
# Prints one JSON line per diagnostic and `valid FILE` per valid document; exit 1 when a
# document has an error diagnostic, 2 when node/npm are missing or the install fails.
set -euo pipefail
VERSION="3.6.6"
CACHE="${AMPYBUS_CACHE:-$HOME/.cache/ampybus}/asyncapi-parser"

command -v node >/dev/null || { echo "node not found (install Node.js >= 18)" >&2; exit 2; }
if [ ! -f "$CACHE/node_modules/@asyncapi/parser/package.json" ] \
  || ! grep -q "\"version\": \"$VERSION\"" "$CACHE/node_modules/@asyncapi/parser/package.json"; then
  command -v npm >/dev/null || { echo "npm not found" >&2; exit 2; }
  mkdir -p "$CACHE"
  (cd "$CACHE" && [ -f package.json ] || echo '{"private":true}' > package.json)
  (cd "$CACHE" && npm install --no-audit --no-fund --silent "@asyncapi/parser@$VERSION" >&2) \
    || { echo "npm install @asyncapi/parser@$VERSION failed" >&2; exit 2; }
fi
[ "${1:-}" = "install" ] && exit 0

status=0
for f in "$@"; do
  NODE_PATH="$CACHE/node_modules" node -e '
const { Parser } = require("@asyncapi/parser");
const fs = require("fs");
const file = process.argv[1];
(async () => {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(file, "utf8"));
  let errors = 0;
  for (const d of diagnostics) {
    if (d.severity === 0) errors++;
    console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
  }
  if (!document || errors) { console.log("invalid " + file); process.exit(1); }
  console.log("valid " + file);
})().catch((e) => { console.log("invalid " + file + ": " + e); process.exit(1); });
' "$f" || status=1
done
exit $status

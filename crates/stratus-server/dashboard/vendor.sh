#!/usr/bin/env bash
# Refreshes the dashboard's vendored chart library from the npm registry: `npm ci` installs
# exactly what package-lock.json pins, then its dist files are copied into vendor/ (committed
# and embedded in the binary, so Cargo builds need no node). `vendor.sh --check` copies
# nothing and fails when a committed file differs from the lockfile's (CI runs it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

files=(
    "node_modules/uplot/dist/uPlot.iife.min.js:vendor/uPlot.iife.min.js"
    "node_modules/uplot/dist/uPlot.min.css:vendor/uPlot.min.css"
    "node_modules/uplot/LICENSE:vendor/uPlot.LICENSE"
)

npm ci --ignore-scripts --no-audit --no-fund >/dev/null

status=0
for pair in "${files[@]}"; do
    src=${pair%%:*}
    dst=${pair#*:}
    if [ "${1:-}" = "--check" ]; then
        if ! cmp -s "$src" "$dst"; then
            echo "vendor.sh: $dst differs from $src (run crates/stratus-server/dashboard/vendor.sh)" >&2
            status=1
        fi
    else
        cp "$src" "$dst"
    fi
done
[ "${1:-}" = "--check" ] && [ "$status" -eq 0 ] && echo "vendor.sh: vendor/ matches package-lock.json"
exit "$status"

#!/usr/bin/env bash
# Creates .venv with the pinned Python tools, once: re-runs are a no-op until the requirement files
# change. Safe to run concurrently with itself only once (make serialises it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt requirements-data.txt scripts/venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "==> installing Python tools into $VENV (first run downloads torch, ~5 GB)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -r requirements.txt
"$VENV/bin/pip" install -q --no-deps -r requirements-data.txt
echo "$want" > "$stamp"

#!/usr/bin/env bash
# make demo: embed the sample photos (every supported format) with `clip-worker embed`.
# Uses $CLIP_WEIGHTS_DIR when set (a real openai/clip-vit-base-patch32 checkout in the Hugging Face
# layout); otherwise the random-weight ViT-B/32 the fixtures generate, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
FIXTURES=${CLIP_FIXTURES:-target/fixtures}
WEIGHTS=${CLIP_WEIGHTS_DIR:-}
if [ -z "$WEIGHTS" ]; then
  WEIGHTS="$FIXTURES/models/vit-b-32"
  cat >&2 <<'BANNER'
################################################################################
#  DEMO WITH RANDOM WEIGHTS: no model hub is reachable, so this runs a          #
#  ViT-B/32-shaped CLIP with random weights generated locally. The pipeline is  #
#  real; the vectors and keywords are meaningless. For real embeddings:         #
#      CLIP_WEIGHTS_DIR=/path/to/clip-vit-base-patch32 make demo                #
################################################################################
BANNER
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$(date +%s.%N)
status=0
./target/release/clip-worker embed --weights "$WEIGHTS" --labels --top-k 3 \
  --text "a photo of a cat" "$FIXTURES"/images/* > "$out" || status=$?
end=$(date +%s.%N)
"${VIRTUAL_ENV:-.venv}/bin/python" - "$out" "$start" "$end" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
images = [r for r in rows if "file" in r]
for r in rows:
    name = r.get("file", r.get("text", "")).rsplit("/", 1)[-1]
    if "error" in r:
        print(f"{name:30} ERROR {r['error']}")
    else:
        head = ", ".join(f"{v:+.3f}" for v in r["embedding"][:3])
        kw = ", ".join(r.get("keywords", []))
        print(f"{name:30} {r['model']} {r['dimensions']}-d [{head}, ...] {kw}")
secs = float(sys.argv[3]) - float(sys.argv[2])
ok = sum(1 for r in images if "error" not in r)
print(f"\n{ok}/{len(images)} images embedded in {secs:.1f}s (including model load) -> {ok / secs:.1f} images/s")
PY
exit $status

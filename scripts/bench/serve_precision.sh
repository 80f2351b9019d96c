#!/usr/bin/env bash
# `segctl serve` of one trained model exported at f32, bf16 and int8: requests/s and peak RSS
# of each at the same load, the servers alternating in ROUNDS rounds (a level's figure is the
# median round). Each precision is served from a repository of its own, every `serve.*` at its
# default.
#
# Usage (repo root):  CHECKPOINT=checkpoints/<run> CONFIG=configs/smoke.yaml scripts/bench/serve_precision.sh
# Environment (defaults in brackets):
#   CHECKPOINT   the run or checkpoint to export (required)
#   CONFIG       its configuration (the export gate scores its validation split)  [configs/smoke.yaml]
#   PRECISIONS   ["f32 bf16 int8"]
#   CONNECTIONS  ["1 8"]
#   DURATION     seconds per point [10]
#   ROUNDS       [3]
#   IMAGE        JPEG to POST [../shared/realpets/images/american_bulldog_100.jpg if it exists]
#   SEGCTL       [target/release/segctl]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
: "${CHECKPOINT:?set CHECKPOINT to the run to export}"
CONFIG="${CONFIG:-$REPO/configs/smoke.yaml}"
PRECISIONS="${PRECISIONS:-f32 bf16 int8}"
CONNECTIONS="${CONNECTIONS:-1 8}"
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
SEGCTL="${SEGCTL:-$REPO/target/release/segctl}"
IMAGE="${IMAGE:-$REPO/../shared/realpets/images/american_bulldog_100.jpg}"
[ -f "$IMAGE" ] || { echo "IMAGE $IMAGE not found" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 2; }
T="$(mktemp -d /tmp/segctl-serve-precision.XXXXXX)"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT

declare -A URL PID
port=18700
for p in $PRECISIONS; do
  "$SEGCTL" -q export --config "$CONFIG" --checkpoint "$CHECKPOINT" --name pets --precision "$p" \
    --repository "$T/repo-$p" --json > "$T/export-$p.json"
  python3 -c "import json,sys; r=json.load(open('$T/export-$p.json')); c=r.get('precision_check') or {}; print('$p export:', r['precision'], {k: c.get(k) for k in ('f32_miou','miou','miou_drop','mask_agreement','calibration_samples')})"
  port=$((port + 1))
  "$SEGCTL" -q serve --repository "$T/repo-$p" --host 127.0.0.1 --port "$port" --device cpu > "$T/serve-$p.log" 2>&1 &
  PID[$p]=$!
  PIDS+=("$!")
  URL[$p]="http://127.0.0.1:$port/v1/models/pets:segment"
  for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.5; done
  curl -sf -X POST -H 'Content-Type: image/jpeg' --data-binary "@$IMAGE" "${URL[$p]}" -o "$T/mask-$p.png"
  BODY_FILE="$IMAGE" wrk -t 2 -c 8 -d 3s -s "$HERE/post.lua" "${URL[$p]}" > /dev/null
done

for c in $CONNECTIONS; do
  declare -A RPS=()
  for r in $(seq 1 "$ROUNDS"); do
    for p in $PRECISIONS; do
      out="$(BODY_FILE="$IMAGE" wrk -t $(( c < 2 ? c : 2 )) -c "$c" -d "${DURATION}s" -s "$HERE/post.lua" "${URL[$p]}" | grep WRK_JSON | sed 's/WRK_JSON //')"
      rps="$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['requests_per_s'])" "$out")"
      RPS[$p]="${RPS[$p]:-} $rps"
      sleep 1
    done
  done
  for p in $PRECISIONS; do
    med="$(python3 -c "import statistics,sys; print(round(statistics.median(map(float, sys.argv[1].split())), 1))" "${RPS[$p]}")"
    rss="$(awk '/VmHWM/ {print int($2/1024)}' "/proc/${PID[$p]}/status")"
    echo "connections $c: $p ${med} req/s (rounds:${RPS[$p]}), peak RSS ${rss} MB"
  done
done
for p in $PRECISIONS; do
  cmp -s "$T/mask-f32.png" "$T/mask-$p.png" && same=identical || same=differs
  echo "$p mask of $(basename "$IMAGE") vs f32: $same"
done

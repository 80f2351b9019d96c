#!/usr/bin/env bash
# Serving throughput and latency: `segctl serve` vs Flask under gunicorn with onnxruntime (the
# stack a Python team deploys on CPU), and with PyTorch eager as a second row.
#
# Per request both servers decode a real-sized JPEG, resize it to 128x128 (bilinear),
# normalise, run the model, up-sample the logits bilinearly to the photo's size, take the
# argmax and answer the class-id mask as a PNG. wrk (Lua script post.lua) POSTs the JPEG at
# each concurrency level. All servers are up together (an idle one uses no CPU) and are
# loaded one at a time, alternating per level in ROUNDS rounds, so that the VM's drift over
# minutes hits every side alike; a level's figure is the round with the median req/s.
#
# Usage (repo root):  scripts/bench/serve_bench.sh
# Environment (defaults in brackets):
#   ARCH             smoke (configs/smoke.yaml) | unet | mobilenetv2_unet   [mobilenetv2_unet]
#   BACKENDS         Flask model runtimes, first = the main competitor  ["onnxruntime torch"]
#   DURATION         seconds per measured point and round            [10]
#   ROUNDS           rounds per level (servers alternate within each) [3]
#   CONCURRENCY      client connections to measure                   ["1 8 64"]
#   WARMUP           seconds of warm-up load per server              [5]
#   SOAK             seconds of the soak at 64 connections after the levels (0 = none)  [60]
#   FLASK_CONFIGS    gunicorn candidates "workers:threads:model_threads" ...; the one with the
#                    highest req/s at 8 connections over SELECT_DURATION seconds is measured
#                    ["2:1:1 1:2:1" = 2 sync workers x 1 torch thread | 1 gthread worker with
#                    2 request threads x 1 model thread], chosen per backend
#   SELECT_DURATION  seconds per Flask candidate                     [5]
#   IMAGE            JPEG to POST    [../shared/realpets/images/american_bulldog_100.jpg if it
#                    exists, else the largest image of a synthetic dataset]
#   SEGCTL           segctl binary                                   [target/release/segctl]
#   PYTHON           Python with torch, timm, onnx, onnxruntime, flask, gunicorn, pillow, numpy [python3]
#   WRK_TIMEOUT      wrk request timeout                             [30s]
#   OUT              JSON results        [scripts/bench/results/serve-$ARCH.json]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ARCH="${ARCH:-mobilenetv2_unet}"
BACKENDS="${BACKENDS:-onnxruntime torch}"
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
CONCURRENCY="${CONCURRENCY:-1 8 64}"
WARMUP="${WARMUP:-5}"
SOAK="${SOAK:-60}"
FLASK_CONFIGS="${FLASK_CONFIGS:-2:1:1 1:2:1}"
SELECT_DURATION="${SELECT_DURATION:-5}"
SEGCTL="${SEGCTL:-$REPO/target/release/segctl}"
PYTHON="${PYTHON:-python3}"
WRK_TIMEOUT="${WRK_TIMEOUT:-30s}"
OUT="${OUT:-$HERE/results/serve-$ARCH.json}"
HELPER="$PYTHON $HERE/serve_helper.py"

case "$ARCH" in
  smoke) SEGCTL_MODEL=(--config "$REPO/configs/smoke.yaml" --set model.arch=unet) ;;
  unet|mobilenetv2_unet) SEGCTL_MODEL=(--set model.arch="$ARCH" --set model.unet.depth=4 --set model.unet.base_width=32) ;;
  *) echo "ARCH must be smoke, unet or mobilenetv2_unet" >&2; exit 2 ;;
esac
[ -x "$SEGCTL" ] || { echo "$SEGCTL not found: build it with 'cargo build --release'" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 2; }
$PYTHON -c "import torch, timm, onnx, onnxruntime, flask, gunicorn, PIL, numpy" 2>/dev/null || {
  echo "$PYTHON lacks torch/timm/onnx/onnxruntime/flask/gunicorn/pillow/numpy: pip install -r scripts/bench/requirements.txt (or set PYTHON)" >&2; exit 2; }

T="$(mktemp -d /tmp/segctl-serve-bench.XXXXXX)"
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
RSS_PID=""
# Samples the resident memory of a process and its children (gunicorn's workers) every 0.2 s.
start_rss() {  # start_rss PID FILE
  ( while kill -0 "$1" 2>/dev/null; do
      ps -o rss= --pid "$1" --ppid "$1" 2>/dev/null | awk '{s+=$1} END {print s+0}' >>"$2"; sleep 0.2
    done ) &
  RSS_PID=$!
}
stop_rss() { if [ -n "$RSS_PID" ]; then kill "$RSS_PID" 2>/dev/null || true; wait "$RSS_PID" 2>/dev/null || true; RSS_PID=""; fi; }
ALL_PIDS=()
stop_all() { for pid in "${ALL_PIDS[@]}"; do SERVER_PID="$pid" stop_server; done; ALL_PIDS=(); }
cleanup() { stop_rss; stop_server; stop_all; rm -rf "$T"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "[serve_bench] $*" >&2; }

# --- the model repository (segctl side) and the photo ----------------------------------------
log "building a $ARCH model repository in $T (1 training step on 40 synthetic samples)"
"$SEGCTL" -q fetch-data --synthetic 40 --root "$T/data" >/dev/null
"$SEGCTL" -q train "${SEGCTL_MODEL[@]}" --set data.root="$T/data" --set model.encoder.weights=none \
  --set train.output_dir="$T/runs" --set train.run_name=bench --set train.epochs=1 \
  --set train.max_steps_per_epoch=1 --set train.batch_size=4 --set train.device=cpu >"$T/train.log" 2>&1 \
  || { cat "$T/train.log" >&2; exit 1; }
# The Flask side builds the same architecture in PyTorch: compare the parameter counts.
SEG_PARAMS="$(grep -o '([0-9]* parameters)' "$T/train.log" | head -1 | tr -dc 0-9 || true)"
PT_PARAMS="$(cd "$HERE" && $PYTHON -c "import torch_models as m; print(m.parameter_count(m.build_model('$ARCH')))")"
# The onnxruntime side runs the twin exported to ONNX once (every worker loads the same file).
(cd "$HERE" && $PYTHON -c "import torch, torch_models as m; torch.manual_seed(0); m.export_onnx(m.build_model('$ARCH'), '$T/model.onnx')") 2>"$T/onnx.log" \
  || { cat "$T/onnx.log" >&2; exit 1; }
if [ "$SEG_PARAMS" != "$PT_PARAMS" ]; then
  log "WARNING: segctl's $ARCH has ${SEG_PARAMS:-?} parameters, the PyTorch twin $PT_PARAMS: the servers do not run the same network"
else
  log "$ARCH: $PT_PARAMS parameters on both sides"
fi
"$SEGCTL" -q export --checkpoint "$T/runs/bench" --name pets --repository "$T/models" >"$T/export.log" 2>&1 \
  || { cat "$T/export.log" >&2; exit 1; }

if [ -z "${IMAGE:-}" ]; then
  if [ -f "$REPO/../shared/realpets/images/american_bulldog_100.jpg" ]; then
    IMAGE="$REPO/../shared/realpets/images/american_bulldog_100.jpg"
  else
    IMAGE="$($HELPER largest "$T/data/images")"
  fi
fi
IMAGE="$(cd "$(dirname "$IMAGE")" && pwd)/$(basename "$IMAGE")"
read -r IMG_W IMG_H < <($PYTHON -c "import sys; from PIL import Image; print(*Image.open(sys.argv[1]).size)" "$IMAGE")
log "image: $IMAGE (${IMG_W}x${IMG_H}, $(stat -c %s "$IMAGE") bytes)"

POINTS="$T/points.jsonl"
: >"$POINTS"

# run_wrk NAME CONNECTIONS SECONDS URL -> wrk output file path on stdout
run_wrk() {
  local name="$1" c="$2" d="$3" url="$4" threads out
  threads=$(( c < 2 ? c : 2 ))
  out="$T/wrk-$name-c$c-$RANDOM.txt"
  BODY_FILE="$IMAGE" wrk -t "$threads" -c "$c" -d "${d}s" --timeout "$WRK_TIMEOUT" --latency \
    -s "$HERE/post.lua" "$url" >"$out" 2>&1 || { cat "$out" >&2; exit 1; }
  # Requests still queued when wrk stopped are computed anyway: wait them out before the
  # next run, so that no run pays for the one before.
  $HELPER drain "$url" "$IMAGE" >"$out.drain"
  echo "$out"
}

# level NAME PID URL CONNECTIONS SECONDS FILE: one measured point with the server's peak RSS
level() {
  local name="$1" pid="$2" url="$3" c="$4" d="$5" file="$6" out
  : >"$T/rss-$name-$c"
  start_rss "$pid" "$T/rss-$name-$c"
  out="$(run_wrk "$name" "$c" "$d" "$url")"
  stop_rss
  $HELPER point "$file" "$name" "$c" "$out" "$T/rss-$name-$c" >/dev/null
}

# --- segctl serve -------------------------------------------------------------------------------
PORT="$($HELPER port)"
SEGCTL_CONFIG="segctl serve --device cpu (defaults)"
log "starting $SEGCTL_CONFIG on 127.0.0.1:$PORT"
"$SEGCTL" -q serve --repository "$T/models" --host 127.0.0.1 --port "$PORT" --device cpu \
  >"$T/segctl-serve.log" 2>&1 &
SERVER_PID=$!
$HELPER wait "http://127.0.0.1:$PORT/readyz" 120 || { cat "$T/segctl-serve.log" >&2; exit 1; }
SEGCTL_URL="http://127.0.0.1:$PORT/v1/models/pets:segment"
SEGCTL_CHECK="$($HELPER check "$SEGCTL_URL" "$IMAGE")" || { cat "$T/segctl-serve.log" >&2; exit 1; }
log "segctl answer: $SEGCTL_CHECK"
SEGCTL_PID="$SERVER_PID"
ALL_PIDS+=("$SEGCTL_PID")
SERVER_PID=""
NAMES=(segctl); URLS=("$SEGCTL_URL"); PIDS=("$SEGCTL_PID")

# --- Flask under gunicorn, per model runtime ----------------------------------------------------
start_flask() {  # start_flask BACKEND "workers:threads:model_threads" -> sets SERVER_PID, FLASK_URL
  local backend="$1" w th tt extra=()
  IFS=: read -r w th tt <<<"$2"
  if [ "$th" -gt 1 ]; then extra=(--worker-class gthread --threads "$th"); fi
  PORT="$($HELPER port)"
  ARCH="$ARCH" BACKEND="$backend" ONNX_PATH="$T/model.onnx" MODEL_THREADS="$tt" OMP_NUM_THREADS="$tt" \
    $PYTHON -m gunicorn --chdir "$HERE" \
    --bind "127.0.0.1:$PORT" --workers "$w" "${extra[@]}" --timeout 120 --backlog 2048 \
    --log-level warning flask_app:app >"$T/gunicorn.log" 2>&1 &
  SERVER_PID=$!
  $HELPER wait "http://127.0.0.1:$PORT/readyz" 180 || { cat "$T/gunicorn.log" >&2; exit 1; }
  sleep 2  # let every worker finish loading (each loads the model and runs a warm-up inference)
  FLASK_URL="http://127.0.0.1:$PORT/segment"
}
describe() {  # describe BACKEND SPEC
  local w th tt
  IFS=: read -r w th tt <<<"$2"
  if [ "$th" -gt 1 ]; then echo "$1, $w gthread worker(s) x $th threads, $tt model thread(s)";
  else echo "$1, $w sync worker(s), $tt model thread(s)"; fi
}

FLASK_META="{"
for backend in $BACKENDS; do
  set -- $FLASK_CONFIGS
  BEST="$1"
  SELECTION="[]"
  if [ "$#" -gt 1 ]; then
    BEST_RPS=0
    SELECTION="["
    for cfg in "$@"; do
      log "Flask candidate $(describe "$backend" "$cfg"): ${SELECT_DURATION}s at 8 connections (after ${WARMUP}s warm-up)"
      start_flask "$backend" "$cfg"
      run_wrk flask-select-warmup 8 "$WARMUP" "$FLASK_URL" >/dev/null
      out="$(run_wrk flask-select 8 "$SELECT_DURATION" "$FLASK_URL")"
      rps="$($HELPER rps "$out")"
      log "  -> $rps req/s"
      SELECTION+="{\"config\": \"$cfg\", \"description\": \"$(describe "$backend" "$cfg")\", \"requests_per_s_c8\": $rps},"
      stop_server
      if $PYTHON -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$rps" "$BEST_RPS"; then
        BEST="$cfg"; BEST_RPS="$rps"
      fi
    done
    SELECTION="${SELECTION%,}]"
  fi
  log "Flask: measuring $(describe "$backend" "$BEST")"
  start_flask "$backend" "$BEST"
  CHECK="$($HELPER check "$FLASK_URL" "$IMAGE")" || { cat "$T/gunicorn.log" >&2; exit 1; }
  log "Flask ($backend) answer: $CHECK"
  NAMES+=("flask-$backend"); URLS+=("$FLASK_URL"); PIDS+=("$SERVER_PID")
  ALL_PIDS+=("$SERVER_PID")
  SERVER_PID=""
  FLASK_META+="\"flask-$backend\": {\"config\": \"$(describe "$backend" "$BEST")\", \"spec\": \"$BEST\", \"selection\": $SELECTION, \"answer\": $CHECK},"
done
FLASK_META="${FLASK_META%,}}"

# --- the measurement: every server per level, alternating ------------------------------------
for i in "${!NAMES[@]}"; do
  log "${NAMES[$i]}: warm-up ${WARMUP}s at 8 connections"
  run_wrk "${NAMES[$i]}-warmup" 8 "$WARMUP" "${URLS[$i]}" >/dev/null
done
for c in $CONCURRENCY; do
  for r in $(seq 1 "$ROUNDS"); do
    for i in "${!NAMES[@]}"; do
      log "${NAMES[$i]}: ${DURATION}s at $c connection(s), round $r/$ROUNDS"
      level "${NAMES[$i]}" "${PIDS[$i]}" "${URLS[$i]}" "$c" "$DURATION" "$POINTS"
    done
  done
done
if [ "$SOAK" -gt 0 ]; then
  for i in "${!NAMES[@]}"; do
    log "${NAMES[$i]}: soak, ${SOAK}s at 64 connections"
    level "${NAMES[$i]}" "${PIDS[$i]}" "${URLS[$i]}" 64 "$SOAK" "$POINTS.soak"
  done
fi
stop_all

# --- report -----------------------------------------------------------------------------------------
META=$($PYTHON - "$IMAGE" "$IMG_W" "$IMG_H" "$DURATION" "$WARMUP" "$CONCURRENCY" "$SEGCTL_CONFIG" "$FLASK_META" \
  "$SEGCTL_CHECK" "$WRK_TIMEOUT" "$ROUNDS" <<'EOF'
import json, sys, importlib.metadata as md
a = sys.argv[1:]
v = {p: md.version(p) for p in ("torch", "timm", "onnx", "onnxruntime", "flask", "gunicorn", "pillow", "numpy")}
print(json.dumps({"image": a[0], "image_w": int(a[1]), "image_h": int(a[2]), "duration_s": float(a[3]),
                  "warmup_s": float(a[4]), "concurrency": [int(c) for c in a[5].split()],
                  "segctl_config": a[6], "competitors": json.loads(a[7]), "segctl_answer": json.loads(a[8]),
                  "wrk_timeout": a[9], "rounds": int(a[10]), "wrk_threads": "min(connections, 2)", "versions": v}))
EOF
)
$HELPER report "$POINTS" "$OUT" "$ARCH" "$META"

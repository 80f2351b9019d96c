#!/usr/bin/env bash
# End-to-end test of segctl's web page in headless Chromium (Debian's /usr/bin/chromium).
#
#   bash scripts/browser-test/run.sh            # against a real `segctl serve` ($SEGCTL)
#   MOCK=1 bash scripts/browser-test/run.sh     # against mock_server.py (no segctl needed)
#
# Env: SEGCTL (default target/release/segctl), MOCK=1, OUT_DIR (screenshots), TEST_PHOTO (photo
# to upload; default: one from the synthetic dataset, or one drawn by Chromium in MOCK mode),
# READY_TIMEOUT (seconds to wait for /readyz, default 180), CHROMIUM (default /usr/bin/chromium).
# Needs: node >= 20 + npm, Debian's chromium (apt-get install -y chromium); python3 for MOCK=1.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

SEGCTL="${SEGCTL:-target/release/segctl}"
MOCK="${MOCK:-0}"
READY_TIMEOUT="${READY_TIMEOUT:-180}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

log() { echo "browser-test: $*" >&2; }
fail() { log "$*"; exit 1; }

command -v node >/dev/null || fail "node not found (need Node.js >= 20)"
[ -x "$CHROMIUM" ] || fail "Chromium not found at $CHROMIUM: apt-get install -y chromium"

if [ "$MOCK" = "1" ]; then
  command -v python3 >/dev/null || fail "python3 not found (needed for MOCK=1)"
else
  [ -x "$SEGCTL" ] || fail "segctl binary not found at $SEGCTL (build it: cargo build --release, or set SEGCTL; MOCK=1 uses the mock)"
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/segctl-page.XXXXXX")"
server_pid=""
cleanup() {
  local rc=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -s "$tmp/server.log" ]; then
    log "server log (last 40 lines):"; tail -n 40 "$tmp/server.log" >&2 || true
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -d "$here/node_modules/playwright-core" ]; then
  log "npm ci (playwright-core only; no browser download)"
  (cd "$here" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) >&2
fi

port="$(node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
url="http://127.0.0.1:$port"

if [ "$MOCK" = "1" ]; then
  photo="${TEST_PHOTO:-}"
  if [ -z "$photo" ]; then
    photo="$tmp/photo.jpg"
    node "$here/make-photo.mjs" "$photo" 333 250 >&2
  fi
  log "starting mock server on $url"
  # The real interpreter, not a version-manager shim, so that $! is the server's own pid.
  py="$(python3 -c 'import sys; print(sys.executable)')"
  "$py" "$here/mock_server.py" --host 127.0.0.1 --port "$port" >"$tmp/server.log" 2>&1 &
  server_pid=$!
else
  log "building a tiny model repository with $SEGCTL"
  "$SEGCTL" fetch-data --synthetic 24 --root "$tmp/data" >&2
  "$SEGCTL" train --config configs/smoke.yaml --set data.root="$tmp/data" --set train.output_dir="$tmp/ckpt" \
    --set train.run_name=page --set train.epochs=1 --set train.max_steps_per_epoch=2 >&2
  "$SEGCTL" export --config configs/smoke.yaml --checkpoint "$tmp/ckpt/page" --name pets --repository "$tmp/models" >&2
  photo="${TEST_PHOTO:-$(find "$tmp/data/images" -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) | sort | head -n 1)}"
  [ -n "$photo" ] || fail "no JPEG found under $tmp/data/images"
  log "starting $SEGCTL serve on $url"
  "$SEGCTL" serve --repository "$tmp/models" --host 127.0.0.1 --port "$port" >"$tmp/server.log" 2>&1 &
  server_pid=$!
fi

log "waiting for $url/readyz (up to ${READY_TIMEOUT}s)"
deadline=$((SECONDS + READY_TIMEOUT))
until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url/readyz" 2>/dev/null || true)" = "200" ]; do
  kill -0 "$server_pid" 2>/dev/null || { server_pid=""; fail "server exited before it was ready"; }
  [ "$SECONDS" -lt "$deadline" ] || fail "server not ready after ${READY_TIMEOUT}s"
  sleep 0.25
done

SEGCTL_URL="$url" TEST_PHOTO="$photo" OUT_DIR="${OUT_DIR:-}" node "$here/page.test.mjs"

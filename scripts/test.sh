#!/usr/bin/env bash
# Runs every test of segctl:
#   1. the Rust suite (unit tests beside the code, end-to-end tests in tests/ driving the binary
#      over real files, archives and loopback HTTP);
#   2. Nginx as a reverse proxy in front of `segctl serve` (scripts/deploy-test/nginx-proxy.sh);
#   3. the upload page in headless Chromium (scripts/browser-test/run.sh).
# Steps 2 and 3 need Debian's nginx and chromium (and npm); without them they are skipped with a
# notice, unless REQUIRE_ALL=1 (as in CI), which makes a missing tool a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUIRE_ALL=${REQUIRE_ALL:-0}

echo "== cargo test"
cargo test --locked

# The end-to-end scripts use the binary cargo test just built (dependencies are optimized in
# every profile, so it is fast enough), instead of a second, release build.
SEGCTL=${SEGCTL:-$PWD/target/debug/segctl}
export SEGCTL

skip() {
    if [[ $REQUIRE_ALL == 1 ]]; then
        echo "missing tool for '$1' and REQUIRE_ALL=1" >&2
        exit 1
    fi
    echo "SKIPPED: $1 ($2)"
}

echo "== nginx reverse proxy in front of segctl serve"
if command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; then
    NO_INSTALL=1 bash scripts/deploy-test/nginx-proxy.sh
else
    skip "nginx proxy test" "install Debian's nginx, curl and gettext-base"
fi

echo "== upload page in headless Chromium"
if [[ -x /usr/bin/chromium ]] && command -v npm >/dev/null; then
    bash scripts/browser-test/run.sh
else
    skip "browser test" "install Debian's chromium and Node.js/npm"
fi

echo "== all tests passed"

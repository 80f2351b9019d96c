#!/usr/bin/env bash
# The main job, offline, end to end on synthetic data:
#   build → fetch-data --synthetic → validate → train → evaluate (CI gate) → export → predict.
# Everything lands in the repository's usual places: data/synthetic/, checkpoints/quickstart/,
# models/pets/<version>/, predictions/. Re-running continues where the last run stopped.
#
# Env: EPOCHS (default 12: a few minutes on 2 cores; configs/smoke.yaml's own 80 epochs reach
# the full quality), MIN_MIOU (the gate, default 0.6), SEGCTL (a prebuilt binary to use).
set -euo pipefail
cd "$(dirname "$0")/.."

EPOCHS=${EPOCHS:-12}
MIN_MIOU=${MIN_MIOU:-0.6}
CONFIG=configs/smoke.yaml
RUN=checkpoints/quickstart

if [[ -z ${SEGCTL:-} ]]; then
    echo "== building segctl (release)"
    cargo build --release --locked --quiet
    SEGCTL=target/release/segctl
fi
step() { echo; echo "== $*"; }

step "1/6 synthetic dataset (400 samples, seed 7) in data/synthetic"
"$SEGCTL" fetch-data --config "$CONFIG" --synthetic 400 --seed 7

step "2/6 validate the dataset"
mkdir -p "$RUN"
"$SEGCTL" validate --config "$CONFIG" --report "$RUN/validation.json"

step "3/6 train ($EPOCHS epochs) into $RUN"
if [[ -d $RUN/checkpoints ]]; then
    "$SEGCTL" train --config "$CONFIG" --set train.run_name=quickstart --epochs "$EPOCHS" --resume "$RUN"
else
    "$SEGCTL" train --config "$CONFIG" --set train.run_name=quickstart --epochs "$EPOCHS"
fi

step "4/6 evaluate on the test split (gate: mean IoU >= $MIN_MIOU)"
"$SEGCTL" evaluate --config "$CONFIG" --checkpoint "$RUN" --min-miou "$MIN_MIOU"
"$SEGCTL" -q evaluate --config "$CONFIG" --checkpoint "$RUN" --json > "$RUN/evaluation.json"

step "5/6 export to the model repository (models/pets/<next version>)"
"$SEGCTL" export --config "$CONFIG" --checkpoint "$RUN" --name pets --metrics "$RUN/evaluation.json"

step "6/6 predict on a few test photos into predictions/"
photos=$(head -n 4 data/synthetic/annotations/test.txt | awk '{print "data/synthetic/images/" $1 ".jpg"}')
# shellcheck disable=SC2086
# No model flag: predict uses what `serve` would answer with, the newest version in models/.
"$SEGCTL" predict --overlay --side-by-side $photos

echo
echo "done:"
echo "  training run      $RUN (metrics.jsonl, curves.png, checkpoints/)"
echo "  evaluation        $RUN/evaluation.json"
echo "  exported model    models/pets/$(ls models/pets | sort -n | tail -1)"
echo "  predictions       predictions/ (*_mask.png, *_color.png, *_overlay.png, *_side_by_side.png)"
echo "  serve it with     $SEGCTL serve --port 8080   (models/ by default; then open http://127.0.0.1:8080/)"
echo "  predict a photo   $SEGCTL predict photo.jpg   (the newest version in models/; masks into predictions/)"

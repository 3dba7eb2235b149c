#!/usr/bin/env bash
# Retrain the bundled default model and recalibrate its slide rule (see docs/default-model.md).
#   bash scripts/train_default_model.sh [PCAM_DIR] [OUT_DIR]
# PCam: train split to fit, valid split for every choice (best epoch, patch threshold, slide rule).
# About 1-2 h on 2 CPU cores; pass --threads to `train` on a shared machine.
set -euo pipefail
PCAM="${1:-../shared/data/patches/pcam}"
OUT="${2:-wsi_screen/resources/models/default}"
WORK="${WORK:-runs/default-model}"

wsi-screen train "$PCAM" --arch resnet10t --epochs 40 --patience 12 --mpp 0.972 \
  --drop-rate 0.2 --hed-jitter 0.1 --color-jitter 0.15 --lr 2e-3 --batch-size 64 --seed 0 \
  --overwrite -o "$WORK/model"
wsi-screen evaluate "$PCAM" --model "$WORK/model" --split valid -o "$WORK/eval-valid"
python scripts/calibrate_slide_rule.py --model "$WORK/model" --work "$WORK/calibration"
mkdir -p "$OUT"
cp "$WORK/model/model.safetensors" "$WORK/model/config.json" "$WORK/model/slide_rule.json" \
   "$WORK/model/history.csv" "$OUT/"
echo "default model written to $OUT"

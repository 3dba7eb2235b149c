#!/usr/bin/env bash
# Retrain the bundled default model and recalibrate its slide rule (see docs/default-model.md).
#   bash scripts/train_default_model.sh [PCAM_DIR] [OUT_DIR]
# PCam: train split to fit, valid split for every choice (best epoch, patch threshold, slide rule).
# About 50 min on 2 CPU cores (80 s per epoch).
set -euo pipefail
PCAM="${1:-../shared/data/patches/pcam}"
OUT="${2:-wsi_screen/resources/models/default}"
WORK="${WORK:-runs/default-model}"

# --seed 1 --threads 1: two runs gave the same per-epoch metrics (torch rounds differently with other thread counts)
wsi-screen train "$PCAM" --arch resnet10t --epochs 36 --patience 14 --mpp 0.972 \
  --drop-rate 0.2 --hed-jitter 0.05 --color-jitter 0.1 --lr 1e-3 --schedule onecycle --batch-size 64 \
  --seed 1 --threads 1 --overwrite -o "$WORK/model"
wsi-screen evaluate "$PCAM" --model "$WORK/model" --split valid -o "$WORK/eval-valid"
python scripts/calibrate_slide_rule.py --model "$WORK/model" --work "$WORK/calibration"
mkdir -p "$OUT"
cp "$WORK/model/model.safetensors" "$WORK/model/config.json" "$WORK/model/slide_rule.json" \
   "$WORK/model/history.csv" "$OUT/"
echo "default model written to $OUT"

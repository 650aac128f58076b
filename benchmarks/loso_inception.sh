#!/usr/bin/env bash
# Issue #11, item 4 (docs/results/generalisation.md, "Session 7"): the recommended recipe with InceptionV3
# (offline ImageNet weights, 224 or 299 px) in place of EfficientNet-Lite0, on the two-pair yardstick, and
# the ensemble of the two backbones (probabilities averaged). CPU, 2 cores: about 12 minutes per fold at
# 224 px, 22 at 299 px (measured in session 7).
#   bash benchmarks/loso_inception.sh [runs/exp] [224|299]
. "$(dirname "$0")/loso_common.sh"
size=${2:-224}
covidscan loso --config configs/xray_recommended.yaml --set model.backbone=inception_v3 --set data.image_size=$size \
  --data $X --sources $F --out "$out/rec_incv3_$size" --quiet --resume
python benchmarks/loso_ensemble.py "$out/rec_incv3_$size" > "$out/rec_incv3_$size/summary.md" 2>&1
python benchmarks/loso_ensemble.py "$out/rec_pbn" "$out/rec_incv3_$size" > "$out/rec_incv3_$size/summary_ens_lite0.md" 2>&1

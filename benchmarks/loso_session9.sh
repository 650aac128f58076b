#!/usr/bin/env bash
# Issue #11, session 9 (docs/results/generalisation.md, "Session 9"): the recommended recipe trained on
# adult films only (`data.exclude=kermany` drops the pediatric Kermany normals and pneumonias), 5 epochs so
# that it draws as many training images as the default's 3 epochs on the full data, three seeds, on the
# two-pair yardstick; then the per-projection NIH table, the shipped-threshold table and the ensembles with
# the default's seeds (needs rec_pbn, rec_pbn_seed1, rec_pbn_seed2 from loso_session6.sh).
# Then the default recipe with a fourth epoch (three seeds; the first three epochs are the default's own).
# CPU: about 12 minutes per seed on 2 cores (adult-only), 15 (4 epochs).
. "$(dirname "$0")/loso_common.sh"
for s in 0 1 2; do
  covidscan loso --config configs/xray_recommended.yaml --set data.exclude=kermany --set train.epochs=5 \
    --set train.seed=$s --data $X --sources $F --out "$out/rec_adult_seed$s" --quiet --resume
done
for s in 0 1 2; do
  covidscan loso --config configs/xray_recommended.yaml --set train.epochs=4 --set train.seed=$s --data $X --sources $F \
    --out "$out/rec_e4_seed$s" --quiet --resume
done
for m in rec_e4_seed0 rec_e4_seed1 rec_e4_seed2 "rec_e4_seed0 rec_e4_seed1 rec_e4_seed2" rec_adult_seed0 rec_adult_seed1 rec_adult_seed2 "rec_adult_seed0 rec_adult_seed1 rec_adult_seed2" \
  "rec_pbn rec_adult_seed0" "rec_pbn_seed1 rec_adult_seed1" "rec_pbn_seed2 rec_adult_seed2"; do
  echo "\$ python benchmarks/loso_ensemble.py $m --by view"
  python benchmarks/loso_ensemble.py $(printf "$out/%s " $m) --by view --data $X
  python benchmarks/loso_val_threshold.py $(printf "$out/%s " $m)
done > "$out/session9.md" 2>&1

#!/usr/bin/env bash
# Issue #11, session 7 (docs/results/generalisation.md, "Session 7"): InceptionV3 with the recommended
# recipe at 224 and 299 px, its ensembles with the EfficientNet-Lite0 seeds, a seed ensemble of the
# recommended recipe at 2 epochs per member (one that fits the 10-minute main-job budget), and the
# issue's plain InceptionV3 reference fine-tune, all on the two-pair yardstick. Needs the session-6
# runs rec_pbn, rec_pbn_seed1, rec_pbn_seed2 (benchmarks/loso_session6.sh and its seed commands).
# Last, one mixed-size ensemble checkpoint (InceptionV3 299 + EfficientNet-Lite0 224, held-out fold 0)
# scored by `covidscan evaluate`, against the average of the members' own predictions; and the seed
# ensemble of the recommended recipe trained and timed as a main job, then scored on its test split.
# CPU: about 24 + 45 + 2 x 8 + 25 + 5 + 11 minutes on 2 cores.
. "$(dirname "$0")/loso_common.sh"
bash benchmarks/loso_inception.sh "$out" 224
bash benchmarks/loso_inception.sh "$out" 299
for s in 0 1; do
  covidscan loso --config configs/xray_recommended.yaml --set train.epochs=2 --set train.seed=$s --data $X --sources $F \
    --out "$out/rec_e2_seed$s" --quiet --resume
done
python benchmarks/loso_ensemble.py "$out/rec_e2_seed0" "$out/rec_e2_seed1" > "$out/rec_e2_seed1/summary_seed_ens.md" 2>&1
# the issue's reference: a plain 4-epoch fine-tune of InceptionV3 (224 px, Adam 1e-4, batch 32, affine + flip)
covidscan loso --config configs/xray_inception_finetune.yaml --data $X --sources $F \
  --out "$out/incv3_plain" --quiet --resume
for m in "rec_pbn rec_pbn_seed1" "rec_pbn rec_pbn_seed2" "rec_pbn_seed1 rec_pbn_seed2" "rec_pbn rec_pbn_seed1 rec_pbn_seed2" \
  "rec_incv3_224 rec_incv3_299" "rec_pbn rec_pbn_seed1 rec_incv3_224" "rec_pbn rec_incv3_224 rec_incv3_299" "rec_pbn rec_incv3_224" "rec_pbn_seed1 rec_incv3_224" "rec_pbn_seed2 rec_incv3_224" \
  "rec_pbn rec_incv3_299" "rec_pbn_seed1 rec_incv3_299" "rec_pbn_seed2 rec_incv3_299" "incv3_plain" \
  "rec_pbn incv3_plain" "rec_pbn_seed1 incv3_plain" "rec_pbn_seed2 incv3_plain"; do
  echo "\$ python benchmarks/loso_ensemble.py $m"; python benchmarks/loso_ensemble.py $(printf "$out/%s " $m)
done > "$out/session7_ensembles.md" 2>&1
covidscan ensemble "$out/rec_incv3_299/fold00/best.pt" "$out/rec_pbn/fold00/best.pt" --out "$out/mixed_fold00.pt"
covidscan evaluate --checkpoint "$out/mixed_fold00.pt" --split "$out/rec_pbn/fold00/split.csv" --subset test \
  --out "$out/mixed_fold00_eval" --bootstrap 200 --quiet
rm -rf "$out/main_seeds3"
/usr/bin/time -v covidscan train-ensemble --config configs/xray_recommended.yaml --seeds 0 1 --data $X --out "$out/main_seeds3" --quiet \
  > "$out/main_seeds3.log" 2>&1
covidscan evaluate --checkpoint "$out/main_seeds3/ensemble.pt" --out "$out/main_seeds3/eval" --quiet >> "$out/main_seeds3.log" 2>&1

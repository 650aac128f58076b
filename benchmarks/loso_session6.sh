#!/usr/bin/env bash
# Issue #11, session 6 (docs/results/generalisation.md, "Session 6"): the source-cue breaker bundle
# (configs/xray_recommended.yaml) checked from the other sides before it became the README default:
# the five-collection leave-one-out table, the main job itself (wall time, grouped test split), and
# each breaker taken out of the bundle in turn on the two-pair yardstick.
# CPU: about 35 + 8 + 5 x 13 minutes on 2 cores.
. "$(dirname "$0")/loso_common.sh"
covidscan loso --config configs/xray_recommended.yaml --data ../shared/data/xray ../shared/data/xray-extra --out "$out/rec_pbn_5fold" --quiet --resume
python benchmarks/loso_ensemble.py "$out/rec_pbn_5fold" > "$out/rec_pbn_5fold/summary.md" 2>&1
python benchmarks/loso_ensemble.py "$out/frozen_5fold" "$out/rec_pbn_5fold" > "$out/rec_pbn_5fold/summary_frozen_ens.md" 2>&1
# the main job (README quick start), timed from a cold start of the process
rm -rf "$out/main_job"
/usr/bin/time -v covidscan train --config configs/xray_recommended.yaml --data $X --out "$out/main_job" > "$out/main_job.log" 2>&1
covidscan evaluate --checkpoint "$out/main_job/best.pt" --out "$out/main_job/eval" --grid 16 >> "$out/main_job.log" 2>&1
# each source-cue breaker taken out of the bundle
for k in crop_scale gamma blur jpeg noise; do
  covidscan loso --config configs/xray_recommended.yaml --set augment.$k=0 --data $X --sources $F --out "$out/rec_no_$k" --quiet --resume
  python benchmarks/loso_ensemble.py "$out/rec_no_$k" > "$out/rec_no_$k/summary.md" 2>&1
done

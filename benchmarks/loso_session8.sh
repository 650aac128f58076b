#!/usr/bin/env bash
# Issue #11, session 8 (docs/results/generalisation.md, "Session 8"): why the NIH normals fail at a
# threshold fixed elsewhere, and five changes to the recommended recipe measured on the two-pair
# yardstick: histogram equalisation, stronger noise, mixup, a label x source x projection sampler, and
# weight averaging (three seeds). Needs the session-6/7 runs (rec_pbn, rec_pbn_seed1, rec_pbn_seed2,
# incv3_plain, ft_pbn, frozen) for the per-projection table.
# CPU: about 12 minutes per variant and seed on 2 cores (7 runs), 26 for the InceptionV3 seed.
. "$(dirname "$0")/loso_common.sh"
for v in "rec_eq data.equalize=true" "rec_noise6 augment.noise=6.0" "rec_mixup train.mixup=0.2" "rec_view train.strata=view"; do
  set -- $v
  covidscan loso --config configs/xray_recommended.yaml --set "$2" --data $X --sources $F --out "$out/$1" --quiet --resume
done
for s in 0 1 2; do
  covidscan loso --config configs/xray_recommended.yaml --set train.swa_start=2 --set train.seed=$s --data $X --sources $F \
    --out "$out/rec_swa_seed$s" --quiet --resume
done
# a second seed of the issue's reference recipe (plain InceptionV3 fine-tune; about 13 minutes per fold)
covidscan loso --config configs/xray_inception_finetune.yaml --set train.seed=1 --data $X --sources $F \
  --out "$out/incv3_plain_seed1" --quiet --resume
# per run: pooled AUROC, fixed-threshold specificity split by projection, and the threshold from the
# run's own validation split (what a model could ship with) applied to the held-out collections
for m in rec_pbn rec_pbn_seed1 rec_pbn_seed2 incv3_plain ft_pbn frozen rec_eq rec_noise6 rec_mixup rec_view \
  rec_swa_seed0 rec_swa_seed1 rec_swa_seed2 incv3_plain_seed1 "incv3_plain incv3_plain_seed1" "rec_pbn rec_pbn_seed1 rec_pbn_seed2" "rec_swa_seed0 rec_swa_seed1 rec_swa_seed2" "rec_pbn incv3_plain"; do
  echo "\$ python benchmarks/loso_ensemble.py $m --by view"
  python benchmarks/loso_ensemble.py $(printf "$out/%s " $m) --by view --data $X
  python benchmarks/loso_val_threshold.py $(printf "$out/%s " $m)
done > "$out/session8.md" 2>&1
# Grad-CAM of the four NIH normals the default (seed 0, NIH + Hannover held out) scores highest for COVID
mkdir -p "$out/nih_cam"
for f in nih_00003601_007 nih_00003882_007 nih_00001684_005 nih_00001650_000; do
  covidscan explain --checkpoint "$out/rec_pbn/fold00/best.pt" --class covid --out "$out/nih_cam/$f.png" \
    ../shared/data/xray-extra/normal/$f.jpg
done
python - "$out/nih_cam" <<'PY'
import sys
from pathlib import Path
from PIL import Image
ims = [Image.open(p) for p in sorted(Path(sys.argv[1]).glob("nih_*.png"))]
sheet = Image.new("RGB", (sum(i.width for i in ims), max(i.height for i in ims)), "white")
x = 0
for i in ims:
    sheet.paste(i, (x, 0))
    x += i.width
sheet = sheet.resize((sheet.width * 2 // 3, sheet.height * 2 // 3))
sheet.save("docs/results/nih_ap_gradcam.png", optimize=True)
PY

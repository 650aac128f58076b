#!/usr/bin/env bash
# Generalisation table (docs/results/generalisation.md): single-source vs multi-source, each option,
# judged by leave-one-source-out on ../shared/data. CPU, about 130 minutes on 2 cores.
#   bash benchmarks/loso_compare.sh runs/loso
set -euo pipefail
out=${1:-runs/loso}
X="../shared/data/xray ../shared/data/xray-extra"
C=configs/xray_generalise.yaml
mkdir -p "$out"
# single source: train on ../shared/data/xray only, test on every image of the other collections
covidscan train --config $C --data ../shared/data/xray --out "$out/single_source" --set train.sampler=plain --quiet
covidscan evaluate --checkpoint "$out/single_source/best.pt" --data ../shared/data/xray-extra \
  --out "$out/single_source/external" --bootstrap 500 --quiet > /dev/null
# multi-source, leave one source out: plain sampling, balanced sampling, + equalisation and border crop
covidscan loso --config $C --data $X --out "$out/multi_plain" --set train.sampler=plain --quiet > /dev/null
covidscan loso --config $C --data $X --out "$out/multi_balanced" --set train.sampler=balanced --quiet > /dev/null
covidscan loso --config $C --data $X --out "$out/multi_balanced_eq_crop" --set train.sampler=balanced \
  --set data.equalize=true --set data.crop=0.08 --quiet > /dev/null
covidscan loso --config $C --data $X --out "$out/multi_balanced_lung" --set train.sampler=balanced --set data.lung_crop=true --quiet > /dev/null
# fine-tuned end to end (about 30 minutes each on 2 cores): the paper's augmentation, then stronger
# geometric + intensity augmentation (the recipe's)
covidscan loso --config configs/xray_generalise_finetune.yaml --data $X --out "$out/multi_finetune_paperaug" \
  --set augment.rotation=10 --set augment.zoom=0.1 --set augment.brightness=0 --set augment.contrast=0 --quiet > /dev/null
covidscan loso --config configs/xray_generalise_finetune.yaml --data $X --out "$out/multi_finetune_strongaug" --quiet > /dev/null
covidscan loso --config configs/xray_generalise_finetune.yaml --data $X --out "$out/multi_finetune_strongaug_lung" \
  --set data.lung_crop=true --quiet > /dev/null
covidscan loso --config configs/ct_generalise.yaml --data ../shared/data/ct ../shared/data/ct-extra --out "$out/ct" --quiet > /dev/null
echo done

#!/usr/bin/env bash
# Generalisation II (docs/results/generalisation.md): each fold leaves one COVID collection and one adult
# non-COVID collection out together and trains on the rest of every shipped X-ray folder. CPU, about
# 5 minutes (frozen) and 15 minutes (each fine-tuned recipe) on 2 cores.
#   bash benchmarks/loso2.sh runs/exp && python benchmarks/loso_ensemble.py runs/exp/frozen runs/exp/ft_strong
set -euo pipefail
out=${1:-runs/exp}
X="../shared/data/xray ../shared/data/xray-extra ../shared/data/xray-lungs"
F="hannover+nih covid-cxnet+openist"
covidscan loso --config configs/xray_generalise.yaml --data $X --sources $F --out "$out/frozen" --quiet --resume
covidscan loso --config configs/xray_generalise_finetune.yaml --data $X --sources $F --out "$out/ft_pbn" --quiet --resume
covidscan loso --config configs/xray_generalise_finetune.yaml --set train.precise_bn=0 --data $X --sources $F --out "$out/ft_strong" --quiet --resume
covidscan loso --config configs/xray_recommended.yaml --data $X --sources $F --set train.precise_bn=0 --out "$out/rec" --quiet --resume
python benchmarks/site_adaptation.py "$out/frozen"
python benchmarks/site_adaptation.py "$out/ft_pbn"
python benchmarks/loso_ensemble.py "$out/frozen" "$out/ft_pbn"

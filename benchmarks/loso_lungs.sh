#!/usr/bin/env bash
# The learned lung crop / mask in the two-source leave-out folds (issue #11; docs/results/generalisation.md).
#   bash benchmarks/loso_lungs.sh   (CPU: about 25 minutes per fine-tuned recipe, 10 per frozen one)
set -u
cd "$(dirname "$0")/.." && . .venv/bin/activate
X="../shared/data/xray ../shared/data/xray-extra ../shared/data/xray-lungs"
F="hannover+nih covid-cxnet+openist"
date > runs/exp/log_lungs.txt
covidscan loso --config configs/xray_generalise_finetune.yaml --set data.lungs=crop --data $X --sources $F --out runs/exp/ft_pbn_lcrop --quiet --resume >> runs/exp/log_lungs.txt 2>&1; date >> runs/exp/log_lungs.txt
covidscan loso --config configs/xray_generalise.yaml --set data.lungs=crop --data $X --sources $F --out runs/exp/frozen_lcrop --quiet --resume >> runs/exp/log_lungs.txt 2>&1; date >> runs/exp/log_lungs.txt
python benchmarks/loso_ensemble.py runs/exp/frozen_lcrop runs/exp/ft_pbn_lcrop >> runs/exp/log_lungs.txt 2>&1
covidscan loso --config configs/xray_generalise_finetune.yaml --set data.lungs=mask --data $X --sources $F --out runs/exp/ft_pbn_lmask --quiet --resume >> runs/exp/log_lungs.txt 2>&1; date >> runs/exp/log_lungs.txt
echo done >> runs/exp/log_lungs.txt

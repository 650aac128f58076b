#!/usr/bin/env bash
# Issue #11, session 5 (docs/results/generalisation.md): the five-collection leave-one-out table of
# Generalisation I rerun with the fine-tuned + precise-BN recipe; the learned lung mask; the source-cue
# breakers as a bundle with precise BN. CPU: about 35 + 15 + 15 minutes on 2 cores.
. "$(dirname "$0")/loso_common.sh"
covidscan loso --config configs/xray_generalise_finetune.yaml --data ../shared/data/xray ../shared/data/xray-extra --out "$out/ft_pbn_5fold" --quiet --resume
covidscan loso --config configs/xray_generalise_finetune.yaml --set data.lungs=mask --data $X --sources $F --out "$out/ft_pbn_lmask" --quiet --resume
covidscan loso --config configs/xray_recommended.yaml --data $X --sources $F --out "$out/rec_pbn" --quiet --resume
for r in ft_pbn_lmask rec_pbn; do python benchmarks/loso_ensemble.py "$out/$r" > "$out/$r/summary.md" 2>&1; done

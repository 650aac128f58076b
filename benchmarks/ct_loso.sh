#!/usr/bin/env bash
# CT leave-one-source-out over three sources (issue #12): Soares et al. slices (../shared/data/ct, a screenshot-style
# PNG set), ieee8023 CT figures (ct-extra) and the COVID-CT-MD series (ct-volumes: real DICOM from a Tehran hospital,
# windowed lung slices exported by `covidscan study-slices`: infected slices of the COVID patient, every lung slice
# of the CAP and normal patients). Then BatchNorm adaptation and a local threshold on each left-out source
# (benchmarks/site_adaptation.py).
#   bash benchmarks/ct_loso.sh            (CPU: about 10 minutes per recipe with the frozen-backbone fast path)
set -euo pipefail
cd "$(dirname "$0")/.." && . .venv/bin/activate
W=${W:-runs/ct_loso}
mkdir -p "$W"
[ -f "$W/ctmd/manifest.csv" ] || covidscan study-slices ../shared/data/ct-volumes --out "$W/ctmd" --source "COVID-CT-MD (Tehran)"
D="../shared/data/ct ../shared/data/ct-extra $W/ctmd"
covidscan loso --config configs/ct_generalise.yaml --data $D --out "$W/frozen" --quiet --resume
covidscan loso --config configs/ct_generalise.yaml --set data.equalize=true --data $D --out "$W/frozen_eq" --quiet --resume
for v in frozen frozen_eq; do python benchmarks/site_adaptation.py "$W/$v" > "$W/$v/site.md" 2> "$W/$v/site.err" || true; done

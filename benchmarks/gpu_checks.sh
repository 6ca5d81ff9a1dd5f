#!/usr/bin/env bash
# Every GPU check of the project in one prepared run (165 s on an H200, measured 2026-11-26; the
# optional compiled ViT-L/14 run comes last, so a 10-minute limit cuts only it):
#   1. the CUDA tests (pytest -m gpu: bf16 training, merged eval = dense export, quickstart on CUDA, MFU);
#   2. mergevid bench head (MoTE vs plain train step, merged vs plain eval; B/16 and L/14 head shapes);
#   3. mergevid bench train for ViT-B/16 and ViT-L/14 at 8 frames (clips/s, MFU, MoTE/baseline),
#      then ViT-L/14 again with torch.compile of the visual tower.
# Results land in $OUT (default ./gpu_out): gpu.txt, pytest_gpu.log, bench_*.json, log.txt.
# With the device tool:  benchmarks/fetch_gpu_wheels.sh  (here), then
#   run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=590)
# and copy the numbers into docs/benchmarks.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PY=${PY:-python3}
STEPS=${STEPS:-10}
BATCHES=${BATCHES:-"18 12"}  # per-device batch to try, largest first (18: the recipes' 144 over 8 GPUs)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__, torch.cuda.get_device_name())"

echo "== pytest -m gpu"
timeout 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
echo "pytest exit status ${PIPESTATUS[0]}"

echo "== bench head"
timeout 120 $PY -m mergekit_video bench head --steps $((3 * STEPS)) --output "$OUT/bench_head.json"

# the recipes' total batch is 144 over 8 GPUs (18 per GPU); fall back to a smaller one when it
# does not fit in memory
for spec in "b16 recipes/mote_vitb16.yaml" "l14 recipes/mote_vitl14.yaml"; do
  set -- $spec
  for bs in $BATCHES; do
    echo "== bench train $1 batch $bs"
    if timeout 200 $PY -m mergekit_video bench train "$2" --batch-size "$bs" --steps "$STEPS" --warmup 3 --output "$OUT/bench_train_$1.json"; then
      break
    fi
  done
done
# last (the longest, and optional when time runs out): ViT-L/14 with torch.compile of the visual tower
bs=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['batch_size'])" "$OUT/bench_train_l14.json" 2>/dev/null || echo 18)
echo "== bench train l14 batch $bs, torch.compile"
timeout 300 $PY -m mergekit_video bench train recipes/mote_vitl14.yaml train.compile=true --batch-size "$bs" --steps "$STEPS" --warmup 3 --no-baseline --output "$OUT/bench_train_l14_compiled.json"
ls -l "$OUT"
exec >&- 2>&-  # let tee write the end of log.txt before the results are collected
wait "$TEE_PID"

#!/usr/bin/env bash
# The GPU check of the performance issue, as one short script: training/benchmark.py at the paper's
# backbone shape (ViT-L/14, 224 px) in bf16 on one GPU, a few minutes on an H200.
#
#   make gpu-wheels                 # here, with the package registry: .whl/ (what the GPU image lacks)
#   bash training/bench_gpu.sh      # there, with .whl/ carried; results in $OUT (default ./bench_out)
#
# Two invocations, so that a failure in the whole-epoch part (train.py needs `datasets`) cannot lose
# the model figures. The metrics benchmark runs on the CPU and is measured on the CPU machine instead.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# cnc-hf is not installed there: lay the repository out under its installed names (cnc_hf,
# cnc_hf.modeling, cnc_hf.model_cards, cnc_hf_train) with symbolic links, as pyproject.toml maps them.
layout="${TMPDIR:-/tmp}/cnc_hf_layout"
rm -rf "$layout" && mkdir -p "$layout/cnc_hf"
for entry in "$PWD"/cnc_hf/*; do ln -s "$entry" "$layout/cnc_hf/"; done
ln -s "$PWD/modeling" "$layout/cnc_hf/modeling"
ln -s "$PWD/model_cards" "$layout/cnc_hf/model_cards"
ln -s "$PWD/training" "$layout/cnc_hf_train"
export PYTHONPATH="$layout${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-bench_out}"
# Overridable for a dry run on a CPU machine: SHAPE=tiny DEVICE=cpu DTYPE=float32 EXTRA="--image_size 64" bash ...
shape="${SHAPE:-vit-l-14}" device="${DEVICE:-cuda}" dtype="${DTYPE:-bfloat16}" extra="${EXTRA:-}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$out/gpu.txt"; cat "$out/gpu.txt"
status=0
python3 -m cnc_hf_train.benchmark --shape "$shape" --device "$device" --dtype "$dtype" --repeats 5 --skip epochs metrics \
    $extra --output "$out/benchmark_${device}_${shape}_${dtype}.json" 2>&1 | tee "$out/benchmark.log" || status=1
python3 -m cnc_hf_train.benchmark --shape "$shape" --device "$device" --dtype "$dtype" --skip inference pipeline training metrics \
    --epoch_images 48 $extra --output "$out/benchmark_${device}_${shape}_${dtype}_epochs.json" 2>&1 | tee "$out/epochs.log" || status=1
exit $status

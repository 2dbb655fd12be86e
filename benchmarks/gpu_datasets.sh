#!/bin/bash
# Issue 8's accelerator measurements: steps per second of the SVHN and CIFAR-10 paper
# presets (generator and student steps at batch 512, float32 and bfloat16), with freshly
# initialised networks, so neither a dataset nor a teacher is needed.
#   bash benchmarks/gpu_datasets.sh OUTDIR
# Writes OUTDIR/{env.txt, steps.jsonl, steps.log}. The smoke presets end to end need tfds
# (not on the lent GPU image); they run on CPU in tests/test_datasets.py.
out=$1
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import sys, jax, flax; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__); print(jax.devices())'
} > "$out/env.txt" 2>&1
for config in svhn cifar10; do
  for dtype in float32 bfloat16; do
    python3 -m benchmarks.steps --config=configs/$config.py --batch=512 --repeats=20 \
        --warmup=3 --config.dtype=$dtype --config.parallel=none
  done
done > "$out/steps.jsonl" 2> "$out/steps.log"
cat "$out/env.txt" "$out/steps.jsonl"
tail -3 "$out/steps.log"

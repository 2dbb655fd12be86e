#!/bin/bash
# The accelerator measurements of benchmarks/README.md, in one go (about 5 minutes on one
# H100/H200). Needs a trained teacher's variables for the generator stage.
#   bash benchmarks/gpu_run.sh OUTDIR TEACHER_VARIABLES_DIR
# Writes OUTDIR/{env.txt, steps.jsonl, generator_stage.jsonl, generator_stage_*.log,
# samples_*.png}. Each part runs even if an earlier one failed.
out=$1
teacher=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import sys, jax, flax, optax, orbax.checkpoint as o, torch; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, "torch", torch.__version__); print(jax.devices())'
} > "$out/env.txt" 2>&1

# Steps at the paper batch (512), and at 4096 where a GPU is far from full at 512.
for run in 512,float32,pmap 512,float32,none 512,bfloat16,pmap 4096,float32,pmap \
           4096,bfloat16,pmap; do
  IFS=, read -r batch dtype par <<< "$run"
  python3 -m benchmarks.steps --config=configs/mnist.py --batch=$batch --repeats=50 \
      --warmup=5 --config.dtype=$dtype --config.parallel=$par
done > "$out/steps.jsonl" 2> "$out/steps.log"
for batch in 512 4096; do
  python3 -m benchmarks.torch_steps --device=cuda --batch=$batch --repeats=50 --warmup=5
done >> "$out/steps.jsonl" 2>> "$out/steps.log"

# The paper preset's generator stage (2400 steps at batch 512), end to end, both dtypes.
for dtype in float32 bfloat16; do
  python3 -m benchmarks.generator_stage --config=configs/mnist.py --config.dtype=$dtype \
      --config.teacher.checkpoint="$teacher" --workdir="/tmp/generator_stage_$dtype" \
      2> "$out/generator_stage_$dtype.log"
  cp "/tmp/generator_stage_$dtype/samples.png" "$out/samples_$dtype.png"
done > "$out/generator_stage.jsonl"
cat "$out/env.txt" "$out/steps.jsonl" "$out/generator_stage.jsonl"
tail -3 "$out/steps.log"

#!/bin/bash
# Both frameworks' train steps, one after the other on the same machine, and the speedup.
#   bash benchmarks/cpu_vs_torch.sh [BATCH] [REPEATS]     (needs `pip install torch`)
# Prints the JSON lines of benchmarks.steps and benchmarks.torch_steps, then one line per
# step: {"step", "jax_median_seconds", "torch_median_seconds", "speedup"}.
set -eo pipefail
batch=${1:-512}
repeats=${2:-5}
export TF_CPP_MIN_LOG_LEVEL=2
lines=$( (python -m benchmarks.steps --config=configs/mnist.py --batch="$batch" \
            --repeats="$repeats" 2>/dev/null
          python -m benchmarks.torch_steps --batch="$batch" --repeats="$repeats") )
echo "$lines"
echo "$lines" | python -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin if line.strip()]
for step in ("generator", "student"):
  jax_s, torch_s = (next(r["median_seconds"] for r in rows
                         if r["step"] == step and r["framework"] == f) for f in ("jax", "torch"))
  print(json.dumps({"step": step, "jax_median_seconds": round(jax_s, 4),
                    "torch_median_seconds": round(torch_s, 4),
                    "speedup": round(torch_s / jax_s, 2)}))'

#!/bin/bash
# Vmapped sweep against the same runs one by one (README, "Sweep speed"): 3 seeds of the
# MNIST cpu preset, shortened to 40 generator and 300 student steps, sharing the teacher
# at $1 (a teacher_variables directory). Prints both sweeps' seconds as JSON.
#   bash benchmarks/sweep_speed.sh TEACHER_VARIABLES_DIR [OUTDIR]
teacher=$1
out=${2:-/tmp/sweep_speed}
rm -rf "$out" && mkdir -p "$out"
for mode in vmap novmap; do
  python -m rdskd_jax.sweep --config=configs/mnist.py:cpu --config.teacher.checkpoint="$teacher" \
      --config.generator.steps=40 --config.student.steps=300 --config.student.eval_every=0 \
      --seeds=3 --$mode --workdir="$out/$mode" > "$out/$mode.md" 2> "$out/$mode.log"
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({'mode': sys.argv[2], 'seconds': r['seconds'], 'accuracies': [x['test_accuracy'] for x in r['runs']]}))" \
      "$out/$mode/sweep.json" $mode
done

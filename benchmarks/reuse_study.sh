#!/bin/bash
# The bank's reuse study on MNIST's cpu preset (docs/2026-12-04-sample-bank.md), one run at
# a time, each skipped when its report.json has a student result, so a stopped study
# resumes where it stopped:
#   bash benchmarks/reuse_study.sh W [PHASE...]
# One teacher (seed 0's run); per seed s in 0 1 2 a generator (the run at reuse 16) shared
# through generator.checkpoint by the students at reuse 1, 4, 16 and 64; the control, a
# one-step generator (seed 0, reuse 16); the bank's size at reuse 16 (seed 0: 4 and 64
# batches against the default 16); equal time (EQ_STEPS student steps, 10,000 by default,
# at reuse EQ_REUSE, 16 by default, on each seed's generator). Phases: main (reuse 4, 16,
# 64), reuse1, control, size, eqtime.
set -u
work=${1:?usage: bash benchmarks/reuse_study.sh W [PHASE...]}
shift
phases=${*:-main control reuse1}
mkdir -p "$work"
python=${PYTHON:-python}
config=configs/mnist.py:cpu
# The cpu preset's student as it was before it was re-based on this study (95a1389):
# 3,500 steps, accuracy every 500 (reporting only). The eqtime phase sets its own steps.
before=(--config.student.steps=3500 --config.student.eval_every=500)

done_run() { "$python" - "$1" <<'PY'
import json, sys
try:
  sys.exit(0 if 'test_accuracy' in json.load(open(sys.argv[1] + '/report.json'))['student'] else 1)
except Exception:
  sys.exit(1)
PY
}

run() {  # run NAME FLAGS...
  local name=$1
  shift
  done_run "$work/$name" && return 0
  echo "$(date -u +%FT%TZ) start $name" >> "$work/study.log"
  "$python" -m rdskd_jax.main --config=$config --workdir="$work/$name" "${base[@]}" "$@" \
      > "$work/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) end $name exit $?" >> "$work/study.log"
}

teacher="$work/s0_r16/teacher_variables"
for phase in $phases; do
  base=("${before[@]}")
  [ "$phase" = eqtime ] && base=()
  for seed in 0 1 2; do
    case $phase in
      main)
        if [ "$seed" = 0 ]; then
          run s0_r16 --config.seed=0 --config.student.reuse=16
        else
          run "s${seed}_r16" --config.seed="$seed" --config.student.reuse=16 \
              --config.teacher.checkpoint="$teacher"
        fi
        for reuse in 4 64; do
          run "s${seed}_r${reuse}" --config.seed="$seed" --config.student.reuse=$reuse \
              --config.teacher.checkpoint="$teacher" \
              --config.generator.checkpoint="$work/s${seed}_r16/generator_variables"
        done ;;
      reuse1)
        run "s${seed}_r1" --config.seed="$seed" --config.student.reuse=1 \
            --config.teacher.checkpoint="$teacher" \
            --config.generator.checkpoint="$work/s${seed}_r16/generator_variables" ;;
      control)
        [ "$seed" = 0 ] && run s0_r16_untrained --config.seed=0 --config.student.reuse=16 \
            --config.teacher.checkpoint="$teacher" --config.generator.steps=1 ;;
      eqtime)
        run "s${seed}_r${EQ_REUSE:-16}_steps${EQ_STEPS:-10000}" --config.seed="$seed" \
            --config.student.reuse="${EQ_REUSE:-16}" --config.student.steps="${EQ_STEPS:-10000}" \
            --config.student.eval_every=1000 \
            --config.teacher.checkpoint="$teacher" \
            --config.generator.checkpoint="$work/s${seed}_r16/generator_variables" ;;
      size)
        [ "$seed" = 0 ] && for batches in 4 64; do
          run "s0_r16_bank${batches}" --config.seed=0 --config.student.reuse=16 \
              --config.student.bank_size=$((batches * 256)) \
              --config.teacher.checkpoint="$teacher" \
              --config.generator.checkpoint="$work/s0_r16/generator_variables"
        done ;;
    esac
  done
done

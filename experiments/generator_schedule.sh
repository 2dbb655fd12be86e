#!/usr/bin/env bash
# The paper's generator schedule against the `cpu` preset's, from one teacher, with the same
# student budget (docs/2026-12-01-generator-schedule.md). Resumable: rerun the same command
# after an interruption and each run continues from its last checkpoint.
#
#   bash experiments/generator_schedule.sh [ROOT] [SEED]
#
# ROOT/cpu:    the README's first command (`cpu` preset: teacher, 120 x 256 generator steps,
#              3,500 x 256 student steps).
# ROOT/paper:  the same, with that run's teacher and the paper's generator schedule
#              (2,400 steps at batch 512, Adam 1e-3, epoch length 120).
# ROOT/middle: a schedule between them (600 steps at batch 256, epoch length 120), run only
#              when MIDDLE=1.
set -euo pipefail
root=${1:-runs/generator_schedule}
seed=${2:-0}
run() { python -m rdskd_jax.main --config=configs/mnist.py:cpu --config.seed="$seed" "$@"; }

run --workdir="$root/cpu_s$seed"
teacher="$root/cpu_s$seed/teacher_variables"
run --workdir="$root/paper_s$seed" --config.teacher.checkpoint="$teacher" \
  --config.generator.steps=2400 --config.generator.batch_size=512 \
  --config.generator.epoch_length=120
if [ "${MIDDLE:-0}" = 1 ]; then
  run --workdir="$root/middle_s$seed" --config.teacher.checkpoint="$teacher" \
    --config.generator.steps=600 --config.generator.epoch_length=120
fi

#!/usr/bin/env bash
# The robustness study of docs/2026-12-01-robustness-grid.md, run in parts.
#
#   bash experiments/robustness_grid.sh rdskd|dafl [extra sweep flags]
#
# A machine's workdirs do not outlive it, so the finished runs are kept in the repository:
# each call copies those of docs/data/robustness/METHOD/runs into the sweep's workdir
# (runs/robustness/METHOD), where the sweep takes them as finished (sweep.finished_report),
# resumes or starts the others, and on exit (finished, failed or stopped by SIGTERM)
# copies every run finished by then back: its config.json, report.json and metrics.jsonl.
# Every run distils the one teacher kept in docs/data/robustness/teacher_variables (the
# `cpu` preset's teacher, seed 0).
set -uo pipefail
cd "$(dirname "$0")/.."
method=${1:?usage: robustness_grid.sh rdskd|dafl [sweep flags]}
shift
keep=docs/data/robustness
work=runs/robustness/$method
case $method in
  rdskd) args=(--grid='generator.learning_rate=5e-4,1e-3,2e-3') ;;
  dafl)
    # Fixed by measurement before any DAFL run (the study's page, its amendment of
    # 2026-12-02): 960 x RDSKD's training seconds / those of 960 DAFL steps, on one machine.
    args=(--config.method=dafl --config.dafl.steps=1010
          --grid='dafl.generator_learning_rate=0.1,0.2,0.4|dafl.beta=2.5,10.0') ;;
  *) echo "error: method $method: expected rdskd or dafl" >&2; exit 2 ;;
esac

keep_finished() {
  for run in "$work"/runs/*/; do
    [ -f "$run/report.json" ] && grep -q '"timing"' "$run/report.json" || continue
    dest=$keep/$method/runs/$(basename "$run")
    mkdir -p "$dest"
    cp "$run"/config.json "$run"/report.json "$run"/metrics.jsonl "$dest"/
  done
}

mkdir -p "$work/runs"
if [ -d "$keep/$method/runs" ]; then
  cp -rn "$keep/$method/runs/." "$work/runs/"
fi
trap keep_finished EXIT
trap 'kill -TERM "$sweep" 2>/dev/null; wait "$sweep"' TERM INT
python -m rdskd_jax.sweep --config=configs/mnist.py:cpu \
  --config.teacher.checkpoint="$keep/teacher_variables" --workdir="$work" --seeds=3 \
  --novmap "${args[@]}" "$@" &
sweep=$!
wait "$sweep"

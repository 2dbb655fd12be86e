#!/bin/bash
# Settings of MNIST's `cpu` preset compared on a validation slice, never on the test split:
# the teacher trains on train[:50000] and every accuracy is measured on train[50000:]
# (config.test_split). One teacher for every run; each VARIANT is a name and its flags:
#   bash benchmarks/validation_study.sh W 'base:' \
#       'gen60:--config.generator.steps=60 --config.generator.epoch_length=20'
# In FLAGS, {seed} stands for the run's seed: 'lr2:--config.student.learning_rate=2e-3
# --config.generator.checkpoint=W/base_s{seed}/generator_variables' trains only students.
# SEEDS (default "0 1 2") per variant, JOBS runs at a time (default 2), STEPS student steps
# (default: the preset's), TEACHER_FLAGS flags of the teacher's run (another W per
# teacher). A run whose report.json has a student result is skipped, so a stopped study
# resumes. Prints, and writes to W/summary.md, a row per run and per variant.
set -u
work=${1:?usage: bash benchmarks/validation_study.sh W NAME:FLAGS...}
shift
mkdir -p "$work"
python=${PYTHON:-python}
validation=(--config=configs/mnist.py:cpu --config.teacher.max_train_examples=50000
            "--config.test_split=train[50000:]")
[ -n "${STEPS:-}" ] && validation+=(--config.student.steps="$STEPS")

finished() { "$python" -c 'import json, sys
sys.exit(0 if "test_accuracy" in json.load(open(sys.argv[1]))["student"] else 1)' \
    "$1/report.json" 2>/dev/null; }

# The teacher alone (one generator and one student step), then every run from it.
if ! finished "$work/teacher"; then
  "$python" -m rdskd_jax.main "${validation[@]}" --workdir="$work/teacher" \
      --config.generator.steps=1 --config.student.steps=1 ${TEACHER_FLAGS:-} \
      > "$work/teacher.log" 2>&1 ||
      { echo "teacher run failed: $work/teacher.log" >&2; exit 1; }
fi
for variant in "$@"; do
  for seed in ${SEEDS:-0 1 2}; do
    flags=${variant#*:}
    echo "${variant%%:*}_s$seed ${flags//\{seed\}/$seed} --config.seed=$seed"
  done
done | while read -r name flags; do
  finished "$work/$name" && continue
  echo "$name $flags"
done | xargs -P "${JOBS:-2}" -L 1 bash -c '
  name=$0
  echo "$(date -u +%FT%TZ) start $name" >> "'"$work"'/study.log"
  "'"$python"'" -m rdskd_jax.main '"${validation[*]@Q}"' --workdir="'"$work"'/$name" \
      --config.teacher.checkpoint="'"$work"'/teacher/teacher_variables" "$@" \
      > "'"$work"'/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) end $name exit $?" >> "'"$work"'/study.log"'

"$python" - "$work" <<'PY' | tee "$work/summary.md"
import collections, json, os, sys
work, rows = sys.argv[1], collections.defaultdict(list)
print('| run | validation accuracy | agreement on generated | intra-class diversity | student seconds |')
print('|---|---|---|---|---|')
for name in sorted(os.listdir(work)):
  try:
    r = json.load(open(os.path.join(work, name, 'report.json')))
    s = r['student']
    values = (s['test_accuracy'], s['generated_agreement'],
              r['diagnostics']['intra_class_diversity'], s['seconds'])
  except (OSError, KeyError, ValueError):
    continue
  if name != 'teacher':
    rows[name.rsplit('_s', 1)[0]].append(values)
  print(f'| {name} | {values[0]:.4f} | {values[1]:.4f} | {values[2]:.2f} | {values[3]:.0f} |')
for variant, values in rows.items():
  means = [sum(v[i] for v in values) / len(values) for i in range(4)]
  print(f'| {variant}, mean of {len(values)} | {means[0]:.4f} | {means[1]:.4f} | '
        f'{means[2]:.2f} | {means[3]:.0f} |')
PY

#!/bin/bash
# The paper's MNIST budget end to end on one accelerator, in one call of at most 9 minutes (8.5 of parts):
#   bash benchmarks/gpu_paper.sh OUT             # on the device
#   SMOKE=1 bash benchmarks/gpu_paper.sh OUT     # anywhere: the tiny preset, for the tests
# In order, each part running even if an earlier one failed (its exit status and seconds
# are in OUT/parts.jsonl), each stopped by SIGTERM at its limit (it checkpoints, and its
# metrics.jsonl says how far it got):
#   1. rdskd_f32:  the paper preset as the paper runs it (every student batch fresh,
#                  student.reuse=1), float32, one device; the student's test accuracy
#                  logged every 6,000 steps (reporting only). Trains the teacher.
#   2. rdskd_bank: the same student budget with the bank (student.reuse=$REUSE, 16 by
#                  default), on part 1's teacher and generator (generator.checkpoint).
#   3. cpu_generator: the same student budget (student.reuse=$REUSE) from the `cpu` preset's
#                  generator (120 steps at batch 256), on the teacher of part 1 or 2: which
#                  generator the paper's student budget favours.
#   4. dafl:       DAFL's paper preset (24,000 joint steps) on that teacher, in the time left.
# PARTS="rdskd_bank cpu_generator" (say) runs those parts alone, each training what it would
# have taken. LIMITS="250 230" (say) gives the parts of PARTS their seconds, in order.
# OUT gets env.txt, parts.jsonl and results.tar.gz (each part's report.json,
# metrics.jsonl, samples.png, curves.png and log), within the device tool's file limits.
# The environment needs JAX, Flax, Optax, Orbax, chex and ml_collections, and MNIST in
# TFDS_DATA_DIR: a tfds directory, or NumPy arrays where there is no TensorFlow (an
# accelerator image; benchmarks/gpu_carry.sh prepares both, and benchmarks/README.md
# gives the device call).
set -u
out=${1:?usage: bash benchmarks/gpu_paper.sh OUT}
mkdir -p "$out"
work=${WORK:-/tmp/gpu_paper}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
reuse=${REUSE:-16}
if [ -n "${SMOKE:-}" ]; then
  preset=':tiny'; eval_every=3; reuse=4; cpu_generator=(3 16 3)  # steps, batch, epoch
  declare -A limit_of=([rdskd_f32]=120 [rdskd_bank]=120 [cpu_generator]=120 [dafl]=120)
else
  preset=''; eval_every=6000; cpu_generator=(120 256 40)
  # Seconds: 8.5 minutes in all; cpu_generator only where LIMITS gives it some.
  declare -A limit_of=([rdskd_f32]=280 [rdskd_bank]=170 [cpu_generator]=0 [dafl]=60)
fi
python=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  "$python" -c 'import sys, jax, flax; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, jax.devices())'
  git rev-parse HEAD 2>/dev/null
} > "$out/env.txt" 2>&1

part() {  # part NAME LIMIT_SECONDS FLAGS...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$python" -m rdskd_jax.main \
      --config="configs/mnist.py$preset" --workdir="$work/$name" "$@" > "$work/$name.log" 2>&1
  local code=$?
  echo "{\"part\": \"$name\", \"exit\": $code, \"seconds\": $((SECONDS - start))}" >> "$out/parts.jsonl"
}

rm -rf "$work" && mkdir -p "$work"
: > "$out/parts.jsonl"
parts=(${PARTS:-rdskd_f32 rdskd_bank cpu_generator dafl})  # A subset reruns those alone.
limits=(${LIMITS:-})
for i in "${!parts[@]}"; do
  name=${parts[$i]}
  [ -n "${limit_of[$name]+set}" ] || {
    echo "unknown part $name; expected rdskd_f32, rdskd_bank, cpu_generator or dafl" >&2; exit 2; }
  limit=${limits[$i]:-${limit_of[$name]}}
  [ "$limit" -gt 0 ] || continue
  given=()  # A later part uses the first teacher an earlier part trained.
  for teacher in "$work"/{rdskd_f32,rdskd_bank}/teacher_variables; do
    [ -e "$teacher" ] && { given=(--config.teacher.checkpoint="$teacher"); break; }
  done
  case $name in
    rdskd_f32)
      part rdskd_f32 "$limit" --config.parallel=none --config.student.eval_every=$eval_every ;;
    rdskd_bank)  # On part 1's teacher and generator where it ran, else with its own.
      [ -e "$work/rdskd_f32/generator_variables/rdskd.json" ] &&
          given+=(--config.generator.checkpoint="$work/rdskd_f32/generator_variables")
      part rdskd_bank "$limit" --config.parallel=none \
          --config.student.eval_every=$eval_every --config.student.reuse="$reuse" "${given[@]}" ;;
    cpu_generator)
      part cpu_generator "$limit" --config.parallel=none \
          --config.student.eval_every=$eval_every --config.student.reuse="$reuse" \
          --config.generator.steps="${cpu_generator[0]}" \
          --config.generator.batch_size="${cpu_generator[1]}" \
          --config.generator.epoch_length="${cpu_generator[2]}" "${given[@]}" ;;
    dafl)
      part dafl "$limit" --config.parallel=none --config.method=dafl \
          --config.student.eval_every=$eval_every "${given[@]}" ;;
  esac
done

(cd "$work" && tar czf "$out/results.tar.gz" --ignore-failed-read \
    ./*.log ./*/report.json ./*/metrics.jsonl ./*/samples.png ./*/curves.png 2>/dev/null)
cat "$out/env.txt" "$out/parts.jsonl"

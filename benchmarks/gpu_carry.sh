#!/bin/bash
# Prepares .carry/ here (git-ignored): what benchmarks/gpu_paper.sh needs on an accelerator
# image that has JAX, Flax, Optax, Orbax, chex and tensorboard but no TensorFlow, tfds or
# ml_collections:
#   .carry/wheels/  ml_collections (pure Python; its needs absl-py and PyYAML are there)
#   .carry/data/    MNIST's train and test splits as NumPy arrays, which the input
#                   pipeline reads without tfds (python -m rdskd_jax.data --export)
# Then, on the device, with .carry carried (benchmarks/README.md has the whole call):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl
#   PYTHONPATH=/tmp/site TFDS_DATA_DIR=$PWD/.carry/data bash benchmarks/gpu_paper.sh $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
rm -rf .carry && mkdir -p .carry/wheels
"$python" -m pip download -q --no-deps --only-binary=:all: -d .carry/wheels 'ml_collections==1.1.0'
"$python" -m rdskd_jax.data mnist --export=.carry/data
du -sh .carry

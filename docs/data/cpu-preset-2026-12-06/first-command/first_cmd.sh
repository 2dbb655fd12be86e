#!/bin/bash
# The README's first command from a fresh clone of REPO, pip's cache off, no MNIST on the
# machine (move ~/tensorflow_datasets aside first); the wall time goes to TIMING.
#   bash first_cmd.sh REPO TIMING
set -u
repo=${1:?usage: bash first_cmd.sh REPO TIMING}
timing=${2:?usage: bash first_cmd.sh REPO TIMING}
rm -rf /tmp/fc && git clone -q "$repo" /tmp/fc && cd /tmp/fc
start=$(date +%s); started=$(date -u +%FT%TZ)
export PIP_NO_CACHE_DIR=1
python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m rdskd_jax.main --config=configs/mnist.py:cpu --workdir=runs/mnist_cpu
rc=$?
echo "rc $rc wall $(( $(date +%s) - start )) s, started $started" > "$timing"

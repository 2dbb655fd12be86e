#!/bin/bash
# The README's first command from a fresh clone, pip's cache off, no MNIST on the machine.
set -u
rm -rf /tmp/fc && git clone -q /work/main /tmp/fc && cd /tmp/fc
start=$(date +%s.%N); started=$(date -u +%FT%TZ)
export PIP_NO_CACHE_DIR=1
python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m rdskd_jax.main --config=configs/mnist.py:cpu --workdir=runs/mnist_cpu
rc=$?
end=$(date +%s.%N)
echo "rc $rc wall $(echo "$end - $start" | bc) s, started $started" > /work/runs/first_cmd.timing

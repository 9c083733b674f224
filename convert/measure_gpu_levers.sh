#!/usr/bin/env bash
# The GPU rows still owed by the speed work. Each suite runs each row in its own process and
# fits one device call (about 6 and 8 minutes on an H200):
#   bash convert/measure_gpu_levers.sh               # the 'levers' suite: the new baseline,
#                                                    # remat 'runs', a cold compile at a lower
#                                                    # autotuning level
#   SUITE=table bash convert/measure_gpu_levers.sh   # the BENCHMARKS.md table again
# On a lent device machine, from the repository root, with the wheels its image lacks (flax,
# ml_collections) in .whl/ and carried along; results in $OUT (or /tmp/mprnet-gpu).
# SMOKE=1 runs the same rows on the tiny model: a check of this script on any machine.
set -euo pipefail
out=${OUT:-/tmp/mprnet-gpu}
mkdir -p "$out"
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install --quiet --no-deps --target /tmp/mprnet-site .whl/*.whl
  export PYTHONPATH=/tmp/mprnet-site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" || true
python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)' \
  >> "$out/gpu.txt"
suite=${SUITE:-levers}
python3 -m mprnet_jax.cli benchmark --suite "$out/$suite.jsonl" --suite-rows "$suite" \
  --steps 10 --warmup 2 --cache-dir "$(mktemp -d /tmp/mprnet-cache-XXXX)" ${SMOKE:+--smoke}

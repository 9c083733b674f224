#!/usr/bin/env bash
# The GPU rows still owed by the speed work, in one go (about 6 minutes on an H200): the
# 'levers' suite of `mprnet benchmark` (remat 'runs' against the same-session baseline, and a
# cold compile at a lower autotuning level), then the BENCHMARKS.md table.
#
# On a lent device machine, from the repository root, with the wheels its image lacks (flax,
# ml_collections) in .whl/ and carried along:
#   bash convert/measure_gpu_levers.sh            # results in $OUT (or /tmp/mprnet-gpu)
#   TABLE=1 bash convert/measure_gpu_levers.sh    # also rerun the whole table afterwards
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
python3 -m mprnet_jax.cli benchmark --suite "$out/levers.jsonl" --suite-rows levers \
  --steps 10 --warmup 2 --cache-dir /tmp/mprnet-cache
if [[ "${TABLE:-0}" == 1 ]]; then
  python3 -m mprnet_jax.cli benchmark --suite "$out/table.jsonl" --steps 10 --warmup 2 \
    --cache-dir /tmp/mprnet-table-cache
fi

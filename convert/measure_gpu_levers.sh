#!/usr/bin/env bash
# The GPU measurements still owed by the speed work (issue #11), in one device call of under ten
# minutes on an H200 (estimated at about 8, not yet run there; a time budget, BUDGET_S=570 by
# default, stops it short of the call's limit, keeping every finished result):
#   1. the profile (convert/profile_step.py): a bf16 training step of the deblurring model,
#      batch 16, 256², and a 720x1280 bf16 inference, traced with jax.profiler and reduced to
#      the table of kernel classes: profile.md, profile.json;
#   2. the 'levers' suite of `mprnet benchmark` (each row its own process): the baseline, remat
#      'runs' and 'convs', float32 'runs', cold compiles at autotune levels 2 and 1, and the
#      baseline recompiled from its kept per-fusion autotune results: levers.jsonl.
# Both use one compilation cache, profile first: the cold compile of the baseline's program is
# the profile's `compile_s` (train part), and the suite's first row then shows the first call
# from the persistent cache.
#
# The next session with a GPU, from the root of the checkout the device tool sends:
#   a. here, once (the H200 image lacks these; `.whl/` is git-ignored; about 5 MB):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#        --platform manylinux1_x86_64 -d .whl flax==0.12.12 ml_collections==1.1.0 grain==0.2.18 \
#        array_record==0.8.6 tensorboardX==2.6.5 portpicker==1.6.0 importlib_resources==7.1.0
#   b. run(command='bash convert/measure_gpu_levers.sh', carry=['.whl'], timeout_s=600)
#      then give_back(). What comes back (files_at): gpu.txt, log.txt, profile.md,
#      profile.json, levers.jsonl, and traces.tgz when it is under 15 MB.
# Other uses:
#   SUITE=table bash convert/measure_gpu_levers.sh   # the BENCHMARKS.md table again (no profile)
#   PROFILE=0 / PROFILE=1                            # leave out / add the profile
#   SMOKE=1 bash convert/measure_gpu_levers.sh       # the same, tiny model: a dry run on a CPU
# Results in $OUT (or /tmp/mprnet-gpu). A dry run took 9 to 19 minutes on the shared 2-core CPU
# machine (its budget: 40 minutes).
set -euo pipefail
out=${OUT:-/tmp/mprnet-gpu}
mkdir -p "$out"
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mprnet-site .whl/*.whl
  export PYTHONPATH=/tmp/mprnet-site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
suite=${SUITE:-levers}
profile=${PROFILE:-$([ "$suite" = levers ] && echo 1 || echo 0)}
budget=${BUDGET_S:-$([ -n "${SMOKE:-}" ] && echo 2400 || echo 570)}
cache=$(mktemp -d /tmp/mprnet-cache-XXXX)
traces=$(mktemp -d /tmp/mprnet-traces-XXXX)
log=$out/log.txt
{
  date -u '+%Y-%m-%d %H:%M UTC'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c 'import jax, flax, sys; print("jax", jax.__version__, "flax", flax.__version__,
    "python", sys.version.split()[0], "devices", jax.devices())'
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

left() { echo $((budget - SECONDS)); }

if [ "$profile" = 1 ]; then
  # At most 4 minutes (cold compiles of about 80 s and 16 s on an H200), leaving the rest to
  # the suite; `timeout` ends the whole process group, so nothing outlives it.
  limit=$(( $(left) < 240 ? $(left) : 240 ))
  echo "== profile (limit ${limit} s)" | tee -a "$log"
  timeout "$limit" python3 convert/profile_step.py --out "$out" --trace-dir "$traces" \
    --cache-dir "$cache" ${SMOKE:+--smoke} 2>&1 | tee -a "$log" \
    || echo "profile: exit $?" | tee -a "$log"
fi

if [ "$(left)" -gt 30 ]; then
  echo "== suite $suite (limit $(left) s)" | tee -a "$log"
  timeout "$(left)" python3 -m mprnet_jax.cli benchmark --suite "$out/$suite.jsonl" \
    --suite-rows "$suite" --steps 10 --warmup 2 --cache-dir "$cache" ${SMOKE:+--smoke} \
    2>&1 | tee -a "$log" \
    || echo "suite: exit $? (the rows finished are in $suite.jsonl)" | tee -a "$log"
else
  echo "== suite $suite skipped: out of time" | tee -a "$log"
fi

# The raw traces, for xprof/Perfetto, when they fit what a device call brings back.
if [ "$profile" = 1 ]; then
  tar czf /tmp/mprnet-traces.tgz -C "$traces" . 2>/dev/null || true
  if [ -f /tmp/mprnet-traces.tgz ] && [ "$(stat -c %s /tmp/mprnet-traces.tgz)" -lt 15000000 ]; then
    cp /tmp/mprnet-traces.tgz "$out/traces.tgz"
  fi
fi
echo "== done in ${SECONDS} s; results in $out: $(ls "$out" | tr '\n' ' ')" | tee -a "$log"

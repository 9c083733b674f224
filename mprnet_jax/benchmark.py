"""A benchmark harness for MPRNet training steps and inference (`mprnet benchmark`).

Warms up, then times steps one by one with the device synchronised (`block_until_ready`) and
reports the median step time, images/s, peak device memory, the time of the first call
(compilation included; with `cache_dir`, a second process shows the persistent-cache time) and
the achieved TFLOP/s against the model's counted FLOPs (the convolutions of the forward
pass, counted from its jaxpr; a training step counts as three forwards: the forward, and a
backward at twice its cost).

With `compile_only`, nothing runs: the step is compiled ahead of time and XLA's own account of
its buffers is reported (`compiled.memory_analysis()`), so the memory of a configuration can be
compared on a machine without the accelerator (on the CPU, float32 plans come out 3-12% above
an H200's measured peaks; bfloat16 ones are not comparable, the CPU backend computing bf16
convolutions in float32).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mprnet_jax.configs import base as base_config
from mprnet_jax.errors import MprnetError
from mprnet_jax.layers import normalize_remat
from mprnet_jax.model import MPRNet, compute_dtype
from mprnet_jax.parallel import place_batch, place_state
from mprnet_jax.train_step import create_train_state, make_train_step

SMOKE_SIZES = dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1)


def _parse_size(size) -> tuple[int, int]:
  text = str(size).lower()
  height, _, width = text.partition('x')
  h, w = int(height), int(width or height)
  if h <= 0 or w <= 0 or h % 8 or w % 8:
    raise MprnetError(f'size must be N or HxW with multiples of 8, got {size!r}')
  return h, w


def benchmark_config(task: str, batch: int, dtype: str, remat: str) -> ml_collections.ConfigDict:
  """The official training recipe of `task` (the packaged base config), at this batch, dtype
  and remat."""
  config = base_config.get_config()
  config.task = config.model.task_preset = task
  config.batch_size = batch
  config.model.dtype = dtype
  config.model.remat = remat
  if task == 'denoising':  # the official denoising recipe's L2 decay and longer cosine
    config.optim.weight_decay = 1e-8
    config.optim.cosine_extra_epochs = 40
  return config


def _conv_flops(jaxpr) -> float:
  """Multiply-adds x 2 of every convolution in a jaxpr, sub-jaxprs (jit, remat) included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval
      out = eqn.outvars[0].aval
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...) positions
      kernel_in = rhs.shape[spec[1]]
      window = 1
      for dim in spec[2:]:
        window *= rhs.shape[dim]
      total += 2.0 * out.size * kernel_in * window
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', None)
      if inner is not None:
        total += _conv_flops(getattr(inner, 'jaxpr', inner))
  return total


def forward_flops(model: MPRNet, shape) -> float:
  """FLOPs of one forward pass of `model` on inputs of `shape`, counted from its convolutions
  (2 x multiply-adds; the elementwise work is a rounding error next to them). Backend-free."""
  graphdef, params = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(params,
                                                                 jax.ShapeDtypeStruct(
                                                                     shape, jnp.float32))
  return _conv_flops(jaxpr.jaxpr)


def _time_calls(call, steps: int, warmup: int) -> tuple[float, list[float]]:
  start = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return first, times


def _peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


def run_benchmark(*, mode: str = 'train', task: str = 'deblurring', dtype: str = 'bfloat16',
                  batch: int = 16, size='256', remat: str = 'none', steps: int = 20,
                  warmup: int = 3, smoke: bool = False, cache_dir: str | None = None,
                  compile_only: bool = False) -> dict:
  """Times `mode` ('train' or 'inference') and returns the measurements as a dict, with a
  one-line human summary under 'summary'; with `compile_only`, compiles without running and
  reports the compile time and XLA's buffer sizes instead."""
  if mode not in ('train', 'inference'):
    raise MprnetError(f'mode must be train or inference, got {mode!r}')
  compute = compute_dtype(dtype)
  if batch < 1 or steps < 1 or warmup < 0:
    raise MprnetError('batch and steps must be >= 1 and warmup >= 0')
  remat = normalize_remat(remat)
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  if smoke:
    size, batch, steps, warmup = min(_parse_size(size)[0], 32), min(batch, 2), min(steps, 2), 1
  height, width = _parse_size(size)
  sizes = SMOKE_SIZES if smoke else {}
  model = MPRNet(task, **sizes, dtype=compute, remat=remat, rngs=nnx.Rngs(0))
  shape = (batch, height, width, 3)
  keys = jax.random.split(jax.random.key(0), 2)
  inputs = jax.random.uniform(keys[0], shape, jnp.float32)
  flops = forward_flops(model, shape)

  if mode == 'train':
    config = benchmark_config(task, batch, dtype, remat)
    graphdef, state = create_train_state(model, config, steps_per_epoch=1000, seed=0)
    step = make_train_step(graphdef, config, steps_per_epoch=1000, parallel='none')
    # Placed as the trainer places them: the step returns its state on the mesh of one device,
    # and a first call with an unplaced state would compile a second program (timed as warmup).
    state = place_state(state, 'none')
    batch_arrays = place_batch(
        {'input': inputs, 'target': jax.random.uniform(keys[1], shape, jnp.float32)}, 'none')
    holder = {'state': state}
    jitted, args = step, (state, batch_arrays, keys[1])

    def call():
      holder['state'], metrics = step(holder['state'], batch_arrays, keys[1])
      return metrics['loss']

    step_flops = 3 * flops
  else:
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
    jitted, args = forward, (params, inputs)

    def call():
      return forward(params, inputs)

    step_flops = flops

  description = (f'{mode} {task} {dtype} batch {batch} {height}x{width} remat={remat} on '
                 f'{jax.devices()[0].device_kind}')
  if compile_only:
    return _compile_report(
        jitted, args, description,
        dict(mode=mode, task=task, dtype=dtype, batch=batch, size=f'{height}x{width}', remat=remat,
             smoke=smoke, model_tflop_per_step=float(f'{step_flops / 1e12:.4g}')))

  first, times = _time_calls(call, steps, warmup)
  median = statistics.median(times)
  result = {
      'mode': mode,
      'task': task,
      'dtype': dtype,
      'batch': batch,
      'size': f'{height}x{width}',
      'remat': remat,
      'smoke': smoke,
      **_environment(),
      'first_call_s': round(first, 3),
      'median_step_ms': round(1e3 * median, 3),
      'images_per_s': round(batch / median, 2),
      'peak_memory_gib': _peak_memory_gib(),
      'model_tflop_per_step': float(f'{step_flops / 1e12:.4g}'),
      'achieved_tflops': float(f'{step_flops / median / 1e12:.4g}'),
      'steps_timed': steps,
  }
  memory = result['peak_memory_gib']
  result['summary'] = (
      f'{description}: {result["median_step_ms"]:.1f} ms/step (median of {steps}), '
      f'{result["images_per_s"]:.1f} images/s, first call {first:.1f} s, peak memory '
      f'{"n/a" if memory is None else f"{memory:.1f} GiB"}, '
      f'{result["achieved_tflops"]} TFLOP/s achieved')
  return result


def _environment() -> dict:
  return {
      'device': jax.devices()
                [0].device_kind, 'platform': jax.default_backend(), 'jax': jax.__version__,
      'flax': __import__('flax').__version__, 'python': platform.python_version()
  }


def _compile_report(jitted, args, description: str, fields: dict) -> dict:
  """Compiles `jitted` for `args` without running it; compile time and XLA's buffer sizes."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()  # None where the backend does not report one
  sizes = {
      f'xla_{kind}_gib':
          None if memory is None else round(getattr(memory, f'{kind}_size_in_bytes') / 2**30, 3)
      for kind in ('temp', 'argument', 'output')
  }
  total = None if memory is None else round(sum(sizes.values()), 3)
  summary = (f'{description}: compiled in {seconds:.1f} s (not run); XLA buffers: '
             f'{sizes["xla_temp_gib"]} GiB temporaries, '
             f'{None if total is None else round(total, 2)} GiB in all')
  return {
      **fields, **_environment(), 'compile_only': True, 'compile_s': round(seconds, 2),
      **sizes, 'xla_total_gib': total, 'summary': summary
  }


# The rows of BENCHMARKS.md, in the order they are worth measuring when time is short. The
# first row runs twice on one fresh compilation cache: cold, then from the persistent cache.
GPU_SUITE = (
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none'),
    dict(mode='inference', dtype='bfloat16', batch=1, size='720x1280', remat='none'),
    dict(mode='inference', dtype='float32', batch=1, size='720x1280', remat='none'),
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='convs'),
    dict(mode='train', dtype='float32', batch=16, size='256', remat='convs'),
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none'),  # warm cache
    dict(mode='train', dtype='float32', batch=16, size='256', remat='full'),
)

# Levers not yet measured on a GPU, against the same-session baseline (first row). A row with
# `fresh_cache` compiles in an empty compilation cache of its own; `xla_flags` are added to
# XLA_FLAGS; `autotune_level` N adds `--xla_gpu_autotune_level=N`; `autotune_cache` keeps XLA's
# per-fusion autotuning results in a folder through `--xla_gpu_per_fusion_autotune_cache_dir`:
# 'shared' is the one JAX fills inside the suite's compilation cache (the first row's results),
# any other name a folder of the suite run's own, shared by the rows that name it.
LEVER_SUITE = (
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none'),
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='runs'),
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='convs'),
    dict(mode='train', dtype='float32', batch=16, size='256', remat='runs'),
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none', fresh_cache=True,
         xla_flags='--xla_gpu_autotune_level=2'),
    # The first row's program compiled again with no executable cached but its autotuning
    # results on disk: the cold compile without the autotuning (about 65 of the 92 s).
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none', fresh_cache=True,
         autotune_cache='shared'),
    # A cold compile at the next lower level (no re-initialised buffers either): compile and
    # step time, to keep only where it costs no step time.
    dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none', fresh_cache=True,
         autotune_level=1),
)

SUITES = {'table': GPU_SUITE, 'levers': LEVER_SUITE}


def run_suite(out_path: str, *, cache_dir: str, steps: int = 10, warmup: int = 2,
              timeout_s: int = 240, smoke: bool = False, suite: str = 'table') -> list[dict]:
  """Runs every row of `SUITES[suite]` in its own process (fresh peak-memory counters, honest
  compile times) and appends each result to `out_path` as a JSON line as soon as it is known."""

  if suite not in SUITES:
    raise MprnetError(f'suite must be one of {", ".join(SUITES)}, got {suite!r}')
  results = []
  own_folders = tempfile.mkdtemp(prefix='mprnet-suite-')  # named autotune caches of this run
  for row in SUITES[suite]:
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION='0.95')
    flags = [row['xla_flags']] if row.get('xla_flags') else []
    if row.get('autotune_level') is not None:
      flags.append(f'--xla_gpu_autotune_level={int(row["autotune_level"])}')
    autotune_dir = None
    if row.get('autotune_cache'):
      name = row['autotune_cache']
      autotune_dir = (os.path.join(cache_dir, 'xla_gpu_per_fusion_autotune_cache_dir')
                      if name == 'shared' else os.path.join(own_folders, f'autotune-{name}'))
      flags.append(f'--xla_gpu_per_fusion_autotune_cache_dir={autotune_dir}')
      # With a compilation cache, JAX points XLA at an autotune folder inside it, whatever
      # XLA_FLAGS say; 'none' turns that off so the flag above is the only one.
      env['JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'] = 'none'
    if flags:
      env['XLA_FLAGS'] = ' '.join([env.get('XLA_FLAGS', '')] + flags).strip()
    row_cache = tempfile.mkdtemp(prefix='mprnet-cold-') if row.get('fresh_cache') else cache_dir
    argv = [
        sys.executable, '-m', 'mprnet_jax.cli', 'benchmark', '--json', '--mode', row['mode'],
        '--dtype', row['dtype'], '--batch',
        str(row['batch']), '--size', row['size'], '--remat', row['remat'], '--steps',
        str(steps), '--warmup',
        str(warmup), '--cache-dir', row_cache
    ] + (['--smoke'] if smoke else [])
    try:
      done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
      lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
      result = json.loads(lines[-1]) if done.returncode == 0 and lines else {
          **row, 'error': (done.stderr.strip().splitlines() or ['failed'])[-1][:300]
      }
    except subprocess.TimeoutExpired:
      result = {**row, 'error': f'timed out after {timeout_s} s'}
    if flags:
      result['xla_flags'] = ' '.join(flags)
    if autotune_dir:
      result['autotune_cache_dir'] = autotune_dir
    if row.get('fresh_cache'):
      result['fresh_cache'] = True
    results.append(result)
    with open(out_path, 'a') as f:
      f.write(json.dumps(result) + '\n')
    print(result.get('summary') or result, flush=True)
  return results

"""Where the time goes: profiles a training step and an inference with `jax.profiler` and
reduces each trace to a table of kernel classes (issue #11, item 1).

    python convert/profile_step.py --out results/          # on the GPU: bf16 deblurring step,
                                                           # batch 16, 256², and 720x1280
    python convert/profile_step.py --smoke --out /tmp/p    # the tiny model on the CPU (1-3 min)

Each part compiles its step ahead of time (`lower().compile()`, so the optimised HLO that names
every kernel's instruction is the executable's own), times a few steps without the profiler,
then traces `--steps` more into `--trace-dir/<part>/` and reduces the trace
(`mprnet_jax.profiling`). Written under `--out`: `profile.md` (the tables, also printed) and
`profile.json` (every figure, the compile and step times). The traces stay in `--trace-dir`
(default `OUT/traces`); open them with xprof/TensorBoard or Perfetto when the table is not
enough.

The model and step are `mprnet benchmark`'s (same config, same construction), so with the same
`--cache-dir` the compiled programs are the benchmark's cache entries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mprnet_jax import profiling  # noqa: E402
from mprnet_jax.benchmark import (  # noqa: E402
    SMOKE_SIZES, _parse_size, _time_calls, benchmark_config)
from mprnet_jax.model import MPRNet, compute_dtype  # noqa: E402
from mprnet_jax.train_step import create_train_state, make_train_step  # noqa: E402


def _build(mode: str, *, dtype: str, batch: int, size: str, remat: str, smoke: bool):
  """(compiled step, a call that runs it once and returns something to block on, compile s)."""
  height, width = _parse_size(size)
  model = MPRNet('deblurring', **(SMOKE_SIZES if smoke else {}), dtype=compute_dtype(dtype),
                 remat=remat, rngs=nnx.Rngs(0))
  shape = (batch, height, width, 3)
  keys = jax.random.split(jax.random.key(0), 2)
  inputs = jax.random.uniform(keys[0], shape, jnp.float32)
  start = time.perf_counter()
  if mode == 'train':
    config = benchmark_config('deblurring', batch, dtype, remat)
    graphdef, state = create_train_state(model, config, steps_per_epoch=1000, seed=0)
    step = make_train_step(graphdef, config, steps_per_epoch=1000, parallel='none')
    batch_arrays = {'input': inputs, 'target': jax.random.uniform(keys[1], shape, jnp.float32)}
    rng = keys[1]  # indexed once: `keys[1]` in the loop would run two tiny programs per step
    compiled = step.lower(state, batch_arrays, rng).compile()
    holder = {'state': state}

    def call():
      holder['state'], metrics = compiled(holder['state'], batch_arrays, rng)
      return metrics['loss']
  else:
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
    compiled = forward.lower(params, inputs).compile()

    def call():
      return compiled(params, inputs)

  return compiled, call, time.perf_counter() - start


def profile_part(mode: str, *, dtype: str, batch: int, size: str, remat: str, smoke: bool,
                 steps: int, warmup: int, trace_dir: str, peak_tflops: float,
                 bandwidth_tbs: float) -> dict:
  """Compiles, times and traces one part; returns its report (`profiling.reduce_profile`)."""
  compiled, call, compile_s = _build(mode, dtype=dtype, batch=batch, size=size, remat=remat,
                                     smoke=smoke)
  # Timed as `mprnet benchmark` times (first call, warm-up, then each step synchronised).
  first_s, untraced = _time_calls(call, max(steps, 3), warmup)
  traced = []
  # The profiler's own cost lands in the traced steps (on the GPU it also turns XLA's command
  # buffers off), so the step time reported beside the table is the untraced median.
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      start = time.perf_counter()
      jax.block_until_ready(call())
      traced.append(time.perf_counter() - start)
  step_ms = 1e3 * statistics.median(untraced)
  report = profiling.profile_report(trace_dir, compiled.as_text(), steps=steps,
                                    peak_tflops=peak_tflops, bandwidth_tbs=bandwidth_tbs,
                                    step_ms=step_ms)
  if jax.default_backend() != 'cpu' and report['backend'] == 'cpu':
    # No device kernels in the trace (a profiler without CUPTI, say): what is left are the host
    # threads' spans, launches rather than kernel times.
    report['warning'] = (f'no {jax.default_backend()} kernels in the trace: these are host-side '
                         'spans, not kernel times')
  height, width = _parse_size(size)
  traced_ms = round(1e3 * statistics.median(traced), 3)
  report.update(mode=mode, dtype=dtype, batch=batch, size=f'{height}x{width}', remat=remat,
                smoke=smoke, compile_s=round(compile_s, 2), first_run_s=round(first_s, 3),
                traced_step_ms=traced_ms, device=jax.devices()[0].device_kind, jax=jax.__version__)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='folder for profile.md and profile.json')
  parser.add_argument('--trace-dir', help='folder for the traces (default OUT/traces)')
  parser.add_argument('--parts', default='train,inference',
                      help='comma-separated: train, inference')
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  parser.add_argument('--batch', type=int, default=16, help='training batch')
  parser.add_argument('--size', default='256', help='training crop: N or HxW')
  parser.add_argument('--inference-size', default='720x1280')
  parser.add_argument('--remat', default='none', choices=['none', 'convs', 'runs', 'full'])
  parser.add_argument('--steps', type=int, default=3, help='profiled steps per part')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--peak-tflops', type=float, default=790.0,
                      help="the card's dense FLOP peak at --dtype (H200 bf16, measured: 790)")
  parser.add_argument('--bandwidth-tbs', type=float, default=4.8,
                      help="the card's memory bandwidth in TB/s (H200: 4.8)")
  parser.add_argument('--cache-dir', help='persistent compilation cache folder')
  parser.add_argument(
      '--smoke', action='store_true',
      help='tiny model, batch 2, 32x32 training and 64x64 inference, 2 steps: checks the '
      'tool on any machine (80-150 s on a busy 2-core CPU, mostly compiling)')
  args = parser.parse_args(argv)
  if args.cache_dir:
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  if args.smoke:
    args.batch, args.size, args.inference_size = 2, '32', '64'
    args.steps, args.warmup = min(args.steps, 2), 1
  os.makedirs(args.out, exist_ok=True)
  trace_root = args.trace_dir or os.path.join(args.out, 'traces')
  parts = [p.strip() for p in args.parts.split(',') if p.strip()]
  reports, sections = {}, []
  for part in parts:
    if part not in ('train', 'inference'):
      parser.error(f'unknown part {part!r}: train or inference')
    train = part == 'train'
    report = profile_part(part, dtype=args.dtype, batch=args.batch if train else 1,
                          size=args.size if train else args.inference_size,
                          remat=args.remat if train else 'none', smoke=args.smoke, steps=args.steps,
                          warmup=args.warmup, trace_dir=os.path.join(trace_root, part),
                          peak_tflops=args.peak_tflops, bandwidth_tbs=args.bandwidth_tbs)
    reports[part] = report
    remat = f', remat {report["remat"]}' if train else ''
    smoke = ', smoke model' if args.smoke else ''
    title = (f'{part}, {report["dtype"]}, batch {report["batch"]}, {report["size"]}{remat}{smoke}'
             f' on {report["device"]} (jax {report["jax"]}; compile {report["compile_s"]} s)')
    section = profiling.markdown(report, title)
    sections.append(section)
    print(section, flush=True)
    # Written after each part, so a run cut short keeps what it finished.
    with open(os.path.join(args.out, 'profile.json'), 'w') as f:
      f.write(profiling.dumps(reports))
    with open(os.path.join(args.out, 'profile.md'), 'w') as f:
      f.write('\n'.join(sections))
  return 0


if __name__ == '__main__':
  sys.exit(main())

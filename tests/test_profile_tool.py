"""The profile reduction (`mprnet_jax.profiling`, `convert/profile_step.py`) on a real CPU trace:
a tiny jitted training step (a convolution, channel pooling, elementwise work, an optax Adam
update) is traced with `jax.profiler` and reduced to the class table."""

import jax
import jax.numpy as jnp
import optax
import pytest

from mprnet_jax import profiling


def _tiny_step():
  tx = optax.adam(1e-3)

  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = jax.nn.relu(y) * jnp.mean(y, axis=(1, 2), keepdims=True)
    return jnp.mean(y**2)

  @jax.jit
  def step(w, opt_state, x):
    grads = jax.grad(loss)(w, x)
    updates, opt_state = tx.update(grads, opt_state, w)
    return optax.apply_updates(w, updates), opt_state

  w = jnp.ones((3, 3, 8, 8), jnp.float32) * 0.1
  return step, w, tx.init(w), jnp.ones((2, 16, 16, 8), jnp.float32)


@pytest.fixture(scope='module')
def traced(tmp_path_factory):
  step, w, opt_state, x = _tiny_step()
  compiled = step.lower(w, opt_state, x).compile()
  w, opt_state = jax.block_until_ready(compiled(w, opt_state, x))
  log_dir = str(tmp_path_factory.mktemp('trace'))
  steps = 3
  with jax.profiler.trace(log_dir):
    for _ in range(steps):
      w, opt_state = jax.block_until_ready(compiled(w, opt_state, x))
  return log_dir, compiled.as_text(), steps


def test_real_cpu_trace_reduces_to_a_table_of_known_classes(traced):
  log_dir, hlo, steps = traced
  report = profiling.profile_report(log_dir, hlo, steps=steps, step_ms=1.0)
  assert report['backend'] == 'cpu' and report['kernel_ms_per_step'] > 0
  shares = [row['share'] for row in report['classes'].values()]
  assert sum(shares) == pytest.approx(1.0, abs=1e-6)
  present = {name for name, row in report['classes'].items() if row['ms'] > 0}
  # The forward and the two gradient convolutions, the pooling, the elementwise work, Adam.
  assert {'convolution', 'reduction fusion', 'optimiser'} <= present, present
  assert present & {'loop fusion', 'copy/transpose'}, present
  # Three convolutions of the same FLOPs per step: forward, data and filter gradients (the
  # data gradient may be skipped: w is the only input differentiated, so two at least).
  conv = report['classes']['convolution']
  one = 2 * 2 * 16 * 16 * 8 * 8 * 9
  assert conv['flops'] in (2 * one, 3 * one), conv['flops'] / one
  assert report['convolutions'] and report['convolutions'][0]['shape'].startswith('conv ')
  table = profiling.markdown(report, 'tiny')
  assert '| convolution |' in table and 'Convolutions by shape' in table


def test_nested_spans_count_their_own_time_only():
  spans = [(0, 100, 'while', 'm'), (10, 40, 'a', 'm'), (50, 60, 'b', 'm'), (200, 210, 'c', 'm')]
  own = {op: t for op, _, t in profiling._self_times(spans)}
  assert own == {'while': 60, 'a': 30, 'b': 10, 'c': 10}


def test_gpu_style_hlo_convolutions_are_classified_with_their_flops():
  # The forms XLA:GPU prints: a cuDNN custom call returning (result, workspace), and a cuDNN
  # fusion whose body holds the convolution.
  hlo = '\n'.join([
      'HloModule jit_step, is_scheduled=true',
      '',
      '%cudnn_body (p0: bf16[16,64,64,96], p1: bf16[96,3,3,96]) -> bf16[16,64,64,96] {',
      '  %p0 = bf16[16,64,64,96]{3,2,1,0} parameter(0)',
      '  %p1 = bf16[96,3,3,96]{3,2,1,0} parameter(1)',
      '  ROOT %conv = bf16[16,64,64,96]{3,2,1,0} convolution(%p0, %p1), '
      'window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f',
      '}',
      '',
      'ENTRY %main (x: bf16[16,64,64,96], k: bf16[96,3,3,96]) -> bf16[16,64,64,96] {',
      '  %x = bf16[16,64,64,96]{3,2,1,0} parameter(0)',
      '  %k = bf16[96,3,3,96]{3,2,1,0} parameter(1)',
      '  %cudnn-conv-bw-input.3 = (bf16[16,64,64,96]{3,2,1,0}, u8[1024]{0}) custom-call('
      'bf16[16,64,64,96]{3,2,1,0} %x, bf16[96,3,3,96]{3,2,1,0} %k), '
      'window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, '
      'custom_call_target="__cudnn$convBackwardInput", backend_config={"a":{"b":1}}',
      '  %gte = bf16[16,64,64,96]{3,2,1,0} get-tuple-element(%cudnn-conv-bw-input.3), index=0',
      '  %fusion.7 = bf16[16,64,64,96]{3,2,1,0} fusion(%gte, %k), kind=kCustom, '
      'calls=%cudnn_body, backend_config={"fusion_backend_config":{"kind":"__cudnn$fusion"}}',
      '  ROOT %t = bf16[16,64,64,96]{3,2,1,0} transpose(%fusion.7), dimensions={0,1,2,3}',
      '}',
  ])
  module, ops = profiling.parse_hlo(hlo)
  assert module == 'jit_step'
  assert set(ops) == {'cudnn-conv-bw-input.3', 'fusion.7', 't'}
  flops = 2 * 16 * 64 * 64 * 96 * 96 * 9
  dgrad, fused = ops['cudnn-conv-bw-input.3'], ops['fusion.7']
  assert dgrad.cls == fused.cls == 'convolution'
  assert dgrad.flops == fused.flops == flops
  assert dgrad.label.startswith('dgrad 3x3: 16x64x64x96 * 96x3x3x96 -> 16x64x64x96 bf16')
  # bytes: both inputs and the result, not the u8 workspace
  assert dgrad.bytes == 2 * (2 * 16 * 64 * 64 * 96) + 2 * 96 * 9 * 96
  assert ops['t'].cls == 'copy/transpose'
  times = {
      'backend': 'gpu', 'unnamed': {'Memcpy DtoD': [2e6, 2]}, 'modules': {
          'jit_step': {'cudnn-conv-bw-input.3': [6e6, 4], 'fusion.7': [4e6, 2], 't': [2e6, 2]}
      }
  }
  report = profiling.reduce_profile(times, module, ops, steps=2, peak_tflops=790, bandwidth_tbs=4.8)
  assert report['kernel_ms_per_step'] == pytest.approx(7.0)
  assert report['classes']['convolution']['ms'] == pytest.approx(5.0)
  assert report['classes']['copy/transpose']['ms'] == pytest.approx(2.0)
  assert report['classes']['convolution']['flops'] == 2 * flops


def test_lever_rows_pass_autotune_cache_and_level_to_xla(tmp_path, monkeypatch):
  """The cold-compile levers reach the row's process as XLA flags (nothing is run here)."""
  import subprocess
  from mprnet_jax import benchmark

  seen = []

  def fake_run(argv, env, **kwargs):
    seen.append((argv, env))
    return subprocess.CompletedProcess(argv, 0, stdout='{"summary": "ok"}\n', stderr='')

  monkeypatch.setattr(benchmark.subprocess, 'run', fake_run)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  rows = (dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none', fresh_cache=True,
               autotune_cache='shared'),
          dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none',
               autotune_cache='mine', autotune_level=1),
          dict(mode='train', dtype='bfloat16', batch=16, size='256', remat='none'))
  monkeypatch.setitem(benchmark.SUITES, 'levers', rows)
  cache = str(tmp_path / 'cache')
  results = benchmark.run_suite(str(tmp_path / 'out.jsonl'), cache_dir=cache, suite='levers')
  shared_dir = f'{cache}/xla_gpu_per_fusion_autotune_cache_dir'
  assert seen[0][1]['XLA_FLAGS'] == f'--xla_gpu_per_fusion_autotune_cache_dir={shared_dir}'
  assert seen[0][1]['JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'] == 'none'
  assert seen[0][0][seen[0][0].index('--cache-dir') + 1] != cache  # a fresh compilation cache
  flags = seen[1][1]['XLA_FLAGS'].split()
  assert flags[0] == '--xla_gpu_autotune_level=1'
  assert flags[1].startswith('--xla_gpu_per_fusion_autotune_cache_dir=')
  assert flags[1].endswith('/autotune-mine') and results[1]['autotune_cache_dir'].endswith(
      '/autotune-mine')
  assert 'XLA_FLAGS' not in seen[2][1]
  assert 'JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES' not in seen[2][1]
  assert seen[2][0][seen[2][0].index('--cache-dir') + 1] == cache
  # The real suite has both levers.
  real = benchmark.LEVER_SUITE
  assert any(r.get('autotune_cache') for r in real) and any(
      r.get('autotune_level') is not None or 'autotune_level' in r.get('xla_flags', '')
      for r in real)


def test_xplane_and_chrome_trace_give_the_same_kernel_times(traced):
  import glob
  import os

  log_dir = traced[0]
  xplane = profiling.latest_trace(log_dir)
  assert xplane.endswith('.xplane.pb')
  chrome, = glob.glob(os.path.join(os.path.dirname(xplane), '*.trace.json.gz'))
  a, b = profiling.kernel_times(xplane), profiling.kernel_times(chrome)
  assert a['backend'] == b['backend'] == 'cpu' and set(a['modules']) == set(b['modules'])
  for module, ops in a['modules'].items():
    assert set(ops) == set(b['modules'][module])
    for op, (ns, count) in ops.items():
      assert b['modules'][module][op][1] == count
      assert b['modules'][module][op][0] == pytest.approx(ns, rel=1e-3, abs=5)

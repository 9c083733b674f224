"""The benchmark harness's CPU smoke mode (CI runs it; speed is never asserted)."""

import json

import pytest

from mprnet_jax.cli import main

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity


# Training in float32: XLA:CPU compiles the bfloat16 step about half as long again (bfloat16
# training steps are compiled in test_train_step); inference keeps the default, bfloat16.
@pytest.mark.parametrize('mode, dtype', [('train', 'float32'), ('inference', 'bfloat16')])
def test_benchmark_smoke_reports_every_field(mode, dtype, capsys):
  assert main(
      ['benchmark', '--smoke', '--json', '--mode', mode, '--dtype', dtype, '--remat', 'convs']) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result['dtype'] == dtype
  for key in ('median_step_ms', 'images_per_s', 'first_call_s', 'model_tflop_per_step',
              'achieved_tflops', 'device', 'jax', 'flax'):
    assert key in result, key
  assert result['mode'] == mode and result['smoke'] is True
  assert result['median_step_ms'] > 0 and result['images_per_s'] > 0
  # The counted convolution FLOPs are positive; a training step counts three forwards.
  assert result['model_tflop_per_step'] > 0


def test_benchmark_rejects_bad_size(capsys):
  assert main(['benchmark', '--size', '250']) == 2
  assert 'multiples of 8' in capsys.readouterr().err


def test_compile_only_reports_xla_buffers_without_running(capsys):
  assert main(['benchmark', '--smoke', '--json', '--mode', 'inference', '--compile-only']) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result['compile_only'] is True and 'median_step_ms' not in result
  assert result['compile_s'] > 0 and result['xla_total_gib'] > 0


def test_suite_runs_each_row_in_its_own_process_with_its_flags(tmp_path, monkeypatch):
  from mprnet_jax import benchmark

  row = dict(mode='inference', dtype='float32', batch=1, size='32', remat='none', fresh_cache=True,
             xla_flags='--xla_cpu_enable_fast_math=false')
  monkeypatch.setitem(benchmark.SUITES, 'levers', (row,))
  out = tmp_path / 'levers.jsonl'
  results = benchmark.run_suite(str(out), cache_dir=str(tmp_path / 'cache'), smoke=True,
                                suite='levers', timeout_s=120)
  assert len(results) == 1 and 'error' not in results[0], results
  written = [json.loads(line) for line in out.read_text().splitlines()]
  assert written == results
  assert written[0]['xla_flags'] == row['xla_flags'] and written[0]['mode'] == 'inference'
  # The row compiled in a fresh cache of its own, not in the shared one.
  assert not (tmp_path / 'cache').exists()

"""The benchmark harness's CPU smoke mode (CI runs it; speed is never asserted)."""

import json

import pytest

from mprnet_jax.cli import main


@pytest.mark.parametrize('mode', ['train', 'inference'])
def test_benchmark_smoke_reports_every_field(mode, capsys):
  assert main(['benchmark', '--smoke', '--json', '--mode', mode, '--remat', 'convs']) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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

"""Configs: every field is validated at load with one line naming it; the base and the demo
ship in the package, so an installed wheel trains; one builder turns a config into a model."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mprnet_jax.builders import build_model, model_sizes
from mprnet_jax.cli import main
from mprnet_jax.config_loading import load_config, validate_config
from mprnet_jax.configs import base, default
from mprnet_jax.errors import ConfigError

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / 'experiments' / 'smoke.py'


@pytest.mark.parametrize('override, message', [
    ('log_every=0', 'config.log_every must be >= 1, got 0'),
    ('eval_every=-5', 'config.eval_every must be >= 1'),
    ('checkpoint_every=0', 'config.checkpoint_every must be >= 1'),
    ('num_steps=-1', 'config.num_steps must be >= 1, got -1'),
    ('num_epochs=0', 'config.num_epochs must be >= 1'),
    ('batch_size=0', 'config.batch_size must be >= 1'),
    ('optim.lr=-0.001', 'config.optim.lr must be > 0, got -0.001'),
    ('optim.lr=0.0', 'config.optim.lr must be > 0'),
    ('optim.b2=1.0', 'config.optim.b2 must be < 1.0'),
    ('optim.min_lr=0.5', 'config.optim.min_lr (0.5) must not exceed config.optim.lr'),
    ('model.n_feat=0', 'config.model.n_feat must be >= 1, got 0'),
    ('model.n_feat=2', 'config.model.n_feat must be >= 4'),
    ('model.num_cab=-1', 'config.model.num_cab must be >= 1'),
    ('seed=18446744073709551616', 'config.seed must be between 0 and 4294967295'),
    ('seed=-1', 'config.seed must be between 0 and 4294967295'),
    ('data.patch_size=30', 'config.data.patch_size must be a multiple of 8'),
    ('data.val_patch_size=12', 'config.data.val_patch_size must be a multiple of 8'),
    ('data.noise_sigma=(5.0, 1.0)', 'config.data.noise_sigma must be (low, high)'),
    ('data.kind=folders', "config.data.kind must be one of 'paired', 'synthetic', 'shards'"),
    ('task=deblur', "config.task must be one of 'deblurring', 'denoising', 'deraining'"),
    ('parallel=ddp', "config.parallel must be one of 'auto', 'none', 'mesh', 'pmap'"),
    ('max_nonfinite=0', 'config.max_nonfinite must be >= 1'),
])
def test_a_bad_value_is_refused_naming_its_field(override, message):
  with pytest.raises(ConfigError) as raised:
    load_config(SMOKE, [override])
  assert message in str(raised.value)
  assert '\n' not in str(raised.value)


def test_explicit_sizes_need_all_four_without_a_preset():
  config = base.get_config()
  config.model.task_preset = ''
  config.model.n_feat = 16
  with pytest.raises(
      ConfigError, match=r"task_preset='' needs all four sizes; not set: "
      r'config.model.scale_unetfeats'):
    validate_config(config)
  # With a preset, a single size overrides just that size.
  config.model.task_preset = 'denoising'
  validate_config(config)
  assert model_sizes(config).n_feat == 16 and model_sizes(config).scale_unetfeats == 48


def test_the_packaged_configs_validate_and_build():
  for get_config in (base.get_config, default.get_config):
    validate_config(get_config())
  demo = load_config(None)
  assert demo.to_dict() == default.get_config().to_dict()
  model = build_model(load_config(SMOKE))
  assert (model.config.n_feat, model.config.num_cab) == (8, 1)


def test_cli_train_refuses_a_bad_value_in_one_line_before_touching_the_workdir(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert main(
      ['train', '--config',
       str(SMOKE), '--workdir',
       str(workdir), '--config.optim.lr=-1e-3']) == 2
  err = capsys.readouterr().err.strip()
  assert err == 'mprnet train: error: config.optim.lr must be > 0, got -0.001'
  assert not workdir.exists()


# Both `mprnet train` commands of the installed-wheel test, in one interpreter: the console
# script's entry point (`mprnet_jax.cli:main`) called once per command, each from its own
# working directory. Prints where the package came from, each command's exit status between
# markers, and the files of every mprnet_jax module it ended up using.
WHEEL_RUNS = textwrap.dedent('''
  import json, os, sys
  import mprnet_jax
  from mprnet_jax.cli import main
  print('package', mprnet_jax.__file__, flush=True)
  for name, cwd, argv in json.loads(sys.argv[1]):
    os.chdir(cwd)
    print('=== start', name, flush=True)
    rc = main(argv)
    print('=== end', name, rc, flush=True)
  print('modules', json.dumps(sorted({m.__file__ for n, m in list(sys.modules.items())
                                      if n.split('.')[0] == 'mprnet_jax' and
                                      getattr(m, '__file__', None)})))
''')


def test_an_installed_wheel_trains_the_demo_and_a_checkout_experiment(tmp_path):
  """Build the wheel, install it (without its dependencies, which this environment already
  has) into a fresh venv outside the checkout, and train from there: the demo from a folder
  outside the checkout (it needs no file of the checkout), then `mprnet train --config
  experiments/smoke.py` from the checkout, with the installed package. Both commands run in
  one process (`WHEEL_RUNS`), started outside the checkout with `-P`, so that, as for the
  installed `mprnet` script, no folder of the checkout is on sys.path."""
  wheels = tmp_path / 'wheels'
  subprocess.run([
      sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
      str(wheels),
      str(ROOT)
  ], check=True, capture_output=True)
  wheel, = wheels.glob('mprnet_jax-*.whl')
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  site = next((venv / 'lib').glob('python*/site-packages'))
  # The dependencies come from this environment's site-packages, after the venv's own.
  deps = [p for p in sys.path if p.endswith('site-packages')]
  (site / 'deps.pth').write_text('\n'.join(deps) + '\n')
  subprocess.run([
      sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target',
      str(site),
      str(wheel)
  ], check=True, capture_output=True)
  python = venv / 'bin' / 'python'
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  # XLA's quick compile (this checks packaging); the compilation cache is the tests' own
  # (JAX_COMPILATION_CACHE_DIR, from conftest), so the second command finds the step compiled.
  env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  # The packaged demo, shrunk to the smoke experiment's step (what matters here is that the
  # wheel finds its config), so the second command finds that step compiled.
  shrink = ('num_steps=2 eval_every=2 batch_size=2 num_epochs=4 task=deblurring '
            'model.n_feat=8 model.scale_unetfeats=4 model.scale_orsnetfeats=4 '
            'data.patch_size=32 data.val_patch_size=32 data.variants=1 data.augment=deblur '
            'optim.lr=0.001 optim.min_lr=1e-6').split()
  runs = [
      ('demo', str(outside),
       ['train', '--workdir',
        str(tmp_path / 'demo'), *[f'--config.{o}' for o in shrink]]),
      # An experiment file of the checkout, named as from the checkout's root.
      ('smoke', str(ROOT), [
          'train', '--config', 'experiments/smoke.py', '--workdir',
          str(tmp_path / 'smoke'), '--config.num_steps=2'
      ]),
  ]
  run = subprocess.run(
      [str(python), '-P', '-c', WHEEL_RUNS, json.dumps(runs)], cwd=outside, env=env,
      capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.splitlines()
  package, = [line.split(' ', 1)[1] for line in lines if line.startswith('package ')]
  assert package.startswith(str(site)), package  # the installed copy, not the checkout
  for name, _, _ in runs:
    start = lines.index(f'=== start {name}')
    end, = [i for i, line in enumerate(lines) if line.startswith(f'=== end {name} ')]
    assert lines[end] == f'=== end {name} 0', (lines[end], run.stderr[-2000:])
    assert '"step": 2' in '\n'.join(lines[start:end]), (name, run.stdout[-2000:])
  # Every module of the package the two commands used came from the wheel.
  modules = json.loads(lines[-1].split(' ', 1)[1])
  assert modules and all(path.startswith(str(site)) for path in modules), modules

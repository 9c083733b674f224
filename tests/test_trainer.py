"""The training loop with `experiments/smoke.py`: exact resume, fallback from a corrupt
checkpoint, the files a run leaves, loading the trained model, SIGTERM; and the experiment
configs. The smoke runs share one compiled step through the persistent compilation cache."""

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mprnet_jax import data as data_lib
from mprnet_jax.checkpoints import TrainCheckpointer, load_model_from_workdir
from mprnet_jax.config_loading import load_config
from mprnet_jax.configs import base as base_config
from mprnet_jax.metrics import psnr
from mprnet_jax.train_logging import image_grid, plot_curves, read_metrics
from mprnet_jax.builders import build_model, build_sources
from mprnet_jax.trainer import train

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity

EXPERIMENTS = Path(__file__).resolve().parents[1] / 'experiments'


def smoke(*overrides):
  return load_config(EXPERIMENTS / 'smoke.py', list(overrides))


def train_losses(workdir) -> dict[int, float]:
  records = read_metrics(Path(workdir) / 'metrics.jsonl')
  steps = [r['step'] for r in records if r['split'] == 'train']
  assert len(steps) == len(set(steps)), f'duplicate training records: {steps}'
  return {r['step']: r['loss'] for r in records if r['split'] == 'train'}


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  """Six uninterrupted steps (checkpoints at 2, 3, 4, 6; validations at 3 and 6)."""
  workdir = tmp_path_factory.mktemp('full')
  result = train(smoke('num_steps=6'), workdir)
  return workdir, result


def test_resume_continues_the_same_trajectory(full_run, tmp_path, capsys):
  workdir, full = full_run
  first = train(smoke('num_steps=3'), tmp_path)
  assert first['step'] == 3 and first['resumed_from'] is None
  # The first step's compile is announced, with the cache that makes the next one quick.
  assert ('compiling the training step: about a minute the first time, seconds afterwards '
          f'from the cache at {jax.config.jax_compilation_cache_dir}') in capsys.readouterr().out
  resumed = train(smoke('num_steps=6'), tmp_path)
  assert f'Resuming from step 3 in {tmp_path}' in capsys.readouterr().out
  assert resumed['resumed_from'] == 3 and resumed['step'] == 6
  expected, got = train_losses(workdir), train_losses(tmp_path)
  assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
  # The losses move by much more than the tolerance from step to step.
  assert np.ptp(list(expected.values())) > 1e-2
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)],
                             rtol=0, atol=1e-6)
  chex_leaves = zip(jax.tree.leaves(resumed['state'].params), jax.tree.leaves(full['state'].params))
  for a, b in chex_leaves:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def copy_run(source, destination) -> Path:
  shutil.copytree(source, destination)
  return Path(destination)


def params_data_files(checkpoint: Path) -> list[Path]:
  """The files holding the parameter arrays' bytes (not orbax's metadata or manifests)."""
  files = [
      p for p in (checkpoint / 'params').rglob('*')
      if p.is_file() and 'ocdbt.process_' in str(p) and p.parent.name == 'd'
  ]
  assert files
  return sorted(files, key=lambda p: p.stat().st_size)


def assert_one_warning_line(err: str, pattern: str) -> None:
  """stderr holds the one warning line matching `pattern`, and none of orbax's noise."""
  lines = [line for line in err.splitlines() if line.strip()]
  assert len([line for line in lines if re.search(pattern, line)]) == 1, err[-3000:]
  for noise in ('Event loop is closed', 'Traceback', 'ERROR:absl', 'Exception in thread'):
    assert noise not in err, err[-3000:]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(full_run, tmp_path, capfd):
  source, full = full_run
  workdir = copy_run(source, tmp_path / 'run')
  newest = workdir / 'checkpoints' / '6'
  # Truncate every data file of the parameters: a checkpoint cut short by a crash.
  for path in params_data_files(newest):
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)
  result = train(smoke('num_steps=6'), workdir)
  assert_one_warning_line(capfd.readouterr().err,
                          r'^warning: checkpoint .*checkpoints/6 is unreadable.*previous')
  assert result['resumed_from'] == 4
  assert (workdir / 'checkpoints' / '6.corrupt').is_dir()
  # Steps 5 and 6 run again from step 4's checkpoint: the same losses as the first time.
  expected, got = train_losses(source), train_losses(workdir)
  np.testing.assert_allclose([got[5], got[6]], [expected[5], expected[6]], rtol=0, atol=1e-6)
  assert TrainCheckpointer(workdir).latest_step() == 6


def test_one_flipped_bit_in_the_newest_params_is_caught(full_run, tmp_path, capfd):
  source, _ = full_run
  workdir = copy_run(source, tmp_path / 'run')
  # One bit of the largest parameter file, at a place where the file still decodes, to other
  # numbers: the parameters are zstd-compressed, and a flip in a coded section breaks decoding
  # instead (orbax's own error, caught too but not what this test is about). Which arrays share
  # a file varies from run to run, so the place is searched for rather than fixed.
  path = params_data_files(workdir / 'checkpoints' / '6')[-1]
  original = path.read_bytes()
  for fraction in np.linspace(0.5, 0.95, 19):
    data = bytearray(original)
    data[int(len(data) * fraction)] ^= 0x10
    path.write_bytes(bytes(data))
    checkpointer = TrainCheckpointer(workdir)
    try:
      checkpointer.restore_step(6, target_state())
      decodes = False  # the flip changed nothing that is read
    except Exception as error:  # noqa: BLE001 (which error it is is the question)
      decodes = 'does not match its checksum' in str(error)
    finally:
      checkpointer.close()
    if decodes:
      break
  assert decodes, 'no place found where a flipped bit still decodes'
  capfd.readouterr()
  result = train(smoke('num_steps=6'), workdir)
  assert_one_warning_line(capfd.readouterr().err,
                          r'checkpoints/6 is unreadable .*does not match its checksum.*previous')
  assert result['resumed_from'] == 4 and (workdir / 'checkpoints' / '6.corrupt').is_dir()
  assert np.isfinite(result['loss'])


@functools.cache
def target_state():
  """A smoke run's initial TrainState: the shape checkpoints are restored into."""
  from mprnet_jax import train_step as step_lib
  config = smoke()
  return step_lib.create_train_state(build_model(config), config, 2, 0)[1]


def rewrite_stored_configs(workdir: Path, edit) -> None:
  for path in (workdir / 'checkpoints').glob('*/config/metadata'):
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_checkpoints_from_before_checksums_and_path_fingerprints_still_load(full_run, tmp_path):
  source, _ = full_run
  workdir = copy_run(source, tmp_path / 'run')
  for path in (workdir / 'checkpoints').glob('*/config/metadata'):
    config = json.loads(path.read_text())
    del config['state_layout_paths'], config['checksums']
    if path.parts[-3] == '6':  # the fingerprint of a treedef printed by another flax or optax
      config['state_layout'] = '0123456789abcdef'
    path.write_text(json.dumps(config))  # the others: no fingerprint at all
  expected = {
      step: TrainCheckpointer(source).restore_step(step, target_state())[0] for step in (4, 6)
  }
  checkpointer = TrainCheckpointer(workdir)
  for step in (6, 4):
    state, _, restored_step = checkpointer.restore_latest(target_state())
    assert restored_step == step and int(state.step) == step
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected[step].params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if step == 6:
      assert load_model_from_workdir(workdir).config.n_feat == 8
      shutil.rmtree(workdir / 'checkpoints' / '6')
      checkpointer.close()
      checkpointer = TrainCheckpointer(workdir)
  checkpointer.close()


def test_truncated_best_checkpoint_falls_back_to_an_older_one(full_run, tmp_path, capfd):
  source, _ = full_run
  workdir = copy_run(source, tmp_path / 'run')
  best = TrainCheckpointer(workdir).best_step()
  for path in params_data_files(workdir / 'checkpoints' / str(best)):
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)
  capfd.readouterr()
  model = load_model_from_workdir(workdir)
  assert_one_warning_line(capfd.readouterr().err,
                          rf'checkpoints/{best}: its parameters are unreadable.*older checkpoint')
  older = max(s for s in TrainCheckpointer(workdir).all_steps() if s != best)
  saved, _ = TrainCheckpointer(workdir).restore_step(older, target_state())
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(saved.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('edit,message', [
    (lambda c: c['model'].update(n_feat=8192),
     'n_feat must be an integer from 1 to 1024, got 8192'),
    (lambda c: c['model'].update(n_feat='8'), "n_feat must be an integer from 1 to 1024, got '8'"),
    (lambda c: c['model'].update(num_cab=[1]), 'num_cab must be an integer'),
    (lambda c: c['model'].update(colour=3), 'unknown model size'),
    (lambda c: c.update(model='deblurring'), 'stored model sizes are not a JSON object'),
    (lambda c: c['model'].update(n_feat=16), 'do not match its parameters'),
])
def test_stored_model_sizes_are_checked_before_building(full_run, tmp_path, monkeypatch, edit,
                                                        message):
  from mprnet_jax import model as model_lib
  from mprnet_jax.errors import CheckpointError
  source, _ = full_run
  workdir = copy_run(source, tmp_path / 'run')
  rewrite_stored_configs(workdir, edit)
  built = []
  original_init = model_lib.MPRNet.__init__

  def recording_init(self, *args, **kwargs):
    built.append(kwargs.get('n_feat'))
    # Building the model of an absurd config would exhaust memory: fail instead.
    assert not isinstance(kwargs.get('n_feat'), int) or kwargs['n_feat'] <= 1024, kwargs
    original_init(self, *args, **kwargs)

  monkeypatch.setattr(model_lib.MPRNet, '__init__', recording_init)
  with pytest.raises(CheckpointError, match=re.escape(message)) as error:
    load_model_from_workdir(workdir)
  assert '\n' not in str(error.value)
  # Nothing was built but (at most) the abstract shapes of sizes that passed the checks.
  assert 8192 not in built and '8' not in built


def wait_until_unchanged(folder: Path, quiet_s: float, limit_s: float) -> None:
  """Returns once no file under `folder` appeared, vanished or changed size for `quiet_s`."""

  def snapshot():
    found = []
    for path in folder.rglob('*'):
      with contextlib.suppress(FileNotFoundError):
        found.append((str(path), path.stat().st_size))
    return sorted(found)

  deadline = time.monotonic() + limit_s
  last, since = snapshot(), time.monotonic()
  while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
    time.sleep(0.1)
    now = snapshot()
    if now != last:
      last, since = now, time.monotonic()


def test_a_failed_save_leaves_nothing_half_written(full_run, tmp_path, monkeypatch, capfd):
  import errno

  import orbax.checkpoint as ocp

  from mprnet_jax.errors import CheckpointError
  source, _ = full_run
  workdir = copy_run(source, tmp_path / 'run')
  state, loader_state = TrainCheckpointer(workdir).restore_step(6, target_state())

  async def disk_full(self, item, directory):
    raise OSError(errno.ENOSPC, 'No space left on device')

  # The write fails on orbax's thread, after `save` returned: reported at `wait`.
  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', disk_full)
  checkpointer = TrainCheckpointer(workdir, keep=3)
  checkpointer.save(state.replace(step=state.step + 1), loader_state)
  with pytest.raises(CheckpointError, match='saving the checkpoint of step 7 .* failed .*No space'):
    checkpointer.close()
  assert_no_orbax_noise(capfd.readouterr().err)
  monkeypatch.undo()
  # What the failed save left is no step, and the next run removes it.
  assert TrainCheckpointer(workdir).all_steps() == [3, 4, 6]
  # Orbax's writes of the other items are still landing in this process (a crashed run's would
  # not be): wait until the folder has not changed for 2 s (a fixed 1 s sleep was too short
  # on a loaded machine).
  wait_until_unchanged(workdir / 'checkpoints', quiet_s=2.0, limit_s=60.0)
  next_run = TrainCheckpointer(workdir)
  assert next_run.discard_unfinished_saves() == ['7.orbax-checkpoint-tmp']
  leftovers = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert not [name for name in leftovers if name.startswith('7')], leftovers
  assert next_run.latest_step() == 6


def assert_no_orbax_noise(err: str) -> None:
  for noise in ('Event loop is closed', 'Traceback', 'ERROR:absl', 'Exception in thread'):
    assert noise not in err, err[-3000:]


def test_nan_weights_stop_training_at_once(full_run, tmp_path, monkeypatch, capsys):
  from mprnet_jax import trainer as trainer_lib
  from mprnet_jax.cli import main
  build = trainer_lib.build_model

  def nan_model(config):
    model = build(config)
    model.tail.kernel[...] = model.tail.kernel[...] * jnp.nan
    return model

  monkeypatch.setattr(trainer_lib, 'build_model', nan_model)
  argv = [
      'train', '--config',
      str(EXPERIMENTS / 'smoke.py'), '--workdir',
      str(tmp_path), '--config.num_steps=6'
  ]
  assert main(argv) == 2
  err = capsys.readouterr().err.replace('\r', '\n').strip().splitlines()
  assert err[-1].startswith('mprnet train: error: training stopped at step 3: each of the first '
                            '3 steps had a non-finite loss'), err[-1]
  assert not [line for line in err if 'NaN or Inf' in line or 'Traceback' in line]
  assert sorted(train_losses(tmp_path)) == [1, 2]  # stopped early, not at step 6


def test_run_leaves_metrics_events_pictures_and_config(full_run):
  workdir, result = full_run
  records = read_metrics(workdir / 'metrics.jsonl')
  train_records = [r for r in records if r['split'] == 'train']
  val_records = [r for r in records if r['split'] == 'val']
  assert [r['step'] for r in train_records] == [1, 2, 3, 4, 5, 6]
  assert {'loss', 'lr', 'grad_norm', 'charbonnier_sum', 'edge_sum'} <= set(train_records[0])
  assert [r['step'] for r in val_records] == [3, 6]
  assert result['psnr'] == pytest.approx(val_records[-1]['psnr'])
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  for png in [workdir / 'curves.png', *(workdir / 'images').glob('val_*.png')]:
    with open(png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert sorted(
      p.name for p in (workdir / 'images').glob('*.png')) == ['val_0000003.png', 'val_0000006.png']
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['n_feat'] == 8 and config['num_steps'] == 6


def test_load_model_from_workdir_gives_the_best_checkpoint(full_run):
  workdir, _ = full_run
  val_records = [r for r in read_metrics(workdir / 'metrics.jsonl') if r['split'] == 'val']
  best = max(val_records, key=lambda r: r['psnr'])
  model = load_model_from_workdir(workdir)
  checkpointer = TrainCheckpointer(workdir)
  assert checkpointer.best_step() == best['step']
  # The loaded parameters are those of that step's checkpoint...
  from mprnet_jax import train_step as step_lib
  config = smoke()
  saved, _ = checkpointer.restore_step(best['step'], target_state())
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(saved.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ...and the loaded model (its graph and its parameters) reproduces the PSNR the run logged
  # at that step. Run through the jitted evaluation the trainer validates with (the compile
  # comes from the cache; the model called eagerly compiled each of its ~800 ops, 10 s).
  _, val_source = build_sources(config)
  batch = data_lib.make_eval_batches(val_source, config.data.val_patch_size, 2)[0]
  graphdef, params = nnx.split(model, nnx.Param)
  restored = np.asarray(step_lib.make_eval_step(graphdef, config)(params, batch['input']))
  assert float(np.mean(psnr(restored, batch['target']))) == pytest.approx(best['psnr'], abs=1e-4)


def slow_orbax_commits(monkeypatch, seconds: float) -> None:
  """Orbax's background commit of each checkpoint takes `seconds` longer."""
  import asyncio

  import orbax.checkpoint as ocp
  original = ocp.JsonCheckpointHandler._save_fn

  async def slow(self, item, directory):
    await asyncio.sleep(seconds)
    return await original(self, item, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', slow)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, capsys, monkeypatch):
  from mprnet_jax import trainer as trainer_lib
  metrics = tmp_path / 'metrics.jsonl'

  def send_sigterm_after_first_step():
    deadline = time.time() + 300
    while not metrics.exists() and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  # "saved" must wait for the commit, however late it comes: record what is on disk when it
  # is said.
  slow_orbax_commits(monkeypatch, 1.5)
  committed_when_said = []
  make_bar = trainer_lib._progress_bar

  def recording_bar(*args):
    bar = make_bar(*args)
    write = bar.write

    def checking_write(text, *a, **k):
      if 'saved a checkpoint at step' in text:
        step = int(re.search(r'at step (\d+)', text).group(1))
        committed_when_said.append(TrainCheckpointer(tmp_path).latest_step() == step)
      write(text, *a, **k)

    bar.write = checking_write
    return bar

  monkeypatch.setattr(trainer_lib, '_progress_bar', recording_bar)
  threading.Thread(target=send_sigterm_after_first_step, daemon=True).start()
  result = train(smoke('num_steps=200', 'eval_every=1000', 'checkpoint_every=1000'), tmp_path)
  assert result['interrupted'] and 1 <= result['step'] < 200
  assert 'SIGTERM received: saved a checkpoint at step' in capsys.readouterr().out
  assert committed_when_said == [True]
  assert TrainCheckpointer(tmp_path).latest_step() == result['step']
  # The handler is gone afterwards: SIGTERM's default again.
  assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)


def test_double_ctrl_c_during_a_save_exits_in_one_line(tmp_path, capfd, monkeypatch):
  from mprnet_jax.cli import main
  metrics = tmp_path / 'metrics.jsonl'
  checkpoints = tmp_path / 'checkpoints'

  def press_ctrl_c_twice():
    deadline = time.time() + 300
    while not metrics.exists() and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)  # stop: the final save starts
    while not list(checkpoints.glob('*.orbax-checkpoint-tmp*')) and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)  # impatient: leave during the save

  slow_orbax_commits(monkeypatch, 2.0)
  threading.Thread(target=press_ctrl_c_twice, daemon=True).start()
  argv = [
      'train', '--config',
      str(EXPERIMENTS / 'smoke.py'), '--workdir',
      str(tmp_path), '--config.num_steps=200', '--config.eval_every=1000',
      '--config.checkpoint_every=1000'
  ]
  assert main(argv) == 130
  out, err = capfd.readouterr()
  assert 'saved a checkpoint' not in out
  assert_no_orbax_noise(err)
  assert re.search(r'interrupted again: not waiting for the checkpoint of step \d+', err), err
  assert err.strip().splitlines()[-1] == 'mprnet train: interrupted'
  # The save left behind, committed later or not, is never a half-written step.
  time.sleep(2.5)
  checkpointer = TrainCheckpointer(tmp_path)
  checkpointer.discard_unfinished_saves()
  steps = checkpointer.all_steps()
  assert not list(checkpoints.glob('*.orbax-checkpoint-tmp*'))
  for step in steps:
    assert (checkpoints / str(step) / 'commit_success.txt').exists() or \
        (checkpoints / str(step) / '_CHECKPOINT_METADATA').exists()


def test_image_grid_and_pillow_curves(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.random((3, 16, 24, 3), dtype=np.float32) for _ in range(3)]
  grid = image_grid(*images)
  assert grid.shape == (3 * 16 + 4, 3 * 24 + 4, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[16 + 2:32 + 2, :24], np.rint(images[1][0] * 255))
  records = [{'step': s, 'split': 'train', 'loss': 1 / s} for s in range(1, 5)]
  records.append({'step': 4, 'split': 'val', 'psnr': 25.0, 'psnr_degraded': 20.0})
  plot_curves(records, tmp_path / 'c.png', use_matplotlib=False)
  assert (tmp_path / 'c.png').read_bytes()[:4] == b'\x89PNG'


# --- experiment configs -------------------------------------------------------------------


@pytest.mark.parametrize('name,values', [
    ('deblur_gopro', {
        'task': 'deblurring', 'optim.lr': 2e-4, 'batch_size': 16, 'data.patch_size': 256,
        'num_epochs': 3000, 'optim.warmup_epochs': 3, 'optim.min_lr': 1e-6, 'optim.weight_decay':
            0.0, 'mixup_start_epoch': None, 'data.augment': 'deblur',
        'model.task_preset': 'deblurring', 'data.train_dir': 'datasets/GoPro/train'
    }),
    ('derain_rain13k', {
        'task': 'deraining', 'optim.lr': 2e-4, 'batch_size': 16, 'data.patch_size': 256,
        'num_epochs': 250, 'data.augment': 'plain', 'model.task_preset': 'deraining'
    }),
    ('denoise_sidd', {
        'task': 'denoising', 'optim.lr': 2e-4, 'batch_size': 16, 'data.patch_size': 128,
        'num_epochs': 80, 'optim.weight_decay': 1e-8, 'optim.cosine_extra_epochs':
            40, 'mixup_start_epoch': 5, 'optim.b1': 0.9, 'optim.b2': 0.999, 'optim.eps': 1e-8,
        'model.task_preset': 'denoising'
    }),
    ('default', {
        'task': 'denoising', 'data.kind': 'synthetic', 'mixup_start_epoch': None,
        'optim.schedule_unit': 'step', 'model.num_cab': 1
    }),
    ('smoke', {'model.n_feat': 8, 'data.patch_size': 32}),
])
def test_experiment_configs(name, values):
  config = load_config(EXPERIMENTS / f'{name}.py')
  for key, expected in values.items():
    node = config
    for part in key.split('.'):
      node = node[part]
    assert node == expected, key
  # The launch command is in the docstring.
  assert f'mprnet train --config experiments/{name}.py' in (EXPERIMENTS / f'{name}.py').read_text()


def test_every_config_field_has_a_comment():
  text = Path(base_config.__file__).read_text()
  for line in text.splitlines():
    stripped = line.strip()
    if stripped.startswith('config.') and '=' in stripped and 'ConfigDict()' not in stripped:
      assert '#' in line or '#' in text.splitlines()[text.splitlines().index(line) - 1], line


def test_overrides_are_type_checked():
  config = smoke('optim.lr=0.01', 'data.kind=paired', 'num_steps=7', 'model.remat=convs',
                 'mixup_start_epoch=3', 'data.noise_sigma=(1.0, 2.0)')
  assert (config.optim.lr, config.data.kind, config.num_steps) == (0.01, 'paired', 7)
  assert config.model.remat == 'convs' and config.mixup_start_epoch == 3
  assert config.data.noise_sigma == (1.0, 2.0)
  with pytest.raises(ValueError, match="unknown config field 'optim.lrr'"):
    smoke('optim.lrr=1')
  with pytest.raises(ValueError, match="bad value 'abc' for config field 'batch_size'"):
    smoke('batch_size=abc')
  with pytest.raises(ValueError, match='not of the form'):
    smoke('batch_size')
  with pytest.raises(ValueError, match='does not exist'):
    load_config(EXPERIMENTS / 'nope.py')


def test_cli_train_runs_an_experiment_and_resumes(tmp_path, capsys):
  from mprnet_jax.cli import main
  argv = [
      'train', '--config',
      str(EXPERIMENTS / 'smoke.py'), '--workdir',
      str(tmp_path), '--config.num_steps=2'
  ]
  assert main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary['step'] == 2 and np.isfinite(summary['loss'])
  assert main(argv[:-1] + ['--config.num_steps=3']) == 0
  assert 'Resuming from step 2' in capsys.readouterr().out
  assert main(argv[:-1] + ['--config.num_stepz=3']) == 2
  assert "unknown config field 'num_stepz'" in capsys.readouterr().err
  # Resuming with settings that change the training state's layout is refused, and nothing in
  # the run is moved aside or overwritten.
  checkpoints = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  saved = (tmp_path / 'config.json').read_text()
  assert main(argv[:-1] + ['--config.num_steps=4', '--config.optim.weight_decay=0.001']) == 2
  assert 'holds a training state of another layout' in capsys.readouterr().err
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == checkpoints
  assert (tmp_path / 'config.json').read_text() == saved
  # A value the model refuses is one line naming the field, and the run's files stay as they were.
  assert main(argv[:-1] + ['--config.model.remat=partial']) == 2
  assert 'config.model.remat must be one of none, convs, runs, full' in capsys.readouterr().err
  assert (tmp_path / 'config.json').read_text() == saved

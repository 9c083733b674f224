"""Training with its workdir and its data in buckets, against a real GCS emulator
(fake-gcs-server, see tests/gcs_emulator.py; every test is skipped, with the reason, where it
cannot run): the smoke experiment reads its shards from one bucket, checkpoints into another,
is stopped by SIGTERM, resumes from the bucket and ends with exactly the parameters of the same
run on local disk. Then what the bucket holds, the lock and checkpoint fallbacks in a bucket,
and the one-line errors of a wrong bucket, a missing dataset and an unreachable service.

The two-process run into one gs:// workdir is in tests/test_multihost.py (its one multi-process
run covers both kinds of workdir)."""

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mprnet_jax import storage, train_logging
from mprnet_jax.builders import build_sources
from mprnet_jax.checkpoints import TrainCheckpointer, WorkdirLock, load_model_from_workdir
from mprnet_jax.cli import main
from mprnet_jax.config_loading import load_config
from mprnet_jax.errors import CheckpointError, MprnetError, StorageError
from mprnet_jax.shards import write_shards
from mprnet_jax.train_logging import read_metrics
from mprnet_jax.trainer import train

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity

SMOKE = Path(__file__).resolve().parents[1] / 'experiments' / 'smoke.py'
STEPS = 4
STOP_AFTER = 3  # SIGTERM arrives during step 3, in the middle of the second epoch


def shard_config(root: str):
  # Checkpoints and validation only where a run stops (on SIGTERM, and at its last step): each
  # save to the emulator costs about as much as the steps.
  return load_config(SMOKE, [
      f'num_steps={STEPS}', 'checkpoint_every=1000', 'eval_every=1000', 'data.kind=shards',
      f'data.train_dir={root}/train', f'data.val_dir={root}/val'
  ])


@pytest.fixture(scope='module')
def stage_dir(tmp_path_factory):
  """This module's staging cache (MPRNET_STAGE_DIR), not the user's."""
  folder = tmp_path_factory.mktemp('staged')
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(storage.STAGE_DIR_ENV, str(folder))
    yield folder


@pytest.fixture(scope='module')
def shards(gcs_emulator, tmp_path_factory):
  """(local folder, bucket URL) each holding train/ and val/ shards of the smoke experiment's
  pairs; the bucket's written by `write_shards` itself."""
  train_source, val_source = build_sources(load_config(SMOKE))
  local = tmp_path_factory.mktemp('shards')
  bucket = gcs_emulator.make_bucket('mprnet-data') + '/shards'
  for split, source in (('train', train_source), ('val', val_source)):
    pairs = [source[i] for i in range(len(source))]
    write_shards(pairs, str(local / split), prefix=split)
    urls = write_shards(pairs, f'{bucket}/{split}', prefix=split)
    assert urls == [f'{bucket}/{split}/{split}.array_record-00000-of-00001']
  return str(local), bucket


@pytest.fixture(scope='module')
def local_run(shards, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('local')
  return workdir, train(shard_config(shards[0]), workdir)


@pytest.fixture(scope='module')
def bucket_run(gcs_emulator, shards, stage_dir):
  """The same run with its workdir and data in buckets: stopped by SIGTERM during step 3 (as a
  preempted TPU VM is), then the same command again. Returns (workdir, first result, what the
  bucket held after the stop, resumed result)."""
  workdir = gcs_emulator.make_bucket('mprnet-runs') + '/smoke'
  write = train_logging.MetricsLogger.write

  def write_then_preempt(self, step, split, metrics):
    write(self, step, split, metrics)
    if split == 'train' and step == STOP_AFTER:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_logging.MetricsLogger, 'write', write_then_preempt)
    first = train(shard_config(shards[1]), workdir)
  checkpointer = TrainCheckpointer(workdir)
  after_stop = {
      'steps': checkpointer.all_steps(),
      'metrics': storage.read_text(storage.join(workdir, 'metrics.jsonl')),
      'names': storage.list_names(workdir)
  }
  checkpointer.close()
  resumed = train(shard_config(shards[1]), workdir)
  return workdir, first, after_stop, resumed


def test_preempted_run_in_buckets_resumes_to_the_parameters_of_a_run_on_disk(
    local_run, bucket_run, capsys):
  local_workdir, local = local_run
  workdir, first, after_stop, resumed = bucket_run
  assert first['interrupted'] and first['step'] == STOP_AFTER
  assert after_stop['steps'] == [STOP_AFTER]  # the save on SIGTERM, committed
  assert max(r['step'] for r in map(json.loads, after_stop['metrics'].splitlines())) == STOP_AFTER
  assert 'trainer.lock' not in after_stop['names']
  assert resumed['resumed_from'] == STOP_AFTER and resumed['step'] == STEPS
  assert not resumed['interrupted']
  leaves = jax.tree.leaves(resumed['state'].params)
  assert len(leaves) == len(jax.tree.leaves(local['state'].params))
  for got, expected in zip(leaves, jax.tree.leaves(local['state'].params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  # The curve in the bucket is whole: the records before the stop were brought down on resume.
  remote = [
      r for r in map(json.loads,
                     storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines())
  ]
  on_disk = read_metrics(local_workdir / 'metrics.jsonl')
  assert [(r['step'], r['split']) for r in remote] == [(r['step'], r['split']) for r in on_disk]
  np.testing.assert_array_equal([r.get('loss', r.get('psnr')) for r in remote],
                                [r.get('loss', r.get('psnr')) for r in on_disk])


def test_bucket_workdir_holds_what_a_local_one_does(bucket_run, stage_dir):
  workdir, _, _, resumed = bucket_run
  assert storage.list_names(workdir) == [
      'checkpoints', 'config.json', 'curves.png', 'images', 'metrics.jsonl', 'tensorboard'
  ]
  assert storage.list_names(storage.join(workdir, 'images')) == [f'val_{STEPS:07d}.png']
  events = storage.list_names(storage.join(workdir, 'tensorboard'))
  assert len(events) == 2 and all(e.startswith('events.out.tfevents.') for e in events)
  config = json.loads(storage.read_text(storage.join(workdir, 'config.json')))
  assert config['data']['train_dir'].startswith('gs://mprnet-data/')
  # Both runs' checkpoints are there, and the best loads from the bucket.
  assert TrainCheckpointer(workdir).all_steps() == [STOP_AFTER, STEPS]
  model = load_model_from_workdir(workdir)
  assert model.config.n_feat == 8
  # The shards were staged on this host, once.
  staged = sorted(p.name for p in (stage_dir / 'gs' / 'mprnet-data').rglob('*.array_record-*'))
  assert staged == ['train.array_record-00000-of-00001', 'val.array_record-00000-of-00001']
  assert resumed['psnr'] is not None


def test_lock_in_a_bucket_is_exclusive_and_a_dead_holders_is_taken_over(gcs_emulator):
  workdir = gcs_emulator.make_bucket('mprnet-locks') + '/run'
  with WorkdirLock(workdir):
    with pytest.raises(
        MprnetError, match=rf'^{re.escape(workdir)} is in use by another trainer '
        rf'\(pid {os.getpid()} on {re.escape(socket.gethostname())}\)'):
      WorkdirLock(workdir).acquire()
  assert not storage.exists(storage.join(workdir, 'trainer.lock'))
  # A lock left by a process of this host that is gone.
  dead = {'host': socket.gethostname(), 'pid': 2**22 + 12345, 'since': 0}
  storage.write_text(storage.join(workdir, 'trainer.lock'), json.dumps(dead))
  with WorkdirLock(workdir):
    holder = json.loads(storage.read_text(storage.join(workdir, 'trainer.lock')))
    assert holder['pid'] == os.getpid()


def test_failed_save_and_damaged_checkpoint_in_a_bucket(bucket_run, monkeypatch, capfd):
  """Last of the tests on `bucket_run`'s workdir: it changes it."""
  import orbax.checkpoint as ocp
  workdir, _, _, resumed = bucket_run
  state = resumed['state']
  checkpointer = TrainCheckpointer(workdir, keep=3)

  async def service_error(self, item, directory):
    raise OSError('503 Service Unavailable')

  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', service_error)
  checkpointer.save(state.replace(step=state.step + 1), {'at': STEPS + 1})
  with pytest.raises(CheckpointError,
                     match=rf'saving the checkpoint of step {STEPS + 1} in gs://.* failed'):
    checkpointer.close()
  monkeypatch.undo()
  time.sleep(1)  # orbax's writes of the other items, still landing
  checkpoints = storage.join(workdir, 'checkpoints')
  fresh = TrainCheckpointer(workdir)
  fresh.discard_unfinished_saves()  # whatever of the failed save landed after the failure
  assert storage.list_names(checkpoints) == [str(STOP_AFTER), str(STEPS)]
  assert fresh.latest_step() == STEPS
  # The newest checkpoint's parameters cut short: set aside in the bucket, the previous used.
  fs, _ = storage._filesystem(checkpoints)
  fs.invalidate_cache()
  data = [f for f in fs.find(f'{checkpoints}/{STEPS}/params') if '/d/' in f]
  assert data
  for name in data:
    fs.pipe_file(name, fs.cat_file(name)[:8])
  capfd.readouterr()
  restored, _, step = fresh.restore_latest(state)
  fresh.close()
  assert step == STOP_AFTER and int(restored.step) == STOP_AFTER
  assert f'checkpoints/{STEPS} is unreadable' in capfd.readouterr().err
  assert storage.list_names(checkpoints) == [str(STOP_AFTER), f'{STEPS}.corrupt']


def test_image_folders_and_shard_patterns_in_a_bucket_are_staged(gcs_emulator, shards, stage_dir,
                                                                 tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for sub in ('input', 'target'):
    (tmp_path / 'pairs' / sub).mkdir(parents=True)
    for name in ('a.png', 'b.png'):
      Image.fromarray(rng.integers(0, 256, (16, 24, 3),
                                   dtype=np.uint8)).save(tmp_path / 'pairs' / sub / name)
  bucket = gcs_emulator.make_bucket('mprnet-images')
  storage.upload(tmp_path / 'pairs', f'{bucket}/pairs')
  paired, _ = build_sources(
      load_config(
          SMOKE,
          ['data.kind=paired', f'data.train_dir={bucket}/pairs', f'data.val_dir={bucket}/pairs']))
  assert paired.names == ['a.png', 'b.png']
  assert Path(paired.root).is_relative_to(stage_dir)
  synthetic, _ = build_sources(load_config(SMOKE, [f'data.train_dir={bucket}/pairs/target']))
  assert len(synthetic) == 2
  pattern = f'{shards[1]}/train/train.array_record-*'
  sharded, _ = build_sources(
      load_config(SMOKE,
                  ['data.kind=shards', f'data.train_dir={pattern}', f'data.val_dir={pattern}']))
  assert len(sharded) == 4 and Path(sharded.paths[0]).is_relative_to(stage_dir)


def cli_train(workdir: str, *overrides: str) -> int:
  return main(['train', '--config',
               str(SMOKE), '--workdir', workdir, '--config.num_steps=1'] +
              [f'--config.{o}' for o in overrides])


def last_error_line(capsys) -> str:
  return capsys.readouterr().err.strip().splitlines()[-1]


def test_workdir_in_a_missing_bucket_is_one_line(gcs_emulator, capsys):
  assert cli_train('gs://mprnet-no-such-bucket/run') == 2
  assert last_error_line(capsys) == ('mprnet train: error: gs://mprnet-no-such-bucket/run: '
                                     'bucket gs://mprnet-no-such-bucket does not exist')


def test_missing_dataset_is_one_line_and_leaves_the_workdir_empty(gcs_emulator, stage_dir, capsys):
  workdir = gcs_emulator.make_bucket('mprnet-empty') + '/run'
  data = gcs_emulator.make_bucket('mprnet-data')
  assert cli_train(workdir, 'data.kind=shards', f'data.train_dir={data}/missing',
                   f'data.val_dir={data}/missing') == 2
  assert last_error_line(capsys) == (f'mprnet train: error: {data}/missing: no such object or '
                                     'folder')
  assert storage.list_names(workdir) == []  # no lock, no config, no checkpoint


def test_unreachable_storage_is_one_line(gcs_emulator, monkeypatch, capsys):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    closed = f'http://127.0.0.1:{s.getsockname()[1]}'
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', closed)
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', closed)
  assert cli_train('gs://mprnet-runs/unreachable') == 2
  line = last_error_line(capsys)
  assert line.startswith('mprnet train: error: gs://mprnet-runs/unreachable: cannot reach the '
                         f'emulator at STORAGE_EMULATOR_HOST={closed} ('), line
  with pytest.raises(StorageError, match='cannot reach'):
    build_sources(load_config(SMOKE, ['data.train_dir=gs://mprnet-data/photos']))

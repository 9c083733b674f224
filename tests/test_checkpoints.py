"""Checkpoint plumbing that needs no training: the state-layout fingerprint, the workdir lock,
orbax's public API only, the curves picture on a failed write, the XLA log filter. The tests
that need a trained workdir share the one of tests/test_trainer.py and live there."""

import collections
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mprnet_jax import checkpoints, train_logging
from mprnet_jax.checkpoints import WorkdirLock, state_layout
from mprnet_jax.errors import MprnetError

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity

ROOT = Path(__file__).resolve().parents[1]


def test_layout_fingerprint_reads_key_paths_not_the_printed_tree():
  # optax renaming a state class (same fields, shapes and dtypes) changes the printed treedef
  # but not what restores into what.
  old_name = collections.namedtuple('ScaleByAdamState', 'count mu nu')
  new_name = collections.namedtuple('AdamState', 'count mu nu')
  leaves = (jnp.zeros((), jnp.int32), jnp.zeros((3, 4)), jnp.zeros((3, 4)))
  old, new = {'opt': old_name(*leaves)}, {'opt': new_name(*leaves)}
  assert checkpoints._legacy_state_layout(old) != checkpoints._legacy_state_layout(new)
  assert state_layout(old) == state_layout(new)
  # What does change the layout is still seen: a shape, a dtype, a key.
  assert state_layout(old) != state_layout(
      {'opt': old_name(leaves[0], jnp.zeros((3, 5)), leaves[2])})
  assert state_layout(old) != state_layout(
      {'opt': old_name(leaves[0], leaves[1], jnp.zeros((3, 4), jnp.bfloat16))})
  assert state_layout(old) != state_layout({'optimiser': old_name(*leaves)})


def test_only_orbax_public_api():
  source = inspect.getsource(checkpoints)
  for private in ('._checkpoints', '._manager._', 'orbax.checkpoint._src'):
    assert private not in source, private


def test_second_trainer_on_a_workdir_stops_before_touching_it(tmp_path):
  from mprnet_jax.config_loading import load_config
  from mprnet_jax.trainer import train

  # A live process on this host holds the lock (this test's parent: certainly alive).
  holder = {'host': socket.gethostname(), 'pid': os.getppid(), 'since': 0}
  (tmp_path / 'trainer.lock').write_text(json.dumps(holder))
  config = load_config(ROOT / 'experiments' / 'smoke.py', ['num_steps=2'])
  with pytest.raises(MprnetError, match=rf'in use by another trainer \(pid {os.getppid()} on '):
    train(config, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['trainer.lock']
  assert json.loads((tmp_path / 'trainer.lock').read_text()) == holder


def test_stale_lock_is_taken_over_and_released(tmp_path):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()  # reaped: its pid names no process now
  path = tmp_path / 'trainer.lock'
  path.write_text(json.dumps({'host': socket.gethostname(), 'pid': dead.pid}))
  with WorkdirLock(tmp_path):
    assert json.loads(path.read_text())['pid'] == os.getpid()
    # Held: a second lock on the same workdir, even in this process, is refused.
    with pytest.raises(MprnetError, match='in use by another trainer'):
      WorkdirLock(tmp_path).acquire()
  assert not path.exists()
  # A lock from another host cannot be checked: refused, naming the file to delete.
  path.write_text(json.dumps({'host': 'elsewhere.example', 'pid': dead.pid}))
  with pytest.raises(MprnetError, match=rf'elsewhere.example.*delete {path}'):
    WorkdirLock(tmp_path).acquire()
  # Multi-host: process 1 locks its own file, so it meets its own lock in a second run.
  with WorkdirLock(tmp_path, process_index=1) as lock:
    assert lock.path.name == 'trainer.process_1.lock' and lock.path.exists()


def test_curves_leave_no_partial_picture_when_the_write_fails(tmp_path, monkeypatch):

  def disk_full(panels, path):
    Path(path).write_bytes(b'\x89PNG half')
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(train_logging, '_plot_pillow', disk_full)
  records = [{'step': 1, 'split': 'train', 'loss': 1.0}]
  with pytest.raises(OSError, match='No space left'):
    train_logging.plot_curves(records, tmp_path / 'curves.png', use_matplotlib=False)
  assert list(tmp_path.iterdir()) == []


def test_xla_autotuner_noise_is_filtered_and_errors_kept(tmp_path):
  script = ('import os, sys\n'
            'from mprnet_jax.trainer import quiet_xla_logs\n'
            'quiet_xla_logs()\n'
            "noise = b'E1201 12:00:00.000000 1 cuda_timer.cc:86] Delay kernel timed out: measured "
            "time has sub-optimal accuracy.\\n'\n"
            'os.write(2, noise * 200)\n'
            "os.write(2, b'E1201 12:00:01.000000 1 gpu_compiler.cc:1] a real error\\n')\n"
            "print('from python', file=sys.stderr)\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
  env.pop('MPRNET_XLA_LOGS', None)
  done = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert 'Delay kernel timed out' not in done.stderr
  assert 'a real error' in done.stderr and 'from python' in done.stderr
  np.testing.assert_equal(done.stderr.count('\n'), 2)

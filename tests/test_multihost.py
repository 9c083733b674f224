"""Two processes on localhost (2 CPU devices each, gloo collectives), each feeding its own half
of the global batch, train as one mesh: the result matches one process on the whole batch. Both
checkpoint their state, as the trainer does: the two processes into one gs:// workdir (a GCS
emulator; a local folder where the emulator cannot run), the one process on local disk, so
both kinds of workdir are covered by the one multi-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SCHEDULER_FLAG
from multihost_worker import STEPS, checksum, tiny_batch, tiny_config, train

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity

WORKER = Path(__file__).resolve().parent / 'multihost_worker.py'
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _workdir_for_the_two_processes(request, tmp_path) -> tuple[str, dict]:
  """(workdir, environment): a gs:// workdir and the emulator's variables; else a folder."""
  try:
    emulator = request.getfixturevalue('gcs_emulator')
  except pytest.skip.Exception:
    return str(tmp_path / 'run'), {}
  return emulator.make_bucket('mprnet-multihost') + '/run', emulator.environ()


def test_two_processes_match_one(tmp_path, request):
  import jax

  from flax import nnx

  from mprnet_jax.checkpoints import TrainCheckpointer, load_model_from_workdir
  port = _free_port()
  workdir, storage_env = _workdir_for_the_two_processes(request, tmp_path)
  # Without conftest's device count (each process sets its own); with the persistent
  # compilation cache and the scheduler flag that lets a sharded program load from it (only
  # process 0 writes the cache: process 1 compiles every time).
  env = dict(os.environ, XLA_FLAGS=SCHEDULER_FLAG)
  env['PYTHONPATH'] = os.pathsep.join([str(WORKER.parent), env.get('PYTHONPATH', '')])
  env.update(storage_env)
  workers = [
      subprocess.Popen([
          sys.executable,
          str(WORKER), '--process_id',
          str(i), '--num_processes', '2', '--port',
          str(port), '--out',
          str(tmp_path), '--workdir', workdir
      ], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)
  ]
  try:
    # The one-process reference runs meanwhile (its compiled step is usually in the cache).
    ref_losses, ref_params = train(tiny_config(), tiny_batch(), 'none',
                                   workdir=tmp_path / 'reference')
    outputs = [w.communicate(timeout=TIMEOUT_S) for w in workers]
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
        w.communicate()
  for i, (w, (out, err)) in enumerate(zip(workers, outputs)):
    assert w.returncode == 0, f'process {i} failed (exit {w.returncode}):\n{out}\n{err[-6000:]}'

  result = json.loads((tmp_path / 'result.json').read_text())
  assert (result['process_count'], result['device_count']) == (2, 4)
  assert len(result['losses']) == STEPS
  np.testing.assert_allclose(result['losses'], ref_losses, rtol=0, atol=1e-5)
  assert abs(result['checksum'] -
             checksum(ref_params)) <= 1e-5 * max(1.0, abs(checksum(ref_params)))
  params = np.load(tmp_path / 'params.npz')
  assert set(params.files) == set(ref_params)
  worst = max(float(np.abs(params[k] - ref_params[k]).max()) for k in ref_params)
  assert worst <= 1e-5, worst
  # The checkpoint both processes wrote holds those parameters (read back as `restore` reads a
  # workdir, checksums checked), as the one-process checkpoint holds the reference's; both
  # workdirs are left unlocked.
  for where, expected in ((workdir, params), (tmp_path / 'reference', ref_params)):
    assert TrainCheckpointer(where).all_steps() == [STEPS], where
    model = load_model_from_workdir(where)
    restored = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }
    assert set(restored) == set(expected), where
    for key in expected:
      np.testing.assert_array_equal(restored[key], expected[key], err_msg=f'{where} {key}')
  from mprnet_jax import storage
  assert not storage.exists(storage.join(workdir, 'trainer.lock'))
  assert not storage.exists(storage.join(workdir, 'trainer.process_1.lock'))
  # The steps did move the parameters (the comparison above is not vacuous).
  _, initial = train(tiny_config(), tiny_batch(), 'none', steps=0)
  assert max(float(np.abs(initial[k] - ref_params[k]).max()) for k in ref_params) > 1e-4

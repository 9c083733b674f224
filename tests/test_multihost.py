"""Two processes on localhost (2 CPU devices each, gloo collectives), each feeding its own half
of the global batch, train as one mesh: the result matches one process on the whole batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from multihost_worker import STEPS, checksum, tiny_batch, tiny_config, train

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity

WORKER = Path(__file__).resolve().parent / 'multihost_worker.py'
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  import jax
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # conftest's 8 devices
  env['PYTHONPATH'] = os.pathsep.join([str(WORKER.parent), env.get('PYTHONPATH', '')])
  cache = jax.config.jax_compilation_cache_dir
  workers = [
      subprocess.Popen([
          sys.executable,
          str(WORKER), '--process_id',
          str(i), '--num_processes', '2', '--port',
          str(port), '--out',
          str(tmp_path)
      ] + (['--cache', cache] if cache else []), env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True) for i in range(2)
  ]
  try:
    # The one-process reference runs meanwhile (its compiled step is usually in the cache).
    ref_losses, ref_params = train(tiny_config('adam'), tiny_batch(), 'none')
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
  # The steps did move the parameters (the comparison above is not vacuous).
  _, initial = train(tiny_config('adam'), tiny_batch(), 'none', steps=0)
  assert max(float(np.abs(initial[k] - ref_params[k]).max()) for k in ref_params) > 1e-4

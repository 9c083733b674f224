"""Shared test set-up: two CPU devices (for the parallel tests), a persistent compilation
cache, the paths of the reference fixtures, and `fast_compile` for tests of plumbing."""

import contextlib
import os
from pathlib import Path

# Two devices: every parallel mode's data split and gradient reduction is exercised, and the
# parallel programs compile and run about a fifth faster than on 8 (a mesh of more devices is
# covered by the two-process run: 2 x 2).
CPU_DEVICES = 2
# XLA:CPU's concurrency-optimised scheduler orders a sharded program's collectives so that,
# read back from the persistent compilation cache, the devices can enter different collectives
# and wait on each other for ever (the training step with MixUp on a mesh; jax 0.12.0.1, 2 and 8
# devices). Without it, the program loads and runs; it only orders
# instructions, and the official parity steps come out bit for bit the same. For this process
# and the processes the tests start; both must happen before JAX creates its backends.
SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
os.environ['XLA_FLAGS'] = ' '.join([
    os.environ.get('XLA_FLAGS', f'--xla_force_host_platform_device_count={CPU_DEVICES}'),
    SCHEDULER_FLAG
])

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_num_cpu_devices', CPU_DEVICES)
CACHE = Path(os.environ.get('MPRNET_TEST_CACHE',
                            Path(__file__).resolve().parents[1] / '.jax_cache'))
# The processes the tests start (the command line, the two-process run, the wheel's venv) read
# and write the same cache through the environment, so a step compiled in one is loaded in the
# others. Programs that compile in under a second stay out: writing the ~1000 small eager ops of
# a model's initialisers added about 10% to test_model.py, and the whole suite did not get
# faster for reading them back elsewhere.
os.environ['JAX_COMPILATION_CACHE_DIR'] = str(CACHE)
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '1'
jax.config.update('jax_compilation_cache_dir', str(CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / 'fixtures'
SHARED_FIXTURES = TESTS.parents[1] / 'shared' / 'fixtures'


def shared_fixture(name: str) -> Path:
  """A file of ../shared/fixtures; a missing one fails the test (never skips it)."""
  path = SHARED_FIXTURES / name
  if not path.exists():
    pytest.fail(f'{path} is missing: the large reference fixtures are read from ../shared/fixtures')
  return path


@contextlib.contextmanager
def quick_compile():
  """XLA without most of its optimisations inside the block (for one program's compile where
  the rest of the module must compile as users do)."""
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', False)


@pytest.fixture(scope='module')
def fast_compile():
  """XLA without most of its optimisations while a module runs: compiles about a third faster
  on the CPU. For modules that test plumbing (files, resumes, errors, parallel equivalence
  within one setting), never for the parity tests against the official fixtures; opt in with
  `pytestmark = pytest.mark.usefixtures('fast_compile')`."""
  os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'  # and in the processes the tests start
  with quick_compile():
    yield
  del os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS']


@pytest.fixture(scope='session')
def gcs_emulator():
  """A running GCS emulator (tests/gcs_emulator.py) with this process's clients pointed at it;
  the test is skipped, with the reason, where the emulator's binary cannot run (fails instead
  with MPRNET_REQUIRE_EMULATOR set, as CI sets it)."""
  import logging

  from gcs_emulator import EmulatorUnavailable, GcsEmulator

  try:
    emulator = GcsEmulator().start()
  except EmulatorUnavailable as exc:
    message = f'GCS emulator unavailable: {exc}. See README "TPU pod" for running these tests'
    if os.environ.get('MPRNET_REQUIRE_EMULATOR'):  # CI: a missing emulator fails, never skips
      pytest.fail(message)
    pytest.skip(message)
  saved = {k: os.environ.get(k) for k in emulator.environ()}
  os.environ.update(emulator.environ())
  # gcsfs logs a warning per bucket when it cannot ask for the bucket's layout without
  # credentials; harmless against an emulator.
  logging.getLogger('gcsfs').setLevel(logging.ERROR)
  yield emulator
  emulator.stop()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value

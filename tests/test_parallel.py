"""Data parallelism on the CPU devices of conftest (two): 'mesh' and 'pmap' reproduce one
device on the whole batch, MixUp included on the mesh (one permutation of the global batch, as
the official code draws it), every parameter within 1e-5 after every step.

The setting (tests/multihost_worker.py) makes one compiled program per mode serve every check:
plain steps 0 and 1, mixed steps 2 and 3, and an Adam whose updates are about lr * gradient.
Measured on the one-device run, two steps: a gradient summed instead of averaged over 2
devices (twice the loss) moves the parameters by up to 9.2e-3 and 51% of them by more than
1e-5; each device's own share only (four examples of eight), by up to 3.7e-4 and 6.8% of them.
"""

import jax
import numpy as np
import pytest

from mprnet_jax.parallel import (choose_parallel, make_mesh, place_batch, place_state,
                                 unplace_state)
from mprnet_jax.train_step import make_train_step
from conftest import CPU_DEVICES
from multihost_worker import (GLOBAL_BATCH, MIXED_FROM, STEPS_PER_EPOCH, tiny_batch, tiny_config,
                              tiny_state)

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity


def flat_params(state, parallel):
  params = unplace_state(state, parallel).params
  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }


def run(parallel, steps, mesh=None):
  """(loss per step, flat params after each step, the step function and the last state)."""
  config = tiny_config()
  graphdef, state = tiny_state(config)
  step_fn = make_train_step(graphdef, config, STEPS_PER_EPOCH, parallel=parallel, mesh=mesh)
  state = place_state(state, parallel, mesh)
  batch = place_batch(tiny_batch(), parallel, mesh)
  losses, params = [], []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    losses.append(float(np.asarray(metrics['loss'].addressable_data(0))))
    params.append(flat_params(state, parallel))
  return losses, params, step_fn, state


@pytest.fixture(scope='module')
def runs():
  # (The mesh program with MixUp comes from the compilation cache too: see conftest's
  # SCHEDULER_FLAG.)
  results = {'none': run('none', MIXED_FROM + 2), 'mesh': run('mesh', MIXED_FROM + 2, make_mesh())}
  # pmap mixes within each device's share (not the official recipe): compared on plain steps.
  results['pmap'] = run('pmap', MIXED_FROM)
  _, initial = tiny_state(tiny_config())
  return results, flat_params(initial, 'none')


def assert_same_parameters(params, ref_params):
  assert set(params) == set(ref_params)
  worst = max(float(np.abs(params[k] - ref_params[k]).max()) for k in ref_params)
  assert worst <= 1e-5, worst


@pytest.mark.parametrize('mode', ['mesh', 'pmap'])
def test_matches_one_device(runs, mode):
  results, initial = runs
  ref_losses, ref_params, _, _ = results['none']
  losses, params, _, _ = results[mode]
  np.testing.assert_allclose(losses, ref_losses[:len(losses)], rtol=0, atol=1e-5)
  for step, step_params in enumerate(params):
    assert_same_parameters(step_params, ref_params[step])
  moved = max(float(np.abs(initial[k] - params[-1][k]).max()) for k in initial)
  assert moved > 1e-4, moved


def copy_with_key(state, seed):
  """A host copy of `state` (the step donates its input) with another MixUp key."""
  copy = jax.tree.map(np.asarray, state.replace(rng=None)).replace(rng=jax.random.key(seed))
  # Placed as the original (a difference in placement would compile the step again).
  return jax.device_put(copy, jax.tree.map(lambda x: x.sharding, state))


def test_mixup_steps_on_a_mesh_mix_the_global_batch(runs):
  # The steps compared above from MIXED_FROM on did mix: there the loss depends on the key
  # (the state's own key by default); on a plain step the key is unused.
  results, _ = runs
  for mode in ('none', 'mesh'):
    _, _, step_fn, state = results[mode]
    batch = place_batch(tiny_batch(), mode, make_mesh() if mode == 'mesh' else None)
    assert int(state.step) // STEPS_PER_EPOCH >= 1  # the next step is in a MixUp epoch
    # Another key in the state rather than as an argument: the same compiled program.
    loss_a, loss_b = (
        float(step_fn(copy_with_key(state, seed), batch)[1]['loss']) for seed in (1, 2))
    assert abs(loss_a - loss_b) > 1e-4, (mode, loss_a, loss_b)


def test_devices():
  assert jax.device_count() == CPU_DEVICES > 1
  assert choose_parallel('auto') == 'mesh'
  assert choose_parallel('pmap') == 'pmap'
  with pytest.raises(ValueError, match='parallel mode'):
    choose_parallel('ddp')


def test_place_and_unplace_round_trip():
  _, state = tiny_state(tiny_config())
  host = jax.tree.map(np.asarray, jax.tree.leaves(jax.random.key_data(state.rng)))
  mesh = make_mesh()
  for mode in ('mesh', 'pmap'):
    placed = place_state(jax.tree.map(lambda x: x, state), mode, mesh)
    leaf = jax.tree.leaves(placed.params)[0]
    assert len(leaf.sharding.device_set) == CPU_DEVICES
    if mode == 'pmap':
      assert leaf.shape[0] == CPU_DEVICES
    back = unplace_state(placed, mode)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(back.params)):
      assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(jax.random.key_data(back.rng)), host[0])


def test_place_batch_shapes_and_errors():
  batch = tiny_batch()
  mesh = make_mesh()
  global_batch = place_batch(batch, 'mesh', mesh)
  assert global_batch['input'].shape == (GLOBAL_BATCH, 32, 32, 3)
  assert np.array_equal(np.asarray(global_batch['input']), batch['input'])
  shards = place_batch(batch, 'pmap')
  assert shards['target'].shape == (CPU_DEVICES, GLOBAL_BATCH // CPU_DEVICES, 32, 32, 3)
  assert np.array_equal(
      np.asarray(shards['target']).reshape(batch['target'].shape), batch['target'])
  odd = {k: v[:GLOBAL_BATCH - 1] for k, v in batch.items()}
  for mode in ('mesh', 'pmap'):
    with pytest.raises(ValueError, match='does not divide'):
      place_batch(odd, mode, mesh)

"""One process of the two-process data-parallel test (tests/test_multihost.py), and the tiny
setting it shares with tests/test_parallel.py (same config and batch, so the one-device
reference compiles once and comes from the persistent cache afterwards).

The setting: the official Adam with eps = 1, so that an update is about lr * gradient (a
gradient off by a factor, such as the device count, moves the parameters far beyond the
tolerance, where the default eps would normalise the factor away, and no entry with a gradient
of about zero flips by ±lr on the rounding of a sum's order); MixUp from the second epoch of
two-step epochs, decided at run time from the step, so one compiled program takes plain steps
(0 and 1) and mixed ones (2 on).

Run as: python multihost_worker.py --process_id I --num_processes 2 --port P --out DIR
  [--workdir W]
Each process has 2 CPU devices, feeds its own half of the global batch through `place_batch`,
and takes 3 steps with mesh parallelism (the third mixed: one permutation of the global batch
across both processes); process 0 writes DIR/result.json (loss per step and a parameter
checksum) and DIR/params.npz. With --workdir (a folder or a gs:// URL) every process then takes
its `WorkdirLock` and writes its part of one orbax checkpoint there, as the trainer does on a
pod.
"""

from __future__ import annotations

import argparse
import json
import os

import ml_collections
import numpy as np

GLOBAL_BATCH = 8
CROP = 32
STEPS = 3
TINY_SIZES = {'n_feat': 16, 'scale_unetfeats': 8, 'scale_orsnetfeats': 8, 'num_cab': 1}
STEPS_PER_EPOCH = 2
MIXED_FROM = 2  # the first step of epoch 1, where MixUp starts


def tiny_config() -> ml_collections.ConfigDict:
  """The packaged base config in the setting above."""
  from mprnet_jax.configs import base
  config = base.get_config()
  config.batch_size = GLOBAL_BATCH
  config.num_epochs = 10
  config.max_nonfinite = 5
  config.optim.name = 'adam'
  config.optim.lr = 0.05
  config.optim.eps = 1.0
  config.optim.warmup_epochs = 0
  config.mixup_start_epoch = 1
  return config


def tiny_batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  target = rng.random((GLOBAL_BATCH, CROP, CROP, 3), dtype=np.float32)
  noisy = target + 0.2 * rng.standard_normal(target.shape, dtype=np.float32)
  return {'input': noisy.astype(np.float32), 'target': target}


def tiny_state(config):
  from flax import nnx

  from mprnet_jax.model import MPRNet
  from mprnet_jax.train_step import create_train_state
  model = MPRNet(**TINY_SIZES, rngs=nnx.Rngs(0))
  return create_train_state(model, config, STEPS_PER_EPOCH, seed=0)


def train(config, local_batch, parallel: str, mesh=None, steps: int = STEPS, workdir=None):
  """(loss per step, final params as a dict of numpy arrays keyed by path); with `workdir`,
  the final state is also checkpointed there (`TrainCheckpointer`, under the workdir's lock)."""
  import jax

  from mprnet_jax.parallel import place_batch, place_state, unplace_state
  from mprnet_jax.train_step import make_train_step
  graphdef, state = tiny_state(config)
  step_fn = make_train_step(graphdef, config, STEPS_PER_EPOCH, parallel=parallel, mesh=mesh)
  state = place_state(state, parallel, mesh)
  batch = place_batch(local_batch, parallel, mesh)
  if jax.process_count() > 1:
    # Compile everywhere first, then start together: gloo gives up connecting the processes
    # after ~30 s, less than one process may take longer than another to compile.
    from jax.experimental import multihost_utils
    compiled = step_fn.lower(state, batch).compile()
    multihost_utils.sync_global_devices('mprnet_compiled')
    step_fn = lambda state, batch: compiled(state, batch, None)  # noqa: E731
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    losses.append(float(np.asarray(metrics['loss'].addressable_data(0))))
  if workdir is not None:
    save_checkpoint(state if parallel == 'mesh' else unplace_state(state, parallel), workdir)
  params = unplace_state(state, parallel).params
  flat = {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  return losses, flat


def save_checkpoint(state, workdir) -> None:
  import jax

  from mprnet_jax.checkpoints import TrainCheckpointer, WorkdirLock
  with WorkdirLock(workdir):
    checkpointer = TrainCheckpointer(workdir, keep=1, model_config=TINY_SIZES)
    checkpointer.discard_unfinished_saves()
    checkpointer.save(state, {'process': jax.process_index()})
    checkpointer.close()


def checksum(flat: dict[str, np.ndarray]) -> float:
  """Sum of every parameter times a fixed position-dependent weight (order-sensitive)."""
  total = 0.0
  for key in sorted(flat):
    values = flat[key].astype(np.float64).ravel()
    total += float(np.dot(values, np.cos(np.arange(values.size))))
  return total


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--devices_per_process', type=int, default=2)
  parser.add_argument('--out', required=True)
  parser.add_argument('--workdir', default=None)
  args = parser.parse_args()

  import jax
  jax.config.update('jax_num_cpu_devices', args.devices_per_process)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')

  from mprnet_jax.parallel import initialize_distributed, is_main_process, make_mesh
  assert initialize_distributed(coordinator_address=f'127.0.0.1:{args.port}',
                                num_processes=args.num_processes, process_id=args.process_id)
  assert jax.process_count() == args.num_processes
  assert jax.device_count() == args.num_processes * args.devices_per_process

  share = GLOBAL_BATCH // args.num_processes
  local = {
      k: v[args.process_id * share:(args.process_id + 1) * share] for k, v in tiny_batch().items()
  }
  losses, flat = train(tiny_config(), local, 'mesh', make_mesh(), workdir=args.workdir)
  if is_main_process():
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, 'params.npz'), **flat)
    with open(os.path.join(args.out, 'result.json'), 'w') as f:
      json.dump(
          {
              'losses': losses, 'checksum': checksum(flat), 'process_count': jax.process_count(),
              'device_count': jax.device_count()
          }, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()

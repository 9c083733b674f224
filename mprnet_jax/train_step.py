"""The training step: a pure, jitted `(state, batch, rng) -> (state, metrics)`, and evaluation.

One step: optional MixUp (denoising, from `config.mixup_start_epoch` on), forward, the official
loss of `config.task` (float32), gradients, the official optimiser (`mprnet_jax.optim`). A step
whose loss or gradients are not finite changes neither the parameters nor the optimiser state;
it only counts itself (`nonfinite`, `skipped_total`), and the trainer stops after
`config.max_nonfinite` of them in a row (`check_nonfinite`).

Data parallelism (`parallel=`): 'none' (one device), 'mesh' (`jax.jit` over a 1-D `Mesh` with
the batch split on its 'data' axis; the loss is the mean over the global batch and XLA inserts
the gradient all-reduce; works across hosts), 'pmap' (`jax.pmap` with `lax.pmean` of the
per-device mean loss's gradients, which equals the gradient of the global mean because the
devices hold equal shares of the batch). All three give the numbers of one device on the
whole batch (tests/test_parallel.py).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mprnet_jax.augment import mixup
from mprnet_jax.builders import build_model, build_optimizer
from mprnet_jax.errors import ConfigError, NonFiniteTraining
from mprnet_jax.losses import mprnet_loss_terms
from mprnet_jax.model import MPRNet, MPRNetConfig, abstract_mprnet
from mprnet_jax.model import compute_dtype as model_compute_dtype
from mprnet_jax.layers import normalize_remat
from mprnet_jax.optim import learning_rate_schedule
from mprnet_jax.parallel import DATA_AXIS, one_device_mesh

__all__ = [
    'TrainState', 'check_nonfinite', 'compute_dtype', 'create_train_state', 'make_eval_step',
    'make_train_step'
]

PARALLEL_MODES = ('none', 'mesh', 'pmap')


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run carries from step to step (all arrays; checkpointable).

  step: int32 (), batches consumed (skipped steps included).
  params: nnx.State of the model's nnx.Param, float32.
  opt_state: the optax state; its schedule counter counts applied updates,
    i.e. step - skipped_total.
  rng: a typed key (`jax.random.key`), used for MixUp when the step is given no key.
  nonfinite: int32 (), consecutive skipped (non-finite) steps; 0 after a good step.
  skipped_total: int32 (), all skipped steps of the run.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite: jax.Array
  skipped_total: jax.Array


def compute_dtype(config):
  """The compute dtype of `config.model.dtype` ('float32' -> None, the model's default)."""
  model_config = config.get('model', None)
  name = model_config.get('dtype', 'float32') if model_config is not None else 'float32'
  try:
    return model_compute_dtype(name)
  except ValueError as error:
    raise ConfigError(f'config.model.{error}') from None


def _remat(config) -> str:
  model_config = config.get('model', None)
  try:
    return normalize_remat(model_config.get('remat', False) if model_config is not None else False)
  except ValueError as error:
    raise ConfigError(f'config.model.{error}') from None


def _graphdef_for(model_config: MPRNetConfig, config) -> tuple[nnx.GraphDef, Any]:
  """GraphDef (and abstract params) of an MPRNet of these sizes with the config's compute
  dtype and remat; built abstractly (no arrays allocated)."""
  abstract = abstract_mprnet(**model_config.to_dict(), dtype=compute_dtype(config),
                             remat=_remat(config))
  return nnx.split(abstract, nnx.Param)


def create_train_state(model: MPRNet | None, config, steps_per_epoch: int,
                       seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, state) to train `model` (or, when None, a new model from `config`).

  The graphdef is rebuilt with `config.model.dtype` as compute dtype and `config.model.remat`,
  whatever the model was built with; the parameters are copied (the step donates its state, and
  the caller's model stays usable) and must be float32.
  """
  if model is None:
    model = build_model(config, seed)
  _, params = nnx.split(model, nnx.Param)
  graphdef, abstract = _graphdef_for(model.config, config)
  expected = jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
  found = jax.tree.map(lambda a: (a.shape, a.dtype), params)
  if expected != found:
    raise ValueError('the model\'s parameters do not match an MPRNet of its sizes with float32 '
                     'parameters (build it with param_dtype=float32)')
  tx = build_optimizer(config, steps_per_epoch)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(step=zero, params=params, opt_state=tx.init(params), rng=jax.random.key(seed),
                     nonfinite=zero, skipped_total=zero)
  # Every leaf its own buffer: the step donates the state, and a buffer shared between leaves
  # (or with the caller's model) cannot be donated twice.
  return graphdef, jax.tree.map(jnp.copy, state)


def _check_parallel(parallel: str, mesh) -> None:
  if parallel not in PARALLEL_MODES:
    raise ValueError(f'parallel must be one of {", ".join(PARALLEL_MODES)}, got {parallel!r}')
  if parallel == 'mesh' and mesh is None:
    raise ValueError("parallel='mesh' needs a mesh (mprnet_jax.parallel.make_mesh())")


def make_train_step(graphdef: nnx.GraphDef, config, steps_per_epoch: int, *, parallel: str = 'none',
                    mesh=None):
  """The jitted training step `step_fn(state, batch, rng=None) -> (state, metrics)`.

  batch: {'input', 'target'}, float32 (B, H, W, 3), placed by `parallel.place_batch` (for
    'pmap', (devices, B / devices, H, W, 3)). rng: a key for MixUp, folded with the step
    (None: the state's own key). The state must be placed by `parallel.place_state`; it is
    donated. For 'none' and 'mesh', `step_fn.lower(state, batch, rng=None)` gives the jitted
    step's `Lowered` (ahead-of-time compilation); 'none' runs as a mesh of one device.
  metrics: float32 scalars `loss`, `charbonnier_sum`, `edge_sum` (tasks with the edge loss),
    `lr` (the rate this step's update used), `grad_norm`, `nonfinite` (1.0: update skipped).

  MixUp (`config.mixup_start_epoch` = s, not None) applies in 0-based epochs
  step // steps_per_epoch >= s, i.e. the official 1-based `if epoch > s`. With 'pmap', each
  device mixes within its own share of the batch (with its own key); with 'none' and 'mesh',
  partners come from the whole global batch.
  """
  _check_parallel(parallel, mesh)
  tx = build_optimizer(config, steps_per_epoch)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  task = config.task
  mixup_start = config.get('mixup_start_epoch', None)
  axis = 'data' if parallel == 'pmap' else None

  def loss_fn(params, inputs, targets):
    outputs = nnx.merge(graphdef, params)(inputs)
    terms = mprnet_loss_terms(outputs, targets, task)
    return terms['loss'], terms

  def step(state: TrainState, batch, rng):
    inputs = jnp.asarray(batch['input'], jnp.float32)
    targets = jnp.asarray(batch['target'], jnp.float32)
    if mixup_start is not None:
      key = jax.random.fold_in(state.rng if rng is None else rng, state.step)
      if axis is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))
      mixed_inputs, mixed_targets = mixup(key, inputs, targets)
      active = state.step // steps_per_epoch >= mixup_start
      inputs = jnp.where(active, mixed_inputs, inputs)
      targets = jnp.where(active, mixed_targets, targets)

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, inputs, targets)
    if axis is not None:
      # Each device's loss is the mean over its equal share: the mean of the shares' gradients
      # is the gradient of the global mean.
      grads = jax.lax.pmean(grads, axis)
      terms = jax.lax.pmean(terms, axis)
    # The checks run on all gradients as one vector: one reduction instead of one per parameter
    # tensor (about 400), which made XLA's compile of the step four times longer (BENCHMARKS.md).
    flat_grads = jax.flatten_util.ravel_pytree(grads)[0]
    ok = jnp.isfinite(terms['loss']) & jnp.isfinite(flat_grads).all()
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    def keep_if_ok(new, old):
      return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    skipped = (~ok).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=keep_if_ok(params, state.params),
                              opt_state=keep_if_ok(opt_state, state.opt_state),
                              nonfinite=jnp.where(ok, 0, state.nonfinite + 1).astype(jnp.int32),
                              skipped_total=state.skipped_total + skipped)
    metrics = {k: v.astype(jnp.float32) for k, v in terms.items()}
    metrics['lr'] = jnp.asarray(schedule(state.step - state.skipped_total), jnp.float32)
    metrics['grad_norm'] = jnp.linalg.norm(flat_grads).astype(jnp.float32)
    metrics['nonfinite'] = skipped.astype(jnp.float32)
    return new_state, metrics

  if parallel == 'pmap':
    return _PmapStep(jax.pmap(step, axis_name='data', in_axes=(0, 0, None), donate_argnums=(0,)))
  # 'none' is the mesh of one device: one code path for both.
  mesh = mesh if parallel == 'mesh' else one_device_mesh()
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
  return TrainStep(
      jax.jit(step, in_shardings=(replicated, data, replicated),
              out_shardings=(replicated, replicated), donate_argnums=(0,)))


class TrainStep:
  """The jitted step of 'none' and 'mesh': `step(state, batch, rng=None)`, and `lower(...)` for
  ahead-of-time compilation (e.g. on every process before the first step runs)."""

  def __init__(self, jitted):
    self.jitted = jitted

  def __call__(self, state, batch, rng=None):
    return self.jitted(state, batch, rng)

  def lower(self, state, batch, rng=None):
    return self.jitted.lower(state, batch, rng)


class _PmapStep:
  """The pmapped step; pmean made the metrics equal on every device, so they come back once,
  as scalars."""

  def __init__(self, mapped):
    self.mapped = mapped

  def __call__(self, state, batch, rng=None):
    state, metrics = self.mapped(state, batch, rng)
    return state, {k: v.addressable_data(0)[0] for k, v in metrics.items()}


def make_eval_step(graphdef: nnx.GraphDef, config):
  """`fn(params, inputs) -> restored`, on one device: the final stage output, (N, H, W, 3)
  float32 in [0, 1], for inputs (N, H, W, 3) and unplaced params (`parallel.unplace_state`)."""
  del config  # the compute dtype and remat are in the graphdef

  @jax.jit
  def forward(params, inputs):
    final = nnx.merge(graphdef, params)(jnp.asarray(inputs, jnp.float32))[0]
    return jnp.clip(final, 0.0, 1.0)

  return forward


def _host_max(value) -> int:
  """The largest entry of a (possibly replicated or device-stacked) integer array, on the host."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    value = value.addressable_data(0)
  return int(np.max(np.asarray(value)))


def check_nonfinite(state: TrainState, config) -> None:
  """Raises NonFiniteTraining once `config.max_nonfinite` consecutive steps were skipped."""
  limit = int(config.get('max_nonfinite', 5))
  consecutive = _host_max(state.nonfinite)
  if consecutive >= limit:
    raise NonFiniteTraining(
        f'training stopped: the last {consecutive} steps (up to step {_host_max(state.step)}) '
        f'had a non-finite loss or gradient and were skipped ({_host_max(state.skipped_total)} '
        f'skipped in all; config.max_nonfinite={limit}). Check the data for NaN/inf, lower the '
        f'learning rate, or train in float32.')

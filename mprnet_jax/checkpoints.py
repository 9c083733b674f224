"""Training checkpoints with orbax: the latest few (saved asynchronously) and the best by
validation PSNR, each holding everything a resumed run needs to continue the same trajectory.

Layout: `<workdir>/checkpoints/<step>/` with the orbax items
- `params`: the model parameters (an `nnx.State`), restorable alone (`load_model_from_workdir`);
- `train`: every other field of the `TrainState` (opt_state, step, rng, non-finite counters);
- `data`: the grain iterator state, one JSON file per process (grain's orbax handler);
- `config`: JSON {'model': MPRNet sizes, 'experiment': the experiment config, 'state_layout': a
  fingerprint of the training state's tree, shapes and dtypes}.
A run resumed with settings that change that layout (another optimiser, weight decay switched
on or off, another version's state) is refused with a one-line error before anything is moved;
only a checkpoint that cannot be read is set aside.
A checkpoint saved with a validation PSNR carries it as orbax metrics; the one with the highest
PSNR is kept whatever its age.

Multi-host: every process calls `save` / `restore` (orbax coordinates the writes to the shared
path); only process 0 prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

__all__ = ['TrainCheckpointer', 'load_model_from_workdir', 'checkpoint_dir']



class _QuietUntrackedMetrics(logging.Filter):
  """Orbax warns at every save without a PSNR ("did not provide metrics"): by design here,
  most checkpoints have none."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietUntrackedMetrics())


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir).absolute() / 'checkpoints'


def _best_metric(metrics) -> float:
  return float(metrics['psnr'])


class _IteratorSnapshot:
  """An iterator state frozen when `save` is called: the save itself may finish later, on
  orbax's thread, after the live iterator has moved on."""

  def __init__(self, state: dict):
    self._state = json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


class _IteratorReceiver:
  """Takes the state grain's handler reads back (as bytes) instead of a live iterator."""

  state: dict | None = None

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:
    pass


def _manager(directory: Path, keep: int, *, read_only: bool = False) -> ocp.CheckpointManager:
  import grain

  policy = preservation.AnyPreservationPolicy([
      preservation.LatestN(n=max(int(keep), 1)),
      preservation.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else policy, best_fn=_best_metric, best_mode='max',
      enable_async_checkpointing=not read_only, read_only=read_only, create=not read_only,
      save_interval_steps=0 if read_only else 1)
  handlers = {'params': ocp.StandardCheckpointHandler(), 'train': ocp.StandardCheckpointHandler(),
              'data': grain.checkpoint.CheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _train_fields(state) -> dict[str, Any]:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != 'params'}


def state_layout(state) -> str:
  """A short fingerprint of what a TrainState holds: its tree (optax state types included),
  and every leaf's shape and dtype. Two states restore into each other iff these agree."""
  leaves, treedef = jax.tree_util.tree_flatten(_abstract(state))
  text = repr((str(treedef), [(tuple(a.shape), str(a.dtype)) for a in leaves]))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class TrainCheckpointer:
  """Saves and restores `(TrainState, loader state)` under `<workdir>/checkpoints`.

  Args:
    workdir: the run's folder.
    keep: most recent checkpoints kept (besides the best by PSNR); at least 2 leaves a
      fallback when the newest turns out unreadable.
    model_config: the MPRNet sizes (a dict), stored so a checkpoint alone rebuilds the model.
    experiment_config: the experiment config as a plain dict.
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 2,
               model_config: dict | None = None, experiment_config: dict | None = None):
    self.directory = checkpoint_dir(workdir)
    self._manager = _manager(self.directory, keep)
    self._config = {'model': model_config or {}, 'experiment': experiment_config or {}}

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    steps_with_metrics = [i.step for i in self._manager._checkpoints if i.metrics is not None]  # noqa: SLF001
    return self._manager.best_step() if steps_with_metrics else None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state, loader_state: dict, *, psnr: float | None = None) -> bool:
    """Starts saving `state` (host or device arrays) at step `state.step`; returns at once
    while the write finishes in the background. `psnr`: validation PSNR at this step."""
    step = state.step
    if isinstance(step, jax.Array) and not step.is_fully_addressable:
      step = step.addressable_data(0)  # replicated over several processes
    step = int(jax.device_get(step))
    if step in self._manager.all_steps():
      return False  # already saved (e.g. the final save right after a periodic one)
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave(_train_fields(state)),
        data=_grain_save(_IteratorSnapshot(loader_state)),
        config=ocp.args.JsonSave({**self._config, 'state_layout': state_layout(state)}))
    metrics = {'psnr': float(psnr)} if psnr is not None else None
    return self._manager.save(step, args=args, metrics=metrics, force=True)

  def restore_step(self, step: int, target_state) -> tuple[Any, dict]:
    """(state, loader state) of checkpoint `step`, shaped like `target_state`."""
    receiver = _IteratorReceiver()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target_state.params)),
        train=ocp.args.StandardRestore(_abstract(_train_fields(target_state))),
        data=_grain_restore(receiver)))
    state = target_state.replace(params=restored['params'], **restored['train'])
    if receiver.state is None:
      raise ValueError(f'checkpoint {step} has no data-iterator state')
    return state, receiver.state

  def restore_latest(self, target_state) -> tuple[Any, dict, int] | None:
    """(state, loader state, step) of the newest readable checkpoint, or None if there is none.

    A checkpoint that fails to restore (truncated or missing files) is reported with a
    warning, moved aside to `<step>.corrupt`, and the previous one is tried.
    """
    expected = state_layout(target_state)
    for step in sorted(self._manager.all_steps(), reverse=True):
      saved = self._saved_layout(step)
      if saved is not None and saved != expected:
        raise ValueError(
            f'checkpoint {self.directory / str(step)} holds a training state of another layout '
            '(a different optimiser or weight decay, or another mprnet-jax version): resume '
            'with the settings it was trained with, or train in a new workdir')
      try:
        state, loader_state = self.restore_step(step, target_state)
        return state, loader_state, step
      except Exception as error:  # any unreadable file: try the next older checkpoint
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        message = (f'checkpoint {self.directory / str(step)} is unreadable '
                   f'({type(error).__name__}: {reason}); moved it to {step}.corrupt and '
                   f'falling back to the previous checkpoint')
        if jax.process_index() == 0:
          warnings.warn(message, RuntimeWarning, stacklevel=2)
        self._set_aside(step)
    return None

  def _saved_layout(self, step: int) -> str | None:
    """The state-layout fingerprint a checkpoint was saved with; None if unreadable or absent
    (then restoring it decides)."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))
      return restored['config'].get('state_layout')
    except Exception:  # an unreadable config: the restore below reports the checkpoint
      return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      path = self.directory / str(step)
      if path.exists():
        target = path.with_name(f'{step}.corrupt')
        suffix = 1
        while target.exists():
          target, suffix = path.with_name(f'{step}.corrupt{suffix}'), suffix + 1
        os.replace(path, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'mprnet_checkpoint_set_aside_{step}')
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _grain_save(snapshot):
  import grain
  return grain.checkpoint.CheckpointSave(snapshot)


def _grain_restore(receiver):
  import grain
  return grain.checkpoint.CheckpointRestore(receiver)


def read_checkpoint_config(workdir: str | os.PathLike, step: int | None = None) -> dict:
  """The {'model', 'experiment'} config JSON stored with a checkpoint (default: latest)."""
  manager = _manager(checkpoint_dir(workdir), 1, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}')
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def load_model_from_workdir(workdir: str | os.PathLike, dtype=None):
  """The MPRNet of a training run's best checkpoint (highest validation PSNR), else its
  latest; parameters only, no optimiser state is read."""
  from mprnet_jax.model import MPRNet
  from mprnet_jax.torch_format import CheckpointError

  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise CheckpointError(f'{workdir}: not a training workdir (no checkpoints/ folder)')
  manager = _manager(directory, 1, read_only=True)
  with_metrics = [i.step for i in manager._checkpoints if i.metrics is not None]  # noqa: SLF001
  step = manager.best_step() if with_metrics else manager.latest_step()
  if step is None:
    raise CheckpointError(f'{directory}: holds no finished checkpoint')
  config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  sizes = dict(config['model'])
  model = MPRNet(**sizes, dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(params))))['params']
  manager.close()
  return nnx.merge(graphdef, restored, rest)

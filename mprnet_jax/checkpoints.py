"""Training checkpoints with orbax: the latest few (saved asynchronously) and the best by
validation PSNR, each holding everything a resumed run needs to continue the same trajectory.

Layout: `<workdir>/checkpoints/<step>/` with the orbax items
- `params`: the model parameters (an `nnx.State`), restorable alone (`load_model_from_workdir`);
- `train`: every other field of the `TrainState` (opt_state, step, rng, non-finite counters);
- `data`: the grain iterator state, one JSON file per process (grain's orbax handler);
- `config`: JSON {'model': MPRNet sizes, 'experiment': the experiment config,
  'state_layout_paths': a fingerprint of the training state's key paths, shapes and dtypes,
  'checksums': CRC-32 of every array's bytes, by item and key path}.
A run resumed with settings that change that layout (another optimiser, weight decay switched
on or off, another version's state) is refused with a one-line error before anything is moved.
A checkpoint that cannot be read, or whose arrays do not match their checksums (a flipped bit,
a truncated file), is set aside as `<step>.corrupt` and the previous one is used, with one
warning line. Orbax checksums only its shard indices, not the array data, hence our own.
Checkpoints written before the checksums and the path-based fingerprint (an older
`state_layout` field, or none) still load: what they lack is not checked.
A checkpoint saved with a validation PSNR carries it as orbax metrics; the one with the highest
PSNR is kept whatever its age.

Multi-host: every process calls `save` / `restore` (orbax coordinates the writes to the shared
path); only process 0 prints.

A workdir may be a bucket (`gs://...`): orbax writes there itself (through tensorstore), and on
GCS it commits a checkpoint by writing `<step>/commit_success.txt` last instead of renaming a
temporary folder, so an unfinished save is a `<step>` folder without that file. The few file
operations of our own (removing unfinished saves, setting a checkpoint aside, the lock) go
through `storage` for a URL; a local workdir takes the same local code as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import grain
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from mprnet_jax import storage
from mprnet_jax.errors import CheckpointError, MprnetError, StorageError

__all__ = [
    'TrainCheckpointer', 'WorkdirLock', 'load_model_from_workdir', 'checkpoint_dir',
    'read_checkpoint_config', 'state_layout', 'validate_model_sizes'
]


class _QuietUntrackedMetrics(logging.Filter):
  """Orbax warns at every save without a PSNR ("did not provide metrics"): by design here,
  most checkpoints have none."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietUntrackedMetrics())


class _OrbaxNoise(logging.Filter):
  """Drops what orbax (and the asyncio loops of its threads) log about a failing read or
  write: the caller reports the failure itself, in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
      return True
    from_orbax = f'{os.sep}orbax{os.sep}' in (record.pathname or '')
    return not (from_orbax or record.name == 'asyncio' or
                'Event loop is closed' in record.getMessage())


_NOISE_FILTER = _OrbaxNoise()
_quiet_depth = 0
_quiet_lock = threading.Lock()
_saved_hooks: tuple = ()


def _is_event_loop_closed(error) -> bool:
  return isinstance(error, RuntimeError) and 'Event loop is closed' in str(error)


_ORBAX_PATH = f'{os.sep}orbax{os.sep}'


def _raised_in_orbax(trace) -> bool:
  while trace is not None:
    if _ORBAX_PATH in trace.tb_frame.f_code.co_filename:
      return True
    trace = trace.tb_next
  return False


class _AbandonedOrbaxTasks(logging.Filter):
  """asyncio's "Task exception was never retrieved" for the writes orbax leaves running when
  one part of a save fails (it reports the first failure, which we turn into one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      error = record.exc_info[1] if record.exc_info else None
      mentions = _ORBAX_PATH in record.getMessage() or 'tensorstore' in record.getMessage()
      return not (mentions or _raised_in_orbax(getattr(error, '__traceback__', None)) or
                  _is_event_loop_closed(error))
    except Exception:  # noqa: BLE001 (a filter must never raise; keep the record)
      return True


_lasting_filters_installed = False


def _install_lasting_filters() -> None:
  """Once checkpoints are used: the reports orbax's abandoned tasks make later (when they are
  garbage-collected, or at interpreter exit: asyncio's "never retrieved", "Event loop is
  closed", "Exception ignored in <coroutine ...>") are dropped, since the failure they follow
  was already reported in one line. Anything not from orbax passes unchanged."""
  global _lasting_filters_installed
  if _lasting_filters_installed:
    return
  _lasting_filters_installed = True
  logging.getLogger('asyncio').addFilter(_AbandonedOrbaxTasks())
  previous = sys.unraisablehook

  def unraisable(report):
    try:
      if _is_event_loop_closed(report.exc_value) or _raised_in_orbax(report.exc_traceback) \
          or _ORBAX_PATH in repr(report.object):
        return
    except Exception:  # noqa: BLE001 (at interpreter exit: fall through to the default)
      pass
    previous(report)

  sys.unraisablehook = unraisable


@contextlib.contextmanager
def _quiet_orbax():
  """While active (re-entrant, process-wide): orbax's log records of warning level and above,
  asyncio's "Event loop is closed" reports (from orbax's worker threads' loops, at garbage
  collection) and exceptions escaping orbax's threads stay off the terminal."""
  global _quiet_depth, _saved_hooks
  with _quiet_lock:
    _quiet_depth += 1
    if _quiet_depth == 1:
      _install_lasting_filters()
      previous_unraisable, previous_thread_hook = sys.unraisablehook, threading.excepthook

      def unraisable(report):
        if not _is_event_loop_closed(report.exc_value):
          previous_unraisable(report)

      def thread_hook(args):
        if not _raised_in_orbax(args.exc_traceback):
          previous_thread_hook(args)

      _saved_hooks = (previous_unraisable, previous_thread_hook)
      sys.unraisablehook, threading.excepthook = unraisable, thread_hook
      for name in ('absl', 'orbax', 'asyncio'):
        logging.getLogger(name).addFilter(_NOISE_FILTER)
  try:
    yield
  finally:
    with _quiet_lock:
      _quiet_depth -= 1
      if _quiet_depth == 0:
        sys.unraisablehook, threading.excepthook = _saved_hooks
        for name in ('absl', 'orbax', 'asyncio'):
          logging.getLogger(name).removeFilter(_NOISE_FILTER)


def checkpoint_dir(workdir: str | os.PathLike) -> Path | epath.Path:
  """`<workdir>/checkpoints`: a local absolute Path, or an `epath.Path` (what orbax takes) for
  a bucket URL."""
  if storage.is_remote(workdir):
    return epath.Path(storage.join(workdir, 'checkpoints'))
  return Path(workdir).absolute() / 'checkpoints'


def _forget_listings(directory) -> None:
  """After our own changes to a bucket folder: drops the listings that orbax's filesystem
  (epath's cached gcsfs) may hold, so its next listing sees them."""
  if isinstance(directory, Path):
    return
  with contextlib.suppress(Exception):
    epath.backend.fsspec_backend.fs(os.fspath(directory)).invalidate_cache()


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


def _manager(directory, keep: int, *, read_only: bool = False) -> ocp.CheckpointManager:

  policy = preservation.AnyPreservationPolicy([
      preservation.LatestN(n=max(int(keep), 1)),
      preservation.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=None if read_only else policy,
                                         best_fn=_best_metric, best_mode='max',
                                         enable_async_checkpointing=not read_only,
                                         read_only=read_only, create=not read_only,
                                         save_interval_steps=0 if read_only else 1)
  handlers = {
      'params': ocp.StandardCheckpointHandler(), 'train': ocp.StandardCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(), 'config': ocp.JsonCheckpointHandler()
  }
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _best_step(manager: ocp.CheckpointManager) -> int | None:
  """The step with the highest PSNR, or None when no checkpoint carries one (orbax's
  `best_step` would then answer the latest)."""
  scored = [step for step in manager.all_steps() if manager.metrics(step) is not None]
  return manager.best_step() if scored else None


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _on_this_host(tree):
  """Shapes and dtypes of `tree` placed on this process's first device: restored there whatever
  devices or hosts wrote the checkpoint (without a placement, orbax asks for the writers')."""
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), tree)


def _train_fields(state) -> dict[str, Any]:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != 'params'}


def state_layout(state) -> str:
  """A short fingerprint of what a TrainState holds: every leaf's key path, shape and dtype.
  Two states restore into each other iff these agree. Key paths, unlike the printed treedef,
  do not change when flax or optax change how they print their types."""
  leaves = jax.tree_util.tree_flatten_with_path(_abstract(state))[0]
  text = json.dumps([[jax.tree_util.keystr(path),
                      list(leaf.shape),
                      str(leaf.dtype)] for path, leaf in leaves])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _legacy_state_layout(state) -> str:
  """The fingerprint checkpoints carried before `state_layout` (as 'state_layout'): it hashes
  the printed treedef, so another flax or optax may print the same layout differently."""
  leaves, treedef = jax.tree_util.tree_flatten(_abstract(state))
  text = repr((str(treedef), [(tuple(a.shape), str(a.dtype)) for a in leaves]))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _host_bytes(leaf) -> np.ndarray | None:
  """The bytes of one array as this process sees them; None where this process holds only
  part of it (a sharded global array: it is checked by the processes that hold it whole)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:
      if not leaf.sharding.is_fully_replicated:
        return None
      leaf = leaf.addressable_data(0)
  array = np.ascontiguousarray(np.asarray(leaf))
  return array.reshape(-1).view(np.uint8)


def _checksums(tree) -> dict[str, str]:
  """{key path: CRC-32 of the array's bytes} for every leaf this process holds whole."""
  sums = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    data = _host_bytes(leaf)
    if data is not None:
      sums[jax.tree_util.keystr(path)] = f'{zlib.crc32(data):08x}'
  return sums


def _verify_checksums(tree, expected: dict | None, what: str) -> None:
  """Raises CheckpointError if an array of `tree` differs from the bytes it was saved with.
  Nothing to check (`expected` None) in checkpoints written before checksums existed."""
  if not isinstance(expected, dict):
    return
  for name, crc in _checksums(tree).items():
    if expected.get(name) != crc:
      raise CheckpointError(f'{what} {name} does not match its checksum (a damaged file)')


def _step_of(state) -> int:
  step = state.step
  if isinstance(step, jax.Array) and not step.is_fully_addressable:
    step = step.addressable_data(0)  # replicated over several processes
  return int(jax.device_get(step))


def _one_line(error: BaseException) -> str:
  reason = str(error).strip().splitlines()[0] if str(error).strip() else ''
  # TensorStore appends its whole JSON spec; the sentence before it says what failed.
  for tail in ('. See full TensorStore details', ' [tensorstore_spec'):
    reason = reason.split(tail)[0]
  reason = reason[:300]
  return f'{type(error).__name__}: {reason}' if reason else type(error).__name__


class TrainCheckpointer:
  """Saves and restores `(TrainState, loader state)` under `<workdir>/checkpoints`.

  Args:
    workdir: the run's folder.
    keep: most recent checkpoints kept (besides the best by PSNR); at least 2 leaves a
      fallback when the newest turns out unreadable.
    model_config: the MPRNet sizes (a dict), stored so a checkpoint alone rebuilds the model.
    experiment_config: the experiment config as a plain dict.
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, model_config: dict | None = None,
               experiment_config: dict | None = None):
    self.directory = checkpoint_dir(workdir)
    self._remote = not isinstance(self.directory, Path)
    self._manager = _manager(self.directory, keep)
    self._config = {'model': model_config or {}, 'experiment': experiment_config or {}}
    self._pending: int | None = None  # the step of a save started and not yet committed
    # Held from the first save until `wait`: orbax's thread may fail after `save` returned.
    self._quiet_while_saving = contextlib.ExitStack()
    self._quiet_held = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def discard_unfinished_saves(self) -> list[str]:
    """Removes the temporary folders (`<step>.orbax-checkpoint-tmp*`) of saves that never
    committed (a full disk, kill -9, a second Ctrl-C); returns their names. Orbax never lists
    them as steps; this keeps them from piling up. Only for the run that holds the workdir's
    lock: another's save in flight looks the same."""
    removed = []
    if jax.process_index() == 0 and self._remote:
      removed = self._discard_unfinished_remote()
    elif jax.process_index() == 0 and self.directory.is_dir():
      for path in sorted(self.directory.glob('*.orbax-checkpoint-tmp*')):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('mprnet_checkpoint_discard_unfinished')
    if self._remote:  # every process: process 0 may have removed what the others listed
      _forget_listings(self.directory)
      self._manager.reload()
    return removed

  def _discard_unfinished_remote(self) -> list[str]:
    """In a bucket: step folders without orbax's commit file (`commit_success.txt`, written
    last), and any temporary folders, e.g. from a workdir copied up from a disk."""
    url = os.fspath(self.directory)
    removed = []
    for name in storage.list_names(url):
      unfinished = '.orbax-checkpoint-tmp' in name or (
          name.isdigit() and not storage.exists(storage.join(url, name, 'commit_success.txt')))
      if unfinished:
        storage.remove_tree(storage.join(url, name))
        removed.append(name)
    return removed

  def best_step(self) -> int | None:
    return _best_step(self._manager)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, state, loader_state: dict, *, psnr: float | None = None) -> bool:
    """Starts saving `state` (host or device arrays) at step `state.step`; returns at once
    while the write finishes in the background (`wait` blocks until it is committed).
    `psnr`: validation PSNR at this step. A failed write raises CheckpointError (here or at
    the next `save`/`wait`) and leaves no step folder behind (only its temporary folder, which
    is never listed as a step; the next run removes it)."""
    step = _step_of(state)
    self._check_previous_save()
    if step in self._manager.all_steps():
      return False  # already saved (e.g. the final save right after a periodic one)
    config = {
        **self._config, 'state_layout_paths': state_layout(state), 'checksums': {
            'params': _checksums(state.params), 'train': _checksums(_train_fields(state))
        }
    }
    args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                              train=ocp.args.StandardSave(_train_fields(state)),
                              data=_grain_save(_IteratorSnapshot(loader_state)),
                              config=ocp.args.JsonSave(config))
    metrics = {'psnr': float(psnr)} if psnr is not None else None
    self._pending = step
    if not self._quiet_held:
      self._quiet_while_saving.enter_context(_quiet_orbax())
      self._quiet_held = True
    try:
      with _quiet_orbax():
        return self._manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as error:
      self._save_failed(step, error)

  def _check_previous_save(self) -> None:
    """Raises CheckpointError if the save in flight failed on orbax's thread."""
    if self._pending is None:
      return
    try:
      with _quiet_orbax():
        self._manager.check_for_errors()
    except Exception as error:
      self._save_failed(self._pending, error)

  def _save_failed(self, step: int, error: BaseException):
    self._pending = None
    deadline = time.time() + 60
    while self._manager.is_saving_in_progress() and time.time() < deadline:
      time.sleep(0.05)
    self._remove_partial(step)
    self._quiet_while_saving.close()
    self._quiet_held = False
    raise CheckpointError(
        f'saving the checkpoint of step {step} in {self.directory} failed ({_one_line(error)}); '
        'the run resumes from the last complete checkpoint') from error

  def _remove_partial(self, step: int) -> None:
    """Removes a step folder a failed save of `step` may have left unlisted by orbax, so that
    nothing half-written is ever taken for a checkpoint. Its temporary folder
    (`<step>.orbax-checkpoint-tmp*`, which orbax never lists) is left to the next run
    (`discard_unfinished_saves`): orbax's writes of the other items may still land in it."""
    if jax.process_index() != 0:
      return
    if self._remote:
      # In a bucket the step folder is where orbax writes (no temporary folder): what a failed
      # save left there is removed now; writes still landing are the next run's to remove.
      with contextlib.suppress(Exception):
        _forget_listings(self.directory)
        self._manager.reload()
        if step not in self._manager.all_steps():
          storage.remove_tree(os.fspath(self.directory / str(step)))
          _forget_listings(self.directory)
      return
    if not self.directory.is_dir():
      return
    with contextlib.suppress(Exception):
      self._manager.reload()
    if (self.directory / str(step)).exists() and step not in self._manager.all_steps():
      shutil.rmtree(self.directory / str(step), ignore_errors=True)

  def restore_step(self, step: int, target_state) -> tuple[Any, dict]:
    """(state, loader state) of checkpoint `step`, shaped like `target_state`; raises
    CheckpointError if an array does not match its checksum."""
    receiver = _IteratorReceiver()
    with _quiet_orbax():
      restored = self._manager.restore(
          step, args=ocp.args.Composite(
              params=ocp.args.StandardRestore(_abstract(target_state.params)),
              train=ocp.args.StandardRestore(_abstract(_train_fields(target_state))),
              data=_grain_restore(receiver)))
    config = self._saved_config(step)
    if config is None:  # every version wrote it: a damaged checkpoint
      raise CheckpointError(f'checkpoint {step}: its config is unreadable')
    sums = config.get('checksums')
    sums = sums if isinstance(sums, dict) else {}
    _verify_checksums(restored['params'], sums.get('params'), 'parameter')
    _verify_checksums(restored['train'], sums.get('train'), 'training state')
    state = target_state.replace(params=restored['params'], **restored['train'])
    if receiver.state is None:
      raise CheckpointError(f'checkpoint {step} has no data-iterator state')
    return state, receiver.state

  def restore_latest(self, target_state) -> tuple[Any, dict, int] | None:
    """(state, loader state, step) of the newest readable checkpoint, or None if there is none.

    A checkpoint that fails to restore (truncated or missing files, arrays that do not match
    their checksums) is reported in one warning line, moved aside to `<step>.corrupt`, and the
    previous one is tried.
    """
    expected, legacy = state_layout(target_state), _legacy_state_layout(target_state)
    for step in sorted(self._manager.all_steps(), reverse=True):
      saved = self._saved_config(step) or {}
      if 'state_layout_paths' in saved:
        known_mismatch, maybe_mismatch = saved['state_layout_paths'] != expected, False
      else:
        # Older checkpoints: the fingerprint of the printed treedef, which another flax or optax
        # may print differently; a mismatch only explains a failed restore.
        known_mismatch = False
        maybe_mismatch = saved.get('state_layout', legacy) != legacy
      if known_mismatch:
        raise self._layout_error(step)
      try:
        state, loader_state = self.restore_step(step, target_state)
        return state, loader_state, step
      except Exception as error:  # any unreadable file: try the next older checkpoint
        if maybe_mismatch:
          raise self._layout_error(step) from error
        _warn(f'checkpoint {self.directory / str(step)} is unreadable ({_one_line(error)}); '
              f'moved it to {step}.corrupt and falling back to the previous checkpoint')
        self._set_aside(step)
    return None

  def _layout_error(self, step: int) -> CheckpointError:
    return CheckpointError(
        f'checkpoint {self.directory / str(step)} holds a training state of another layout '
        '(a different optimiser or weight decay, or another mprnet-jax version): resume '
        'with the settings it was trained with, or train in a new workdir')

  def _saved_config(self, step: int) -> dict | None:
    """The config JSON a checkpoint was saved with; None if unreadable or not a JSON object
    (then restoring the arrays decides)."""
    try:
      with _quiet_orbax():
        restored = self._manager.restore(step,
                                         args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      config = restored['config']
      return config if isinstance(config, dict) else None
    except Exception:  # an unreadable config: the restore of the arrays reports the checkpoint
      return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0 and self._remote:
      url = os.fspath(self.directory)
      names = set(storage.list_names(url))
      if str(step) in names:
        target, suffix = f'{step}.corrupt', 1
        while target in names:
          target, suffix = f'{step}.corrupt{suffix}', suffix + 1
        storage.move_tree(storage.join(url, str(step)), storage.join(url, target))
    elif jax.process_index() == 0:
      path = self.directory / str(step)
      if path.exists():
        target = path.with_name(f'{step}.corrupt')
        suffix = 1
        while target.exists():
          target, suffix = path.with_name(f'{step}.corrupt{suffix}'), suffix + 1
        os.replace(path, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'mprnet_checkpoint_set_aside_{step}')
    if self._remote:
      # Every process: a listing cached before process 0 moved the step would still show it,
      # and a process that believes a step saved skips the save the others make.
      _forget_listings(self.directory)
    self._manager.reload()

  def wait(self, poll_s: float = 0.05, give_up=None) -> None:
    """Blocks until every started save is committed; raises CheckpointError if one failed.
    Polls instead of blocking inside orbax, so that an interrupt arrives here, not in the
    middle of orbax's machinery; raises KeyboardInterrupt as soon as `give_up()` is true."""
    while self._manager.is_saving_in_progress():
      if give_up is not None and give_up():
        raise KeyboardInterrupt
      time.sleep(poll_s)
    try:
      with _quiet_orbax():
        self._manager.wait_until_finished()
    except Exception as error:
      self._save_failed(self._pending if self._pending is not None else -1, error)
    self._pending = None
    self._quiet_while_saving.close()
    self._quiet_held = False

  @property
  def saving(self) -> bool:
    """Whether a save was started and not yet committed."""
    return self._pending is not None and self._manager.is_saving_in_progress()

  def abandon(self) -> None:
    """Stops tracking a save in flight without waiting for it (after a second Ctrl-C). What it
    leaves uncommitted is a temporary folder that no step lists and the next run removes."""
    self._pending = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      with _quiet_orbax(), contextlib.suppress(Exception):
        self._manager.close()


class WorkdirLock:
  """One trainer per workdir: `<workdir>/trainer.lock` (or `trainer.process_<i>.lock` for
  process i > 0 of a multi-host run, so that each process of a second run meets its own lock)
  holds the holder's host and pid. A lock left by a trainer that died (its pid gone on this
  host) is taken over; any other makes `acquire` raise a one-line MprnetError before anything
  in the workdir is touched. A lock from another host cannot be checked: the message says
  which file to delete if that trainer is gone.

  In a bucket (`gs://...`) the lock is an object created only if absent (GCS's
  `ifGenerationMatch=0`, one request), as exclusive as the local O_EXCL file: of two trainers
  starting together exactly one gets it. Through stores without that precondition (gcsfs
  decides) it would be advisory only.

  Use as a context manager, or `acquire()` / `release()`.
  """

  # A lock file still empty this long after it was created belongs to a trainer that died
  # between creating and writing it.
  _EMPTY_GRACE_S = 10.0

  def __init__(self, workdir: str | os.PathLike, process_index: int | None = None):
    index = jax.process_index() if process_index is None else process_index
    name = 'trainer.lock' if index == 0 else f'trainer.process_{index}.lock'
    self._remote = storage.is_remote(workdir)
    if self._remote:
      self.workdir = os.fspath(workdir).rstrip('/')
      self.path = storage.join(self.workdir, name)
    else:
      self.workdir = Path(workdir).absolute()
      self.path = self.workdir / name
    self._held = False
    self._created_workdir = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self) -> None:
    if self._remote:
      self._acquire_remote()
      return
    self._created_workdir = not self.workdir.exists()
    self.workdir.mkdir(parents=True, exist_ok=True)
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time()}
    for _ in range(3):  # a stale lock removed by us (or a racing trainer): try again
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None or not self._is_stale(holder):
          raise self._busy(holder) from None
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self._held = True
      return
    raise self._busy(self._holder())

  def _acquire_remote(self) -> None:
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time()}
    for _ in range(3):
      if storage.create_exclusive(self.path, json.dumps(me)):
        self._held = True
        return
      holder = self._holder()
      if holder is None:
        continue  # released meanwhile
      if not self._is_stale(holder):
        raise self._busy(holder)
      storage.remove(self.path)
    raise self._busy(self._holder())

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    holder = self._holder()
    if holder and holder.get('host') == socket.gethostname() and holder.get('pid') == os.getpid():
      if self._remote:
        storage.remove(self.path)  # a bucket has no folder to remove
        return
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
    if self._created_workdir:  # a run that stopped before writing anything leaves no folder
      with contextlib.suppress(OSError):
        self.workdir.rmdir()

  def _holder(self) -> dict | None:
    """The lock's content; {} if it is empty or unreadable; None if it is gone."""
    if self._remote:
      try:
        text = storage.read_text(self.path)
      except StorageError:
        return None if not storage.exists(self.path) else {}
    else:
      try:
        text = self.path.read_text()
      except FileNotFoundError:
        return None
      except OSError:
        return {}
    try:
      holder = json.loads(text)
    except ValueError:
      return {}
    return holder if isinstance(holder, dict) else {}

  def _is_stale(self, holder: dict) -> bool:
    pid = holder.get('pid')
    if not holder or not isinstance(pid, int) or isinstance(pid, bool):
      if self._remote:
        age = storage.age_s(self.path)
        return age is None or age > self._EMPTY_GRACE_S
      try:
        return time.time() - self.path.stat().st_mtime > self._EMPTY_GRACE_S
      except FileNotFoundError:
        return True
    if holder.get('host') != socket.gethostname():
      return False
    if pid == os.getpid():
      return False  # another trainer in this very process (a thread)
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      return False  # alive, another user's
    return False

  def _busy(self, holder: dict | None) -> MprnetError:
    who = (f'pid {holder.get("pid")} on {holder.get("host")}' if holder else 'another trainer')
    return MprnetError(
        f'{self.workdir} is in use by another trainer ({who}); wait for it to finish or stop '
        f'it, or delete {self.path} if no trainer is running there')


def _grain_save(snapshot):
  return grain.checkpoint.CheckpointSave(snapshot)


def _grain_restore(receiver):
  return grain.checkpoint.CheckpointRestore(receiver)


def read_checkpoint_config(workdir: str | os.PathLike, step: int | None = None) -> dict:
  """The {'model', 'experiment'} config JSON stored with a checkpoint (default: latest)."""
  manager = _manager(checkpoint_dir(workdir), 1, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}')
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


# Far above any MPRNet anyone trains (the official ones have n_feat <= 96, num_cab 8), far
# below what would exhaust memory before a shape is compared.
_SIZE_LIMITS = {
    'n_feat': 1024, 'scale_unetfeats': 1024, 'scale_orsnetfeats': 1024, 'num_cab': 64,
    'kernel_size': 15, 'reduction': 1024, 'in_c': 64, 'out_c': 64
}


class _BadStoredSizes(CheckpointError):
  """Stored model sizes that are wrong in themselves (not damage): no fallback to an older
  checkpoint, which was written by the same run."""


def validate_model_sizes(sizes, where: str) -> dict:
  """The MPRNet sizes stored at `where`, checked for type and range before any model is built
  from them; CheckpointError naming the field otherwise."""
  from mprnet_jax.model import MPRNetConfig

  if not isinstance(sizes, dict):
    raise _BadStoredSizes(f'{where}: the stored model sizes are not a JSON object')
  known = {f.name for f in dataclasses.fields(MPRNetConfig)}
  unknown = sorted(set(sizes) - known)
  if unknown:
    raise _BadStoredSizes(f'{where}: unknown model size(s) {", ".join(map(str, unknown))}')
  for name, value in sizes.items():
    if name == 'bias':
      if not isinstance(value, bool):
        raise _BadStoredSizes(f'{where}: model size bias must be true or false, got {value!r}')
      continue
    limit = _SIZE_LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
      raise _BadStoredSizes(f'{where}: model size {name} must be an integer from 1 to {limit}, '
                            f'got {value!r}')
  return dict(sizes)


def _path_name(path) -> str:
  """'a/b/0/kernel' for a key path, whether its keys are dict keys, attributes or indices
  (orbax's metadata tree and an nnx.State spell the same path differently)."""
  names = [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path]
  return '/'.join(str(n) for n in names)


def _model_matching_checkpoint(manager, step: int, directory: Path, dtype):
  """An MPRNet of the sizes stored with checkpoint `step`, once they are known to give the
  parameter shapes the checkpoint holds (compared abstractly: nothing allocated before); its
  parameters are abstract (shapes and dtypes) where it has no other state."""
  from mprnet_jax.model import MPRNet, abstract_mprnet

  where = f'checkpoint {directory / str(step)}'
  try:
    with _quiet_orbax():
      config = manager.restore(step,
                               args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  except Exception as error:
    raise CheckpointError(f'{where}: its config is unreadable ({_one_line(error)})') from error
  if not isinstance(config, dict):
    raise CheckpointError(f'{where}: its config is not a JSON object')
  sizes = validate_model_sizes(config.get('model'), where)

  def build():
    return MPRNet(**sizes, dtype=dtype, rngs=nnx.Rngs(0))

  try:
    abstract = abstract_mprnet(**sizes, dtype=dtype)
  except Exception as error:  # sizes the network cannot be built with (e.g. n_feat < reduction)
    raise _BadStoredSizes(f'{where}: no MPRNet has the stored sizes {sizes} '
                          f'({_one_line(error)})') from error
  expected = nnx.state(abstract, nnx.Param)
  try:
    with _quiet_orbax():
      stored = manager.item_metadata(step)['params']
  except Exception as error:
    raise CheckpointError(f'{where}: its parameters are unreadable ({_one_line(error)})') from error
  want = {
      _path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  have = {
      _path_name(p): tuple(getattr(x, 'shape', None) or ())
      for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]
  }
  if want != have:
    differing = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise _BadStoredSizes(f'{where}: the stored model sizes {sizes} do not match its parameters '
                          f'({len(differing)} differ, e.g. {differing[0]}: '
                          f'{have.get(differing[0])} stored, {want.get(differing[0])} expected)')
  # The parameters are replaced by the checkpoint's: the abstract model will do, unless it
  # holds state besides its parameters (then built for real, to carry that state's values).
  if jax.tree.leaves(nnx.state(abstract, nnx.Not(nnx.Param))):
    return build(), config
  return abstract, config


def load_model_from_workdir(workdir: str | os.PathLike, dtype=None):
  """The MPRNet of a training run's best checkpoint (highest validation PSNR), else its
  latest; parameters only, no optimiser state is read. The stored sizes are checked against
  the stored parameter shapes before the model is built, and the parameters against their
  checksums. A checkpoint that fails either is reported in one warning line and the next
  (newest first) is used; CheckpointError, with the first one's reason, if none is usable."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise CheckpointError(f'{workdir}: not a training workdir (no checkpoints/ folder)')
  with _quiet_orbax():
    manager = _manager(directory, 1, read_only=True)
  try:
    best = _best_step(manager)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f'{directory}: holds no finished checkpoint')
    candidates = ([best] if best is not None else []) + [s for s in steps if s != best]
    first_error = None
    for step in candidates:
      try:
        return _load_params(manager, step, directory, dtype)
      except _BadStoredSizes:
        raise
      except CheckpointError as error:
        first_error = first_error or error
        if step != candidates[-1]:
          _warn(f'{error}; using an older checkpoint')
    raise first_error
  finally:
    with _quiet_orbax(), contextlib.suppress(Exception):
      manager.close()


def _load_params(manager, step: int, directory: Path, dtype):
  model, config = _model_matching_checkpoint(manager, step, directory, dtype)
  where = f'checkpoint {directory / str(step)}'
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  try:
    with _quiet_orbax():
      restored = manager.restore(
          step,
          args=ocp.args.Composite(params=ocp.args.StandardRestore(_on_this_host(params))))['params']
  except Exception as error:
    raise CheckpointError(f'{where}: its parameters are unreadable ({_one_line(error)})') from error
  sums = config.get('checksums')
  try:
    _verify_checksums(restored, sums.get('params') if isinstance(sums, dict) else None, 'parameter')
  except CheckpointError as error:
    raise CheckpointError(f'{where}: {error}') from None
  return nnx.merge(graphdef, restored, rest)


def _warn(message: str) -> None:
  """One line on stderr (process 0 only): a fallback the user should know about, without the
  source line `warnings` would add."""
  if jax.process_index() == 0:
    print(f'warning: {message}', file=sys.stderr, flush=True)

"""The training loop: `train(config, workdir)` runs an experiment config end to end.

Builds the data (this process's slice), the model, the state and the jitted step; resumes from
the newest readable checkpoint in `workdir`; trains with a progress bar; validates every
`config.eval_every` steps and at the end (mean PSNR of the restorations and, for reference, of
the degraded inputs); checkpoints every `config.checkpoint_every` steps, at each validation and
at the end. SIGTERM or Ctrl-C finish the current step, save a checkpoint, wait until it is
committed and return; a second Ctrl-C during that save leaves at once (KeyboardInterrupt).
The first step's compile is announced; a run whose first steps are all non-finite stops
(`NonFiniteTraining`).

Files in `workdir`: trainer.lock (while a trainer runs there), config.json, checkpoints/,
metrics.jsonl, tensorboard/, curves.png, images/val_<step>.png (see `train_logging`).
`workdir` may be a bucket URL (`gs://bucket/run`): checkpoints and config.json are written
there directly, the logs through a local mirror (see `checkpoints`, `train_logging`).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from mprnet_jax import data as data_lib
from mprnet_jax import parallel as parallel_lib
from mprnet_jax import storage
from mprnet_jax import train_step as step_lib
from mprnet_jax.builders import build_model, build_sources
from mprnet_jax.checkpoints import TrainCheckpointer, WorkdirLock
from mprnet_jax.config_loading import config_to_dict, validate_config
from mprnet_jax.errors import NonFiniteTraining
from mprnet_jax.metrics import psnr
from mprnet_jax.train_logging import MetricsLogger

__all__ = ['train', 'NonFiniteTraining', 'quiet_xla_logs']

# Lines XLA's GPU autotuner logs by the hundred at LOG(ERROR) during the first compile, harmless
# (its timer's calibration kernel was late; the chosen kernels are as good). LOG(ERROR) cannot
# be silenced by TF_CPP_MIN_LOG_LEVEL without silencing every real error, hence a line filter.
_XLA_NOISE = (b'Delay kernel timed out',)

_STDERR_FILTER = r"""
import os, sys
noise = [p.encode() for p in sys.argv[1:]]
pending = b''
while True:
  chunk = os.read(0, 65536)
  if not chunk:
    break
  lines = (pending + chunk).split(b'\n')
  pending = lines.pop()
  kept = b''.join(line + b'\n' for line in lines if not any(p in line for p in noise))
  # A piece without its newline yet (a progress bar's carriage-return updates): shown now.
  if pending and not any(p in pending for p in noise):
    kept, pending = kept + pending, b''
  if kept:
    os.write(1, kept)
if pending and not any(p in pending for p in noise):
  os.write(1, pending)
"""


def quiet_xla_logs() -> None:
  """Drops XLA's autotuner noise ("Delay kernel timed out", hundreds of lines on a GPU's first
  compile) from this process's stderr, keeping every other line, real errors included.

  Routes file descriptor 2 through a small child process that forwards all other output as it
  comes, so nothing is lost if this process crashes. For the command line: call once, before
  training. `MPRNET_XLA_LOGS=all` keeps the raw stream.
  """
  if os.environ.get('MPRNET_XLA_LOGS') == 'all' or getattr(quiet_xla_logs, '_installed', False):
    return
  original = os.dup(2)
  read_end, write_end = os.pipe()
  child = subprocess.Popen(
      [sys.executable, '-S', '-c', _STDERR_FILTER, *(p.decode() for p in _XLA_NOISE)],
      stdin=read_end, stdout=original, stderr=original, close_fds=True)
  os.close(read_end)
  sys.stderr.flush()
  os.dup2(write_end, 2)
  os.close(write_end)
  quiet_xla_logs._installed = True

  def restore():
    # Give the terminal back before exit, so the filter's last lines come before the prompt.
    sys.stderr.flush()
    os.dup2(original, 2)
    try:
      child.wait(timeout=5)
    except subprocess.TimeoutExpired:  # a child process of ours still holds the pipe
      pass

  atexit.register(restore)


class _StopRequest:
  """SIGTERM / SIGINT set a flag the loop checks after each step. A second Ctrl-C during the
  final save sets `forced`, which the wait for that save turns into a KeyboardInterrupt raised
  from our own code (raised from the handler, it could land inside orbax's threads' machinery
  or a garbage-collection callback, and come out as tracebacks or not at all); at any other
  time it falls through to the default handler (KeyboardInterrupt), for a run that hangs."""

  def __init__(self):
    self.signal_name: str | None = None
    self.saving = False  # the final save, after a stop request, is in progress
    self.forced = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
    elif signum == signal.SIGINT:
      if self.saving:
        self.forced = True
      else:
        signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
        raise KeyboardInterrupt

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, sync: bool) -> bool:
    """Whether to stop; with `sync` (several processes) all stop if any process was told to."""
    local = self.signal_name is not None
    if not sync:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def _validate(eval_fn, params, batches) -> tuple[float, float, tuple]:
  """(mean PSNR restored, mean PSNR degraded, (degraded, restored, clean) for the grid)."""
  restored_psnr, degraded_psnr, grid = [], [], ([], [], [])
  for batch in batches:
    restored = np.asarray(eval_fn(params, batch['input']))
    restored_psnr.extend(np.asarray(psnr(restored, batch['target'])).tolist())
    degraded_psnr.extend(np.asarray(psnr(batch['input'], batch['target'])).tolist())
    for column, images in zip(grid, (batch['input'], restored, batch['target'])):
      column.extend(list(images))
  grid = tuple(_same_size(images[:4]) for images in grid)
  return float(np.mean(restored_psnr)), float(np.mean(degraded_psnr)), grid


def _same_size(images: list[np.ndarray]) -> np.ndarray:
  h = min(im.shape[0] for im in images)
  w = min(im.shape[1] for im in images)
  return np.stack(
      [im[(im.shape[0] - h) // 2:][:h, (im.shape[1] - w) // 2:][:, :w] for im in images])


def _enable_compilation_cache() -> None:
  # XLA:CPU over several (simulated) devices: a sharded step read back from the cache can
  # deadlock in its collectives (seen with MixUp, jax 0.12.0.1), so there it stays off.
  if jax.default_backend() == 'cpu' and jax.device_count() > 1:
    return
  if jax.config.jax_compilation_cache_dir is None:
    cache = os.environ.get('MPRNET_JAX_CACHE', os.path.expanduser('~/.cache/mprnet_jax/xla'))
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


# Fields of the loop only (how long it runs, how often it logs, validates and saves, where its
# data is read from), never of the training or evaluation step: the steps are built from a
# config without them.
_LOOP_FIELDS = ('num_steps', 'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints',
                'data.train_dir', 'data.val_dir')


def _steps(graphdef, config, steps_per_epoch: int, parallel: str, mesh):
  """(train step, eval step) of `step_lib` for this run, reused from an earlier run of this
  process when it was built from the same graphdef, the same config (but for `_LOOP_FIELDS`),
  epoch length, placement and XLA optimisation setting."""
  fields = config_to_dict(config)
  for name in _LOOP_FIELDS:
    *parents, last = name.split('.')
    node = fields
    for parent in parents:
      node = node.get(parent) or {}
    node.pop(last, None)
  return _cached_steps(graphdef, json.dumps(fields, sort_keys=True), steps_per_epoch, parallel,
                       mesh, jax.config.values.get('jax_disable_most_optimizations'))


# The jitted steps of this process's latest runs, by everything they are built from. Another run
# of the same model and settings in this process (a resumed run in a test or a notebook) reuses
# them: no tracing, lowering or compiling again (seconds, even from the compilation cache).
@functools.lru_cache(maxsize=2)
def _cached_steps(graphdef, step_fields: str, steps_per_epoch: int, parallel: str, mesh,
                  disable_most_optimizations: bool):
  del disable_most_optimizations  # part of the cache key only
  # Built from the config without the loop's fields, so a step never depends on one of them
  # (JSON turns tuples into lists: only data fields have tuples, and the steps read none).
  step_config = ml_collections.ConfigDict(json.loads(step_fields))
  return (step_lib.make_train_step(graphdef, step_config, steps_per_epoch, parallel=parallel,
                                   mesh=mesh), step_lib.make_eval_step(graphdef, step_config))


# A run whose first steps (this many, or config.max_nonfinite if smaller) were all skipped for
# a non-finite loss stops there, instead of skipping on to the end and exiting as if it trained.
_FIRST_STEPS_CHECKED = 3


def train(config, workdir: str | os.PathLike) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the final
  metrics: step, loss (last logged), psnr and psnr_degraded (last validation), wall_time_s,
  resumed_from (step or None), interrupted (stopped by a signal), and state (the final
  TrainState on one device).

  One trainer per workdir: a second one (on any host) raises a one-line MprnetError before it
  touches the workdir (`checkpoints.WorkdirLock`)."""
  start_time = time.time()
  validate_config(config)  # before anything is built or written
  if storage.is_remote(workdir):
    storage.require_bucket(os.fspath(workdir))  # a wrong bucket fails here, in one line
  parallel_lib.initialize_distributed()
  with WorkdirLock(workdir):
    return _train(config, os.fspath(workdir), start_time)


def _train(config, workdir: str, start_time: float) -> dict:
  _enable_compilation_cache()
  main = parallel_lib.is_main_process()
  processes = jax.process_count()
  say = print if main else (lambda *a, **k: None)
  if config.batch_size % processes:
    raise ValueError(f'batch_size {config.batch_size} does not divide over {processes} processes')
  local_batch = config.batch_size // processes

  train_source, val_source = build_sources(config)
  steps_per_epoch = (len(train_source) // processes) // local_batch
  if steps_per_epoch < 1:
    raise ValueError(f'{len(train_source)} training examples make no batch of {local_batch} '
                     f'per process')
  total_steps = config.num_steps or config.num_epochs * steps_per_epoch
  loader = data_lib.make_train_loader(train_source, batch_size=local_batch,
                                      patch_size=config.data.patch_size, seed=config.seed,
                                      num_workers=config.data.num_workers,
                                      shard_index=jax.process_index(), shard_count=processes,
                                      augment=config.data.augment)
  iterator = iter(loader)
  val_batches = data_lib.make_eval_batches(val_source, config.data.val_patch_size or None,
                                           config.data.val_batch_size)
  if config.data.max_val_images:
    val_batches = _first_images(val_batches, config.data.max_val_images)

  model = build_model(config)
  graphdef, state = step_lib.create_train_state(model, config, steps_per_epoch, config.seed)
  checkpointer = TrainCheckpointer(workdir, keep=config.keep_checkpoints,
                                   model_config=model.config.to_dict(),
                                   experiment_config=config_to_dict(config))
  checkpointer.discard_unfinished_saves()
  resumed_from = None
  if checkpointer.latest_step() is not None:
    restored = checkpointer.restore_latest(state)
    if restored is not None:
      state, saved_loader_state, resumed_from = restored
      data_lib.restore_loader(iterator, saved_loader_state)
      say(f'Resuming from step {resumed_from} in {checkpointer.directory}')
  start_step = int(state.step)
  # Written only once the data, the model and any checkpoint to resume accept the config: a bad
  # value must not replace the config.json of the run it was meant to resume.
  if main and storage.is_remote(workdir):
    storage.write_text(storage.join(workdir, 'config.json'),
                       json.dumps(config_to_dict(config), indent=2, sort_keys=True))
  elif main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config_to_dict(config), f, indent=2, sort_keys=True)

  parallel = parallel_lib.choose_parallel(config.parallel)
  mesh = parallel_lib.make_mesh() if parallel == 'mesh' else None
  state = parallel_lib.place_state(state, parallel, mesh)
  step_fn, eval_fn = _steps(graphdef, config, steps_per_epoch, parallel, mesh)
  logger = MetricsLogger(workdir, enabled=main)
  logger.truncate_after(start_step)
  say(f'Training {total_steps} steps ({steps_per_epoch} per epoch, global batch '
      f'{config.batch_size}, parallel={parallel}, '
      f'{jax.device_count()} devices) in {workdir}')

  def save(psnr_value=None):
    # Mesh: the global replicated arrays (every process writes its part); else one copy.
    to_save = state if parallel == 'mesh' else parallel_lib.unplace_state(state, parallel)
    checkpointer.save(to_save, data_lib.loader_state(iterator), psnr=psnr_value)

  def validate(step):
    params = parallel_lib.unplace_state(state, parallel).params
    value, degraded, grid = _validate(eval_fn, params, val_batches)
    logger.write(step, 'val',
                 {'psnr': value, 'psnr_degraded': degraded, 'psnr_gain': value - degraded})
    logger.write_images(step, *grid)
    say(f'step {step}: validation PSNR {value:.2f} dB (degraded inputs {degraded:.2f} dB, '
        f'gain {value - degraded:+.2f} dB) on {sum(len(b["input"]) for b in val_batches)} images')
    return value, degraded

  result = {
      'step': start_step, 'loss': float('nan'), 'psnr': None, 'psnr_degraded': None,
      'resumed_from': resumed_from, 'interrupted': False
  }
  progress = _progress_bar(main, start_step, total_steps)
  say = progress.write if main else say  # prints that keep the bar intact
  window_start, window_images = time.time(), 0
  step = start_step
  skipped_at_start = _host_int(state.skipped_total)
  first_steps = min(_FIRST_STEPS_CHECKED, max(1, int(config.get('max_nonfinite', 5))))
  hard_interrupt = False
  try:
    with _StopRequest() as stop:
      while step < total_steps:
        batch = parallel_lib.place_batch(next(iterator), parallel, mesh)
        if step == start_step:
          say(f'compiling the training step: about a minute the first time, seconds afterwards '
              f'from the cache at {jax.config.jax_compilation_cache_dir}')
        state, metrics = step_fn(state, batch)
        step += 1
        window_images += config.batch_size
        progress.update(1)
        if step - start_step == first_steps:
          _stop_if_all_skipped(state, step - start_step, skipped_at_start, step)
        if step % config.log_every == 0 or step == total_steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          rate = window_images / max(time.time() - window_start, 1e-9)
          window_start, window_images = time.time(), 0
          logger.write(step, 'train', dict(metrics, images_per_s=rate))
          progress.set_postfix(loss=f'{metrics["loss"]:.4f}', lr=f'{metrics["lr"]:.2e}',
                               img_s=f'{rate:.1f}', refresh=False)
          result['loss'] = metrics['loss']
          step_lib.check_nonfinite(state, config)
        if step == total_steps and step - start_step < first_steps:
          _stop_if_all_skipped(state, step - start_step, skipped_at_start, step)
        psnr_value = None
        if step % config.eval_every == 0 or step == total_steps:
          psnr_value, result['psnr_degraded'] = validate(step)
          result['psnr'] = psnr_value
        # Several processes must agree to stop on the same step: they compare every log_every.
        if processes == 1:
          stopping = stop.requested(sync=False)
        else:
          stopping = step % config.log_every == 0 and stop.requested(sync=True)
        stop.saving = stopping
        if psnr_value is not None or step % config.checkpoint_every == 0 or stopping \
            or step == total_steps:
          save(psnr_value)
        if stopping:
          result['interrupted'] = True
          # "saved" only once the checkpoint is committed; a second Ctrl-C stops waiting.
          checkpointer.wait(give_up=lambda: stop.forced)
          say(f'{stop.signal_name or "stop request"} received: saved a checkpoint at step {step} '
              f'in {checkpointer.directory}; run the same command again to resume')
          break
  except KeyboardInterrupt:
    # A second Ctrl-C (the first only asks to stop): leave now, without waiting for a save in
    # flight. Orbax commits a checkpoint only once it is complete, and the next run removes
    # an uncommitted one, so nothing half-written is ever resumed from.
    hard_interrupt = True
    if main and checkpointer.saving:
      print(
          f'interrupted again: not waiting for the checkpoint of step {step}; the next run '
          'resumes from the last complete checkpoint', file=sys.stderr)
    raise
  finally:
    progress.close()
    if hard_interrupt:
      checkpointer.abandon()
    else:
      checkpointer.close()  # waits for the saves in flight, even after an error
    logger.close()
  if start_step >= total_steps:
    say(f'Nothing to do: the checkpoint is already at step {start_step} of {total_steps}')
  result['step'] = step
  result['state'] = parallel_lib.unplace_state(state, parallel)
  result['wall_time_s'] = time.time() - start_time
  if main and not result['interrupted'] and result['psnr'] is not None:
    print(f'Done: step {step}, validation PSNR {result["psnr"]:.2f} dB vs degraded '
          f'{result["psnr_degraded"]:.2f} dB, {result["wall_time_s"]:.0f} s')
  return result


def _host_int(value) -> int:
  """The largest entry of a (possibly replicated or device-stacked) integer array, on the host."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    value = value.addressable_data(0)
  return int(np.max(np.asarray(value)))


def _stop_if_all_skipped(state, steps_run: int, skipped_at_start: int, step: int) -> None:
  """Raises NonFiniteTraining if every one of the `steps_run` steps of this run was skipped."""
  skipped = _host_int(state.skipped_total) - skipped_at_start
  if steps_run and skipped >= steps_run:
    raise NonFiniteTraining(
        f'training stopped at step {step}: each of the first {steps_run} steps had a '
        'non-finite loss or gradient (NaN/inf in the weights or the data, or a learning rate '
        'that diverges at once); nothing was learnt. Check the data and the weights, or lower '
        'the learning rate')


def _first_images(batches: list[dict], count: int) -> list[dict]:
  kept = []
  for batch in batches:
    if count <= 0:
      break
    kept.append({k: v[:count] for k, v in batch.items()})
    count -= len(batch['input'])
  return kept


def _progress_bar(enabled: bool, start: int, total: int):
  return tqdm(total=total, initial=start, disable=not enabled, unit='step', dynamic_ncols=True,
              desc='train', smoothing=0.1)

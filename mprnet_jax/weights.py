"""The project's weight file: one `.safetensors` file, loadable without any training state.

Format (documented in the README): the tensors are the official PyTorch `state_dict()` (official
keys, OIHW conv weights, float32, the shared PReLU under each of its keys), so the same file
also serves PyTorch users (`safetensors.torch.load_file`); the header's metadata holds
`format = "mprnet-jax/1"`, `config` (the MPRNet sizes as JSON) and, when known, `task`.
Files written by `safetensors.torch.save_model` (the shared PReLU stored once, the other keys
named in the metadata) are read too: the shared PReLU comes from its one stored copy.

Every path may be a URL (`gs://...`, see `storage.py`): weight files are staged into the local
cache before they are read, and written locally then uploaded whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mprnet_jax import storage
from mprnet_jax.conversion import check_task, from_pytorch, to_pytorch_state_dict
from mprnet_jax.files import atomic_output, require_regular_file
from mprnet_jax.model import MPRNet
from mprnet_jax.torch_format import CheckpointError, save_pth

FORMAT = 'mprnet-jax/1'


def _save_remote(url: str, write, overwrite: bool) -> str:
  """`write(local_path)` into a local file, uploaded to `url` once it is complete."""
  if storage.exists(url) and not overwrite:
    raise FileExistsError(f'{url}: already exists (pass overwrite=True to replace it)')
  with storage.local_output(url) as local:
    write(local)
  return url


def save_weights(model: MPRNet, path: str | os.PathLike, *, task: str | None = None,
                 overwrite: bool = False) -> Path | str:
  """Writes `model`'s weights to `path` (.safetensors; a URL is written locally and uploaded
  when complete, and returned as given); refuses to overwrite unless asked, and a `task` whose
  preset sizes are not the model's. The file follows the umask."""
  from safetensors.numpy import save_file

  if storage.is_remote(path):
    url = os.fspath(path)
    if not url.endswith('.safetensors'):
      raise CheckpointError(f'{url}: weights are written as .safetensors')
    check_task(model.config, task, url)  # before anything reaches the bucket
    return _save_remote(url, lambda local: save_weights(model, local, task=task), overwrite)
  path = Path(path)
  if path.suffix != '.safetensors':
    raise CheckpointError(f'{path}: weights are written as .safetensors')
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path}: already exists (pass overwrite=True to replace it)')
  check_task(model.config, task, str(path))
  tensors = {
      k: np.ascontiguousarray(v, dtype=np.float32) for k, v in to_pytorch_state_dict(model).items()
  }
  metadata = {'format': FORMAT, 'config': json.dumps(model.config.to_dict())}
  if task:
    metadata['task'] = task
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written beside the target and renamed, so a failure never leaves a half-written file.
  with atomic_output(path, CheckpointError) as partial:
    save_file(tensors, str(partial), metadata=metadata)
  return path


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(official state dict, metadata) of a .safetensors file; CheckpointError if unreadable."""
  from safetensors import SafetensorError, safe_open

  if storage.is_remote(path):
    with storage.urls_in_errors():
      return read_weights(storage.stage_in(path, 'weight file'))
  path = require_regular_file(path, CheckpointError, 'weight file')
  try:
    with safe_open(str(path), framework='numpy') as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except (SafetensorError, OSError, ValueError) as error:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise CheckpointError(f'{path}: not a readable safetensors file ({first_line})') from None
  return tensors, metadata


def load_weights(path: str | os.PathLike, *, dtype=None) -> MPRNet:
  """An MPRNet from a .safetensors weight file (ours, or any with the official keys)."""
  tensors, _ = read_weights(path)
  return from_pytorch(tensors, task=None, dtype=dtype, source=str(path))


def recorded_task(path: str | os.PathLike) -> str | None:
  """The `task` in a .safetensors file's metadata (None for anything else, or none recorded)."""
  if storage.is_remote(path):
    if not os.fspath(path).endswith('.safetensors') or not storage.exists(path):
      return None
    path = storage.stage_in(path, 'weight file')  # already staged when the model was loaded
  path = Path(path)
  if path.suffix != '.safetensors' or not path.is_file():
    return None
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(str(path), framework='numpy') as f:
      return (f.metadata() or {}).get('task') or None
  except (SafetensorError, OSError, ValueError):
    return None


def load_model(path: str | os.PathLike, *, dtype=None) -> MPRNet:
  """An MPRNet from whatever `path` is: our .safetensors, an official .pth, or a training
  workdir (its best, else latest, checkpoint). Any of them may be a URL: a workdir's
  checkpoints are read from the bucket by orbax, a weight file is staged first."""
  if storage.is_remote(path):
    url = os.fspath(path)
    if storage.is_dir(url):
      from mprnet_jax.checkpoints import load_model_from_workdir
      return load_model_from_workdir(url, dtype=dtype)
    with storage.urls_in_errors():
      return load_model(storage.stage_in(url, 'weight file'), dtype=dtype)
  path = Path(path)
  if path.is_dir():
    from mprnet_jax.checkpoints import load_model_from_workdir
    return load_model_from_workdir(path, dtype=dtype)
  if not path.exists():
    raise CheckpointError(f'{path}: no such file or directory')
  require_regular_file(path, CheckpointError, 'weight file')  # a FIFO would block open()
  if path.suffix == '.safetensors':
    return load_weights(path, dtype=dtype)
  return from_pytorch(path, dtype=dtype)


def export_weights(model: MPRNet, path: str | os.PathLike, *, task: str | None = None,
                   overwrite: bool = False) -> Path | str:
  """Writes `model` for PyTorch users: `.pth` as `{'state_dict': official state dict}` (what
  the official code's loader reads; written without torch), or `.safetensors` (our format).
  A URL is written locally and uploaded when complete, and returned as given."""
  if storage.is_remote(path):
    url = os.fspath(path)
    if url.endswith('.safetensors'):
      return save_weights(model, url, task=task, overwrite=overwrite)
    if not url.endswith(('.pth', '.pt')):
      raise CheckpointError(f'{url}: export writes .pth, .pt or .safetensors')
    check_task(model.config, task, url)
    return _save_remote(url, lambda local: export_weights(model, local, task=task), overwrite)
  path = Path(path)
  if path.suffix == '.safetensors':
    return save_weights(model, path, task=task, overwrite=overwrite)
  if path.suffix not in ('.pth', '.pt'):
    raise CheckpointError(f'{path}: export writes .pth, .pt or .safetensors')
  check_task(model.config, task, str(path))
  path.parent.mkdir(parents=True, exist_ok=True)
  save_pth({'state_dict': to_pytorch_state_dict(model)}, path, overwrite=overwrite)
  return path

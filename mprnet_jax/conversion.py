"""Official PyTorch state dicts <-> MPRNet parameters.

The Flax tree mirrors the official module paths, so the mapping is a walk over paths with two
rules: a conv `kernel` (H, W, in, out) is PyTorch's `weight` (out, in, H, W), and everything else
keeps its name and layout. The shared PReLU sits under every CAB's `body.1`, as in the official
`state_dict()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mprnet_jax import storage
from mprnet_jax.model import PRESETS, MPRNet, MPRNetConfig, abstract_mprnet
from mprnet_jax.torch_format import CheckpointError, load_pth

_PREFIX = 'module.'  # added by nn.DataParallel, which the official train.py uses on several GPUs


def iter_torch_params(module: nnx.Module, prefix: str = '') -> Iterator[tuple[str, nnx.Param]]:
  """(official key, parameter) for every parameter position, shared ones at each position, in
  the official registration order."""
  children = enumerate(module) if isinstance(module, nnx.List) else vars(module).items()
  for name, child in children:
    if isinstance(name, str) and name.startswith('_'):
      continue
    path = f'{prefix}{name}'
    if isinstance(child, nnx.Param):
      yield (f'{prefix}weight' if name == 'kernel' else path), child
    elif isinstance(child, nnx.Module):
      yield from iter_torch_params(child, path + '.')


_HWIO_TO_OIHW = (3, 2, 0, 1)


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(value.transpose(_HWIO_TO_OIHW)) if value.ndim == 4 else value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[i] for i in _HWIO_TO_OIHW) if len(shape) == 4 else tuple(shape)


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value


def to_pytorch_state_dict(model: MPRNet) -> dict[str, np.ndarray]:
  """The official `state_dict()` of `model`: same keys (the shared PReLU under each of its
  positions), OIHW conv weights, numpy arrays."""
  return {key: _to_torch_layout(np.asarray(param[...])) for key, param in iter_torch_params(model)}


def unwrap_state_dict(checkpoint: Mapping, source: str = 'checkpoint') -> dict[str, np.ndarray]:
  """The bare state dict of an official checkpoint: `{'state_dict': ...}` or bare, with the
  `module.` prefix of DataParallel removed."""
  if not isinstance(checkpoint, Mapping):
    raise CheckpointError(
        f'{source}: expected a dict of tensors, found {type(checkpoint).__name__}')
  state = checkpoint.get('state_dict', checkpoint)
  if not isinstance(state, Mapping) or not state:
    raise CheckpointError(
        f'{source}: no state dict found (keys: {", ".join(map(str, checkpoint))})')
  bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(f'{source}: not a state dict of tensors (e.g. entry {bad[0]!r})')
  if all(k.startswith(_PREFIX) for k in state):
    state = {k[len(_PREFIX):]: v for k, v in state.items()}
  return dict(state)


# Sizes beyond these are not an MPRNet anyone trained (the official ones are at most 96 wide,
# 8 blocks, 3x3 kernels): refused before a model of that size is even described.
_MAX_WIDTH, _MAX_CABS, _MAX_KERNEL, _MAX_CHANNELS = 4096, 256, 31, 64


def _conv_shape(state: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
  shape = tuple(int(n) for n in np.shape(state[key]))
  if len(shape) != 4 or min(shape) < 1:
    raise CheckpointError(f'{source}: {key} has shape {shape}; an MPRNet conv weight is 4-d '
                          '(out, in, height, width) with no zero-sized axis')
  return shape


def validate_sizes(config: MPRNetConfig, source: str = 'checkpoint') -> MPRNetConfig:
  """Refuses (one CheckpointError line) sizes that cannot be an MPRNet or are implausibly
  large, before any model is described or allocated; returns `config`."""
  limits = {
      'n_feat': _MAX_WIDTH, 'scale_unetfeats': _MAX_WIDTH, 'scale_orsnetfeats': _MAX_WIDTH,
      'num_cab': _MAX_CABS, 'kernel_size': _MAX_KERNEL, 'reduction': _MAX_WIDTH,
      'in_c': _MAX_CHANNELS, 'out_c': _MAX_CHANNELS
  }
  for field, top in limits.items():
    value = getattr(config, field)
    if type(value) is not int or not 1 <= value <= top:
      raise CheckpointError(f'{source}: {field}={value!r} is not a usable MPRNet size '
                            f'(expected a whole number from 1 to {top})')
  if config.kernel_size % 2 == 0:
    raise CheckpointError(f'{source}: kernel_size={config.kernel_size} must be odd')
  if config.reduction > config.n_feat:
    raise CheckpointError(f'{source}: reduction={config.reduction} is larger than '
                          f'n_feat={config.n_feat}')
  return config


def infer_config(state: Mapping[str, np.ndarray], source: str = 'checkpoint') -> MPRNetConfig:
  """The MPRNet sizes that produced a state dict, read off its tensor shapes; one-line
  CheckpointError when the shapes cannot be an MPRNet's (wrong rank, zero-sized, absurd)."""
  needed = [
      'shallow_feat1.0.weight', 'shallow_feat1.1.CA.conv_du.0.weight', 'concat23.weight',
      'stage1_encoder.down12.down.1.weight', 'tail.weight'
  ]
  missing = [k for k in needed if k not in state]
  if missing:
    raise CheckpointError(f'{source}: not an MPRNet state dict (missing {", ".join(missing)})')
  n_feat, in_c, kernel_size, kernel_width = _conv_shape(state, needed[0], source)
  if kernel_width != kernel_size:
    raise CheckpointError(f'{source}: {needed[0]} has a {kernel_size}x{kernel_width} kernel; '
                          'MPRNet kernels are square')
  squeezed = _conv_shape(state, needed[1], source)[0]
  num_cab = sum(
      1 for k in state if k.startswith('stage3_orsnet.orb1.body.') and k.endswith('.body.0.weight'))
  config = MPRNetConfig(n_feat=n_feat,
                        scale_unetfeats=_conv_shape(state, needed[3], source)[0] - n_feat,
                        scale_orsnetfeats=_conv_shape(state, needed[2], source)[0] - n_feat,
                        num_cab=num_cab, kernel_size=kernel_size,
                        reduction=max(1, n_feat // squeezed), bias='shallow_feat1.0.bias' in state,
                        in_c=in_c, out_c=_conv_shape(state, needed[4], source)[0])
  return validate_sizes(config, source)


def check_task(config: MPRNetConfig, task: str | None, source: str) -> None:
  """Refuses a task whose preset sizes differ from `config` (a task names the official sizes)."""
  if task is None:
    return
  if task not in PRESETS:
    raise ValueError(f'unknown task {task!r}: expected one of {", ".join(PRESETS)}')
  preset = PRESETS[task]
  if config != preset:
    differ = [
        f'{f}={getattr(config, f)} (task {task!r}: {getattr(preset, f)})' for f in config.to_dict()
        if getattr(config, f) != getattr(preset, f)
    ]
    raise CheckpointError(f'{source}: sizes do not match task {task!r}: {", ".join(differ)}')


def _listing(label: str, items: list[str], limit: int = 6) -> str:
  shown = ', '.join(
      items[:limit]) + (f' and {len(items) - limit} more' if len(items) > limit else '')
  return f'{len(items)} {label} ({shown})'


def load_state_dict(model: MPRNet, state: Mapping[str, np.ndarray],
                    source: str = 'checkpoint') -> MPRNet:
  """Copies an official state dict into `model`, strictly: one CheckpointError lists missing,
  unexpected and mis-shaped keys, or shared-PReLU copies that disagree; another names the first
  tensor holding NaN or Inf. Everything is checked before anything is copied.

  The shared PReLU may be stored under all of its keys (the official `state_dict()`) or under
  only some (`safetensors.torch.save_model` keeps one copy of shared tensors): it is read from
  whichever copies are present."""
  positions: dict[int, tuple[nnx.Param, list[str]]] = {}
  for key, param in iter_torch_params(model):
    positions.setdefault(id(param), (param, []))[1].append(key)
  missing, misshaped, disagreeing, values = [], [], [], []
  for param, keys in positions.values():
    present = [k for k in keys if k in state]
    if not present:
      missing.extend(keys)
      continue
    first = None
    for key in present:
      value = _from_torch_layout(np.asarray(state[key]))
      if value.shape != param.get_value().shape:
        misshaped.append(f'{key}: {tuple(state[key].shape)}, model wants '
                         f'{_torch_shape(param.get_value().shape)}')
      elif first is None:
        first = value
        values.append((key, param, value))
      elif not np.array_equal(first, value):
        disagreeing.append(key)
  seen = {k for _, keys in positions.values() for k in keys}
  unexpected = sorted(set(state) - seen)
  problems = [
      _listing(label, items)
      for label, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped',
                                                                              misshaped),
                           ('shared-PReLU copies that differ from the first', disagreeing))
      if items
  ]
  if problems:
    raise CheckpointError(f'{source}: does not fit MPRNet: ' + '; '.join(problems))
  for key, _, value in values:  # NaN/Inf weights give NaN images with no error anywhere later
    if value.dtype.kind not in 'biu' and not np.isfinite(value).all():
      bad = int(np.size(value) - np.isfinite(value).sum())
      raise CheckpointError(f'{source}: tensor {key} holds {bad} NaN or infinite value(s); '
                            'refusing weights that would restore every image to NaN')
  for _, param, value in values:
    # set_value replaces the abstract placeholder that nnx.eval_shape left.
    param.set_value(jnp.asarray(value, dtype=param.get_value().dtype))
  return model


def from_pytorch(path_or_state_dict, *, task: str | None = None, dtype=None, param_dtype=None,
                 source: str | None = None) -> MPRNet:
  """An MPRNet holding the weights of an official PyTorch checkpoint.

  Reads `.pth` files (zip or legacy format) without torch and without running code from them;
  accepts a wrapped (`{'state_dict': ...}`) or bare state dict, with or without `module.`.
  The sizes come from the tensor shapes; `task`, when given, must agree with them. `source`
  names the weights in error messages. A URL (`gs://...`) is staged into the local cache first.
  """
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    source = source or os.fspath(path_or_state_dict)
    path = path_or_state_dict
    if storage.is_remote(path):
      path = storage.stage_in(path, 'checkpoint file')
    with storage.urls_in_errors():
      checkpoint = load_pth(path)
  else:
    source, checkpoint = source or 'state dict', path_or_state_dict
  state = unwrap_state_dict(checkpoint, source)
  config = infer_config(state, source)
  check_task(config, task, source)
  model = abstract_mprnet(**config.to_dict(), dtype=dtype, param_dtype=param_dtype)
  return load_state_dict(model, state, source)

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

from mprnet_jax.model import PRESETS, MPRNet, MPRNetConfig
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
  return {key: _to_torch_layout(np.asarray(param[...]))
          for key, param in iter_torch_params(model)}


def unwrap_state_dict(checkpoint: Mapping, source: str = 'checkpoint') -> dict[str, np.ndarray]:
  """The bare state dict of an official checkpoint: `{'state_dict': ...}` or bare, with the
  `module.` prefix of DataParallel removed."""
  if not isinstance(checkpoint, Mapping):
    raise CheckpointError(f'{source}: expected a dict of tensors, found {type(checkpoint).__name__}')
  state = checkpoint.get('state_dict', checkpoint)
  if not isinstance(state, Mapping) or not state:
    raise CheckpointError(f'{source}: no state dict found (keys: {", ".join(map(str, checkpoint))})')
  bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(f'{source}: not a state dict of tensors (e.g. entry {bad[0]!r})')
  if all(k.startswith(_PREFIX) for k in state):
    state = {k[len(_PREFIX):]: v for k, v in state.items()}
  return dict(state)


def infer_config(state: Mapping[str, np.ndarray], source: str = 'checkpoint') -> MPRNetConfig:
  """The MPRNet sizes that produced a state dict, read off its tensor shapes."""
  needed = ['shallow_feat1.0.weight', 'shallow_feat1.1.CA.conv_du.0.weight', 'concat23.weight',
            'stage1_encoder.down12.down.1.weight', 'tail.weight']
  missing = [k for k in needed if k not in state]
  if missing:
    raise CheckpointError(f'{source}: not an MPRNet state dict (missing {", ".join(missing)})')
  first = state['shallow_feat1.0.weight']
  n_feat, in_c, kernel_size = first.shape[0], first.shape[1], first.shape[2]
  squeezed = state['shallow_feat1.1.CA.conv_du.0.weight'].shape[0]
  num_cab = sum(1 for k in state
                if k.startswith('stage3_orsnet.orb1.body.') and k.endswith('.body.0.weight'))
  return MPRNetConfig(
      n_feat=n_feat,
      scale_unetfeats=state['stage1_encoder.down12.down.1.weight'].shape[0] - n_feat,
      scale_orsnetfeats=state['concat23.weight'].shape[0] - n_feat,
      num_cab=num_cab, kernel_size=kernel_size, reduction=max(1, n_feat // max(1, squeezed)),
      bias='shallow_feat1.0.bias' in state, in_c=in_c, out_c=state['tail.weight'].shape[0])


def _listing(label: str, items: list[str], limit: int = 6) -> str:
  shown = ', '.join(items[:limit]) + (f' and {len(items) - limit} more' if len(items) > limit else '')
  return f'{len(items)} {label} ({shown})'


def load_state_dict(model: MPRNet, state: Mapping[str, np.ndarray],
                    source: str = 'checkpoint') -> MPRNet:
  """Copies an official state dict into `model`, strictly: one CheckpointError lists missing,
  unexpected and mis-shaped keys, or shared-PReLU copies that disagree."""
  missing, misshaped, disagreeing, seen = [], [], [], set()
  assigned: dict[int, np.ndarray] = {}
  for key, param in iter_torch_params(model):
    seen.add(key)
    if key not in state:
      missing.append(key)
      continue
    value = _from_torch_layout(np.asarray(state[key]))
    if value.shape != param.get_value().shape:
      misshaped.append(f'{key}: {tuple(state[key].shape)}, model wants '
                       f'{_torch_shape(param.get_value().shape)}')
      continue
    if id(param) in assigned:  # a shared parameter seen before: every copy must agree
      if not np.array_equal(assigned[id(param)], value):
        disagreeing.append(key)
      continue
    assigned[id(param)] = value
    # set_value replaces the abstract placeholder that nnx.eval_shape left.
    param.set_value(jnp.asarray(value, dtype=param.get_value().dtype))
  unexpected = sorted(set(state) - seen)
  problems = [_listing(label, items) for label, items in (
      ('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped),
      ('shared-PReLU copies that differ from the first', disagreeing)) if items]
  if problems:
    raise CheckpointError(f'{source}: does not fit MPRNet: ' + '; '.join(problems))
  return model


def from_pytorch(path_or_state_dict, *, task: str | None = None, dtype=None,
                 param_dtype=None, source: str | None = None) -> MPRNet:
  """An MPRNet holding the weights of an official PyTorch checkpoint.

  Reads `.pth` files (zip or legacy format) without torch and without running code from them;
  accepts a wrapped (`{'state_dict': ...}`) or bare state dict, with or without `module.`.
  The sizes come from the tensor shapes; `task`, when given, must agree with them. `source`
  names the weights in error messages.
  """
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    source = source or os.fspath(path_or_state_dict)
    checkpoint = load_pth(path_or_state_dict)
  else:
    source, checkpoint = source or 'state dict', path_or_state_dict
  state = unwrap_state_dict(checkpoint, source)
  config = infer_config(state, source)
  if task is not None:
    if task not in PRESETS:
      raise ValueError(f'unknown task {task!r}: expected one of {", ".join(PRESETS)}')
    preset = PRESETS[task]
    if config != preset:
      differ = [f'{f}={getattr(config, f)} (task {task!r}: {getattr(preset, f)})'
                for f in config.to_dict() if getattr(config, f) != getattr(preset, f)]
      raise CheckpointError(f'{source}: sizes do not match task {task!r}: {", ".join(differ)}')
  model = nnx.eval_shape(lambda: MPRNet(**config.to_dict(), dtype=dtype,
                                        **({'param_dtype': param_dtype} if param_dtype else {})))
  return load_state_dict(model, state, source)

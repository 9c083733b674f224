"""Experiment configs: load `experiments/<name>.py` by path, apply `a.b=value` overrides, and
check every field.

    config = load_config('experiments/deblur_gopro.py', ['batch_size=4', 'optim.lr=1e-3'])
    config = load_config(None)  # the demo that ships in the package (mprnet_jax/configs)

Values are parsed as Python literals (`4`, `1e-3`, `'x'`, `True`, `None`, `(1, 2)`); anything
that is not a literal is taken as a plain string (`data.kind=paired`). Each override must name
an existing field and match its type (an int may widen to a float). `validate_config` then
checks the values (intervals, learning rates, sizes, choices); anything wrong raises a one-line
`ConfigError` naming the field.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from collections.abc import Sequence

import ml_collections

from mprnet_jax.configs import default as default_config
from mprnet_jax.errors import ConfigError
from mprnet_jax.layers import REMAT_MODES
from mprnet_jax.model import COMPUTE_DTYPES, PRESETS

__all__ = ['load_config', 'apply_override', 'config_to_dict', 'validate_config']


def load_config(
    path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The `get_config()` of the Python file at `path` (None: the packaged demo), with
  `overrides` applied in order, validated."""
  if path is None:
    config = default_config.get_config()
  else:
    config = _load_file(path)
  for override in overrides:
    apply_override(config, override)
  validate_config(config)
  return config


def _load_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path} does not exist')
  # Variants import their base as `experiments.base` or as a sibling module: make both work.
  folder = os.path.dirname(path)
  for entry in (folder, os.path.dirname(folder)):
    if entry not in sys.path:
      sys.path.insert(0, entry)
  name = f'_mprnet_experiment_{os.path.splitext(os.path.basename(path))[0]}'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:
    raise ConfigError(
        f'config file {path} failed to load: {type(error).__name__}: {error}') from error
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path} has no get_config()')
  return module.get_config()


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Sets one `a.b.c=value` in place; ValueError for an unknown field or a mistyped value."""
  key, sep, text = override.partition('=')
  key = key.strip().removeprefix('--').removeprefix('config.')
  if not sep or not key:
    raise ConfigError(f'override {override!r} is not of the form field.name=value')
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(
          f'unknown config field {".".join(parents[:i + 1])!r} (in override {override!r})')
    node = node[part]
  if leaf not in node:
    known = ', '.join(sorted(node.keys()))
    raise ConfigError(f'unknown config field {key!r}; fields here: {known}')
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f'config field {key!r} is a group; set one of its fields ({key}.<name>=...)')
  value = _parse_value(text)
  current = node[leaf]
  if isinstance(current, bool) and not isinstance(value, bool):
    lowered = text.strip().lower()
    if lowered in ('true', 'false', 'yes', 'no', '1', '0'):
      value = lowered in ('true', 'yes', '1')
  if isinstance(current, str) and not isinstance(value, str):
    value = text  # `data.train_dir=2024` means the folder named 2024
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as error:
    expected = type(current).__name__ if current is not None else 'the field type'
    raise ConfigError(f'bad value {text!r} for config field {key!r}: expected {expected} '
                      f'({str(error).splitlines()[0]})') from None


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A plain JSON-serialisable dict of a config (tuples become lists)."""
  return ml_collections.ConfigDict(config).to_dict()


# ---------------------------------------------------------------------------------------------
# Validation: every field of mprnet_jax/configs/base.py, checked once, before anything is built.

_SIZE_FIELDS = ('n_feat', 'scale_unetfeats', 'scale_orsnetfeats', 'num_cab')
_TASKS = tuple(PRESETS)
# Seeds feed jax.random.key, numpy and grain; all take unsigned 32-bit values.
_MAX_SEED = 2**32 - 1


def _field(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if part not in node:
      raise ConfigError(f'config.{dotted} is missing (start from mprnet_jax.configs.base)')
    node = node[part]
  return node


def _integer(config, dotted: str, *, low: int, high: int | None = None, optional: bool = False):
  value = _field(config, dotted)
  if value is None and optional:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(f'config.{dotted} must be an integer, got {value!r}')
  if value < low or (high is not None and value > high):
    bound = f'between {low} and {high}' if high is not None else f'>= {low}'
    raise ConfigError(f'config.{dotted} must be {bound}, got {value}')
  return value


def _number(config, dotted: str, *, positive: bool = False, low: float = 0.0,
            below: float | None = None) -> float:
  value = _field(config, dotted)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
    raise ConfigError(f'config.{dotted} must be a number, got {value!r}')
  if positive and not value > 0:
    raise ConfigError(f'config.{dotted} must be > 0, got {value}')
  if value < low:
    raise ConfigError(f'config.{dotted} must be >= {low}, got {value}')
  if below is not None and not value < below:
    raise ConfigError(f'config.{dotted} must be < {below}, got {value}')
  return float(value)


def _choice(config, dotted: str, choices) -> str:
  value = _field(config, dotted)
  if value not in choices:
    raise ConfigError(f'config.{dotted} must be one of {", ".join(map(repr, choices))}, '
                      f'got {value!r}')
  return value


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line `ConfigError` naming the first field whose value cannot work."""
  _choice(config, 'task', _TASKS)
  preset = _choice(config, 'model.task_preset', ('',) + _TASKS)
  sizes = {name: _integer(config, f'model.{name}', low=1, optional=True) for name in _SIZE_FIELDS}
  if not preset and None in sizes.values():
    missing = ', '.join(f'config.model.{k}' for k, v in sizes.items() if v is None)
    raise ConfigError(f"config.model.task_preset='' needs all four sizes; not set: {missing}")
  # The channel attention squeezes n_feat by the reduction (4): fewer leaves no channel.
  n_feat = sizes['n_feat'] if sizes['n_feat'] is not None else PRESETS[preset].n_feat
  if n_feat < PRESETS['deblurring'].reduction:
    raise ConfigError(f'config.model.n_feat must be >= {PRESETS["deblurring"].reduction} (the '
                      f'channel attention divides it by 4), got {n_feat}')
  _choice(config, 'model.dtype', tuple(COMPUTE_DTYPES))
  remat = _field(config, 'model.remat')
  if remat not in REMAT_MODES and not isinstance(remat, bool):
    raise ConfigError(f'config.model.remat must be one of {", ".join(REMAT_MODES)}, '
                      f'got {remat!r}')

  _choice(config, 'optim.name', ('adam', 'sgd'))
  lr = _number(config, 'optim.lr', positive=True)
  _number(config, 'optim.b1', below=1.0)
  _number(config, 'optim.b2', below=1.0)
  _number(config, 'optim.eps', positive=True)
  _number(config, 'optim.weight_decay')
  min_lr = _number(config, 'optim.min_lr')
  if min_lr > lr:
    raise ConfigError(f'config.optim.min_lr ({min_lr}) must not exceed config.optim.lr ({lr})')
  _integer(config, 'optim.warmup_epochs', low=0)
  _integer(config, 'optim.cosine_extra_epochs', low=0)
  _choice(config, 'optim.schedule_unit', ('epoch', 'step'))

  _integer(config, 'batch_size', low=1)
  _integer(config, 'num_epochs', low=1)
  _integer(config, 'num_steps', low=1, optional=True)
  _integer(config, 'mixup_start_epoch', low=0, optional=True)
  _integer(config, 'max_nonfinite', low=1)

  _choice(config, 'data.kind', ('paired', 'synthetic', 'shards'))
  _choice(config, 'data.degradation', ('noise', 'gaussian_blur', 'motion_blur', 'mixed'))
  sigma = _field(config, 'data.noise_sigma')
  if (not isinstance(sigma, (tuple, list)) or len(sigma) != 2 or
      not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sigma) or
      not 0 <= sigma[0] <= sigma[1]):
    raise ConfigError(f'config.data.noise_sigma must be (low, high) with 0 <= low <= high, '
                      f'got {sigma!r}')
  _integer(config, 'data.variants', low=1)
  for name, low in (('data.patch_size', 8), ('data.val_patch_size', 0)):
    size = _integer(config, name, low=low)
    if size % 8:
      raise ConfigError(f'config.{name} must be a multiple of 8 (the network halves the image '
                        f'three times), got {size}')
  _integer(config, 'data.val_batch_size', low=1)
  _integer(config, 'data.max_val_images', low=0)
  _integer(config, 'data.num_workers', low=0)
  _choice(config, 'data.augment', ('deblur', 'plain'))

  _integer(config, 'seed', low=0, high=_MAX_SEED)
  _choice(config, 'parallel', ('auto', 'none', 'mesh', 'pmap'))
  for name in ('log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
    _integer(config, name, low=1)

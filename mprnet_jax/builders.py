"""From a config to the objects a run needs: the one place each is built.

    model = build_model(config)                       # float32 parameters, seeded
    tx = build_optimizer(config, steps_per_epoch)     # the official Adam and schedule
    train_source, val_source = build_sources(config)  # this config's data

The trainer, the benchmark and the tests all build through here, so one rule decides the
model's sizes: the preset `config.model.task_preset`, with any explicit size overriding it
(`validate_config` demands all four sizes when the preset is '').
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
import optax
from flax import nnx

from mprnet_jax import data as data_lib
from mprnet_jax import storage
from mprnet_jax.errors import DataError
from mprnet_jax.image_io import IMAGE_SUFFIXES
from mprnet_jax.model import MPRNet, MPRNetConfig, resolve_config
from mprnet_jax.optim import make_optimizer

__all__ = ['model_sizes', 'build_model', 'build_optimizer', 'build_sources']

_SIZE_FIELDS = ('n_feat', 'scale_unetfeats', 'scale_orsnetfeats', 'num_cab')
# Validation degradations of synthetic data use their own fixed seed, so validation PSNRs
# compare across runs whatever `config.seed` is.
VALIDATION_SEED = 20210301


def model_sizes(config: ml_collections.ConfigDict) -> MPRNetConfig:
  """The MPRNet sizes of `config.model`: its preset, overridden by the explicit sizes."""
  model = config.model
  sizes = {name: model.get(name) for name in _SIZE_FIELDS}
  return resolve_config(model.get('task_preset') or None, **sizes)


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> MPRNet:
  """A freshly initialised MPRNet of `config.model` with float32 parameters and compute
  (the train step sets the compute dtype and remat itself), seeded by `seed` or `config.seed`."""
  seed = config.seed if seed is None else seed
  return MPRNet(**model_sizes(config).to_dict(), rngs=nnx.Rngs(seed))


def build_optimizer(config: ml_collections.ConfigDict,
                    steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimiser of `config.optim` with its learning-rate schedule (see `optim.py`)."""
  return make_optimizer(config, steps_per_epoch)


def _clean_images_in(folder: str) -> dict[str, np.ndarray]:
  if not os.path.isdir(folder):
    raise DataError(f'folder {folder} does not exist (config.data: synthetic data needs a '
                    f'folder of clean images)')
  names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
  if not names:
    raise DataError(f'no images in {folder} (synthetic data needs clean images)')
  return {name: data_lib.load_rgb(os.path.join(folder, name)) for name in names}


def _on_this_host(path: str, what: str) -> str:
  """`path` itself when local (read as it always was); for a bucket URL (`gs://...`), the
  folder or file staged on this host: array_record and the image readers read local files
  only. `storage.stage_in` downloads once and reuses the copy while the objects are unchanged,
  so a resumed run downloads nothing. Every host stages the whole set; each process then reads
  only its slice of it, as from a local folder. In a shard pattern only the file name may hold
  wildcards (`gs://b/shards/train.array_record-*`): its folder is staged."""
  if not storage.is_remote(path):
    return path
  folder, name = path.rstrip('/').rsplit('/', 1)
  if any(c in name for c in '*?['):
    if any(c in folder for c in '*?['):
      raise DataError(f'{path}: in a bucket URL only the file name may hold wildcards')
    return os.path.join(storage.stage_in(folder, what), name)
  return os.fspath(storage.stage_in(path, what))


def build_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(train source, validation source) of `config.data` (see mprnet_jax/configs/base.py).
  `data.train_dir` / `val_dir` may be bucket URLs (staged on this host, see `_on_this_host`)."""
  data = config.data
  if storage.is_remote(data.train_dir) or storage.is_remote(data.val_dir):
    what = 'folder of shards' if data.kind == 'shards' else 'folder of images'
    data = ml_collections.ConfigDict(data.to_dict())
    data.train_dir = _on_this_host(data.train_dir, what)
    data.val_dir = _on_this_host(data.val_dir, what)
  if data.kind == 'synthetic':
    train_clean, val_clean = data_lib.bundled_photo_split()
    if data.train_dir:
      train_clean = _clean_images_in(data.train_dir)
    if data.val_dir:
      val_clean = _clean_images_in(data.val_dir)
    ranges = {'noise_sigma': tuple(data.noise_sigma)}
    train = data_lib.SyntheticSource(train_clean, data.degradation, seed=config.seed,
                                     variants=data.variants, **ranges)
    val = data_lib.SyntheticSource(val_clean, data.degradation, seed=VALIDATION_SEED, **ranges)
    return train, val
  if data.kind == 'paired':
    train = data_lib.PairedFolderSource(data.train_dir, cache=data.cache)
    if data.cache:
      train.preload()  # decode once, before grain's workers copy the source
    return train, data_lib.PairedFolderSource(data.val_dir)
  if data.kind == 'shards':
    return data_lib.ShardSource(data.train_dir), data_lib.ShardSource(data.val_dir)
  raise DataError(f"config.data.kind must be 'synthetic', 'paired' or 'shards', got {data.kind!r}")

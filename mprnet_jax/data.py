"""Training and validation data: sources of image pairs and grain loaders.

A source is random access (`len(source)`, `source[i]`) and returns
{'input': uint8 (H, W, 3) degraded, 'target': uint8 (H, W, 3) clean, 'name': str}.
Loaders yield {'input', 'target': float32 (B, P, P, 3) in [0, 1]} (NHWC numpy).

Sources: `PairedFolderSource` (the official `input/`, `target/` layout), `SyntheticSource`
(clean images degraded on the fly; defaults to the photos inside scikit-image's wheel) and
`ShardSource` (decoded pairs in array_record shards, see `shards.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import skimage.data
from absl import flags
from scipy import ndimage, signal

from mprnet_jax import augment, image_io
from mprnet_jax.errors import DataError
from mprnet_jax.shards import ShardSource  # re-exported: one place for the training sources

__all__ = [
    'PairedFolderSource', 'SyntheticSource', 'ShardSource', 'BUNDLED_PHOTOS', 'VALIDATION_PHOTOS',
    'load_bundled_photos', 'bundled_photo_split', 'degrade', 'make_train_loader',
    'make_eval_batches', 'loader_state', 'restore_loader'
]

IMAGE_EXTENSIONS = image_io.IMAGE_SUFFIXES  # one list of image extensions, image_io's


def load_rgb(path: str) -> np.ndarray:
  """An image file as uint8 (H, W, 3) RGB, read by `image_io.read_image` (the one reader:
  same formats, pixel limit, EXIF orientation, grayscale replicated, alpha dropped).

  Training data stays 8-bit: a 16-bit file is rounded to the nearest 8-bit level (the
  official datasets are 8-bit, and 8-bit examples keep loaders and shards at half the size).
  `restore` and `evaluate` read 16 bits through `read_image` directly."""
  pixels, _ = image_io.read_image(path, warn=False)
  return np.rint(pixels * 255.0).astype(np.uint8)


class PairedFolderSource:
  """Pairs `root/input/<name>` (degraded) with `root/target/<name>` (clean), by file name.

  Every check that needs no decoding happens here, so a bad folder fails at once with a
  one-line ValueError: missing folders, no images, unmatched names, pairs of different sizes
  (read from the file headers). With `cache=True` each decoded pair is kept in memory after
  its first use (PNG decoding costs ~43 ms per 720p frame); `preload()` decodes all now,
  before worker processes copy the source.
  """

  def __init__(self, root: str, *, cache: bool = False):
    if not os.path.isdir(root):
      raise DataError(f'dataset folder {root} does not exist')
    folders = {}
    for sub in ('input', 'target'):
      folders[sub] = os.path.join(root, sub)
      if not os.path.isdir(folders[sub]):
        raise DataError(f'dataset folder {root} has no {sub}/ subfolder')
    names = {
        sub: {f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)}
        for sub, path in folders.items()
    }
    if not names['input'] and not names['target']:
      raise DataError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {root}/input, {root}/target')
    unmatched = sorted(names['input'] ^ names['target'])
    if unmatched:
      shown = ', '.join(
          ('input/' if n in names['input'] else 'target/') + n for n in unmatched[:10])
      raise DataError(f'{len(unmatched)} images in {root} have no partner of the same name: '
                      f'{shown}{", ..." if len(unmatched) > 10 else ""}')
    self.root = root
    self.names = sorted(names['input'])
    self._paths = [
        (os.path.join(folders['input'], n), os.path.join(folders['target'], n)) for n in self.names
    ]
    for name, (inp, tgt) in zip(self.names, self._paths):
      # Headers only: refuses FIFOs and devices (whose open() blocks) and images above the
      # pixel limit before anything is decoded.
      a, b = image_io.read_size(inp), image_io.read_size(tgt)
      if a != b:
        raise DataError(f'pair {name} differs in size: input {a[0]}x{a[1]}, '
                        f'target {b[0]}x{b[1]} (HxW)')
    self.cache = cache
    self._cache: dict[int, dict[str, Any]] = {}

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index in self._cache:
      return self._cache[index]
    inp, tgt = (load_rgb(p) for p in self._paths[index])
    example = {'input': inp, 'target': tgt, 'name': self.names[index]}
    if self.cache:
      self._cache[index] = example
    return example

  def preload(self) -> PairedFolderSource:
    """Decodes every pair into memory now (needs `cache=True`); returns self."""
    if not self.cache:
      raise ValueError('preload() needs PairedFolderSource(..., cache=True)')
    for i in range(len(self)):
      self[i]
    return self


# Natural RGB photographs inside scikit-image's wheel (no download): name -> loader name.
BUNDLED_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'motorcycle')
VALIDATION_PHOTOS = ('coffee', 'motorcycle')  # fixed, so validation PSNR compares across runs


def load_bundled_photos(names: Sequence[str] = BUNDLED_PHOTOS) -> dict[str, np.ndarray]:
  """The named scikit-image photos as uint8 (H, W, 3) arrays, read offline."""
  photos = {}
  for name in names:
    if name not in BUNDLED_PHOTOS:
      raise DataError(f'unknown bundled photo {name!r}; choose from {BUNDLED_PHOTOS}')
    # motorcycle: the left view of the stereo pair (the right one is nearly the same photo).
    image = skimage.data.stereo_motorcycle()[0] if name == 'motorcycle' else getattr(
        skimage.data, name)()
    photos[name] = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
  return photos


def bundled_photo_split() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, validation) dicts of bundled photos; validation is `VALIDATION_PHOTOS`."""
  photos = load_bundled_photos()
  train = {k: v for k, v in photos.items() if k not in VALIDATION_PHOTOS}
  return train, {k: photos[k] for k in VALIDATION_PHOTOS}


DEGRADATIONS = ('noise', 'gaussian_blur', 'motion_blur')


def motion_kernel(length: int, angle: float) -> np.ndarray:
  """(L, L) normalised kernel: a line of `length` pixels through the centre at `angle` rad."""
  size = length if length % 2 else length + 1
  kernel = np.zeros((size, size), np.float64)
  centre = (size - 1) / 2
  for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length):
    kernel[int(round(centre - t * np.sin(angle))), int(round(centre + t * np.cos(angle)))] += 1
  return kernel / kernel.sum()


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator, *, noise_sigma=(5.0, 50.0),
            blur_sigma=(0.5, 3.0), motion_length=(5, 21)) -> np.ndarray:
  """A degraded copy of uint8 (H, W, 3): Gaussian noise (sigma on the 0-255 scale), Gaussian
  blur, motion blur (random line kernel), or 'mixed' (one of the three). Ranges are uniform
  [low, high]. Blurs reflect at the borders; the result is rounded and clipped to uint8."""

  if kind == 'mixed':
    kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
  clean = image.astype(np.float32)
  if kind == 'noise':
    sigma = rng.uniform(*noise_sigma)
    out = clean + rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(sigma)
  elif kind == 'gaussian_blur':
    sigma = rng.uniform(*blur_sigma)
    out = ndimage.gaussian_filter(clean, sigma=(sigma, sigma, 0), mode='reflect')
  elif kind == 'motion_blur':
    kernel = motion_kernel(int(rng.integers(motion_length[0], motion_length[1] + 1)),
                           rng.uniform(0, np.pi)).astype(np.float32)
    r = kernel.shape[0] // 2
    padded = np.pad(clean, ((r, r), (r, r), (0, 0)), mode='reflect')
    # FFT: a 21x21 kernel over a photo is ~10x faster than direct convolution.
    out = signal.fftconvolve(padded, kernel[..., None], mode='valid', axes=(0, 1))
  else:
    raise DataError(f'unknown degradation {kind!r}; choose from {DEGRADATIONS + ("mixed",)}')
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class SyntheticSource:
  """Clean images degraded on the fly: example i = image i % n, variant i // n.

  Each example's randomness comes from its own Generator seeded by (seed, i), so results
  never depend on worker order. A grain epoch re-reads the same indices; use `variants` > 1
  for more degradations of the same photos per epoch (length = n * variants).
  """

  def __init__(self, images: Mapping[str, np.ndarray] | Sequence[np.ndarray] | None = None,
               degradation: str = 'mixed', seed: int = 0, *, variants: int = 1, **ranges):
    if images is None:
      images = bundled_photo_split()[0]
    if not isinstance(images, Mapping):
      images = {f'image{i:04d}': im for i, im in enumerate(images)}
    if not images:
      raise DataError('SyntheticSource needs at least one image')
    self.names = list(images)
    self.images = [np.ascontiguousarray(im, dtype=np.uint8) for im in images.values()]
    if degradation not in DEGRADATIONS + ('mixed',):
      raise DataError(f'unknown degradation {degradation!r}')
    self.degradation, self.seed, self.variants, self.ranges = degradation, seed, variants, ranges

  def __len__(self) -> int:
    return len(self.images) * self.variants

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    clean = self.images[index % len(self.images)]
    rng = np.random.default_rng([self.seed, index])
    return {
        'input': degrade(clean, self.degradation, rng, **self.ranges), 'target': clean,
        'name': f'{self.names[index % len(self.images)]}#{index // len(self.images)}'
    }


class _TrainCrop(grain.transforms.RandomMap):
  """Example -> {'input', 'target': float32 (P, P, 3)}; a class so workers can pickle it."""

  def __init__(self, patch_size: int, saturation: float):
    self.patch_size, self.saturation = patch_size, saturation

  def random_map(self, example, rng):
    inp, tgt = augment.train_pair(example['input'], example['target'], self.patch_size, rng,
                                  saturation=self.saturation)
    return {'input': inp, 'target': tgt}


def _unwrap_one(batch_of_one: dict) -> dict:
  return {key: value[0] for key, value in batch_of_one.items()}


def _mark_absl_flags_parsed():
  # grain reads absl flags in its worker processes; outside `absl.app.run` they are
  # unparsed and every read raises. Marking them parsed keeps the defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_loader(source, *, batch_size: int, patch_size: int, seed: int, num_workers: int = 0,
                      shard_index: int = 0, shard_count: int = 1, augment: str = 'deblur',
                      num_epochs: int | None = None, saturation: float = 0.2,
                      read_threads: int = 1) -> grain.IterDataset:
  """Shuffled, augmented training batches of one process, as a grain `IterDataset`.

  `iter(loader)` yields {'input', 'target': float32 (batch_size, P, P, 3)}.

  Args:
    batch_size: the PER-PROCESS batch size (global batch // shard_count on multi-host).
    shard_index, shard_count: this process's contiguous slice of the source; every slice has
      len(source) // shard_count examples (the remainder is dropped), so all processes
      take the same number of steps per epoch.
    seed: shuffle and augmentation seed; each epoch is shuffled differently, and each
      process derives its own streams from (seed, shard_index).
    num_workers: grain worker processes; 0 runs in this process. Batching happens before
      the workers split the work, so the batches do not depend on `num_workers`.
    augment: 'deblur' (crop, flips/rotations, random saturation) or 'plain' (no saturation).
    num_epochs: None repeats forever. Batches may straddle epoch boundaries.
  """
  if augment not in ('deblur', 'plain'):
    raise DataError(f"augment must be 'deblur' or 'plain', got {augment!r}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in 0..{shard_count - 1}')
  per_shard = len(source) // shard_count
  if per_shard < batch_size:
    raise DataError(f'{len(source)} examples over {shard_count} processes is fewer than '
                    f'one batch of {batch_size} per process')
  _mark_absl_flags_parsed()
  shuffle_seed, augment_seed = np.random.SeedSequence([seed, shard_index]).generate_state(2)
  ds = grain.MapDataset.source(source)[shard_index * per_shard:(shard_index + 1) * per_shard]
  ds = ds.shuffle(seed=int(shuffle_seed)).repeat(num_epochs)
  ds = ds.random_map(_TrainCrop(patch_size, saturation if augment == 'deblur' else 0.0),
                     seed=int(augment_seed))
  ds = ds.batch(batch_size, drop_remainder=True)
  # A small buffer: each element is a whole batch (16x256x256x3x2 float32 = 25 MB).
  it = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  if num_workers > 0:
    # Workers hand batches over through shared memory only from an IterDataset `batch`;
    # a batch of one batch gets that (not pickling 25 MB) and keeps the batches themselves
    # formed before the workers split the work, so they do not depend on num_workers.
    it = it.batch(1).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    it = it.map(_unwrap_one)
  return it


def loader_state(iterator) -> dict:
  """The position of an iterator of `make_train_loader`: a small JSON-serialisable dict."""
  return iterator.get_state()


def restore_loader(iterator, state: dict):
  """Moves a fresh `iter(loader)` to a saved `loader_state`; returns the iterator."""
  iterator.set_state(state)
  return iterator


def make_eval_batches(source, patch_size: int | None, batch_size: int = 1) -> list[dict]:
  """Deterministic validation batches {'input', 'target': float32 (B, h, w, 3), 'name': [str]}.

  patch_size P: the central P x P crop of each pair (torchvision's offsets), B = batch_size
  (the last batch may be smaller). None: whole images one at a time (B = 1), cropped at the
  top left to multiples of 8.
  """
  batches, pending = [], []
  for i in range(len(source)):
    example = source[i]
    crop = ((lambda im: augment.center_crop(im, patch_size))
            if patch_size else augment.crop_to_multiple)
    pending.append((augment.to_float(crop(example['input'])),
                    augment.to_float(crop(example['target'])), example['name']))
    if len(pending) == (batch_size if patch_size else 1) or i == len(source) - 1:
      batches.append({
          'input': np.stack([p[0] for p in pending]), 'target': np.stack([p[1] for p in pending]),
          'name': [p[2] for p in pending]
      })
      pending = []
  return batches

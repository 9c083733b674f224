"""Restoring images with a trained MPRNet: the `Restorer` API, self-ensembling, and the folder
loops behind `mprnet restore` and `mprnet evaluate`."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mprnet_jax import storage, tiling
from mprnet_jax.errors import MprnetError
from mprnet_jax.files import refuse_overwriting_inputs, require_regular_file
from mprnet_jax.image_io import ImageError, list_images, read_image, write_image
from mprnet_jax.model import MPRNet, abstract_mprnet, compute_dtype

# Tile sizes tried, largest first, when a whole image does not fit in device memory.
FALLBACK_TILES = (1024, 512, 256)
# Peak working memory of one forward pass, per padded input pixel and per channel of
# (n_feat + scale_orsnetfeats): XLA's buffer plan (`memory_analysis().temp_size_in_bytes`, CPU,
# float32) is linear in the pixels, 5376 bytes/pixel for the deblurring sizes (96 + 32) and 992
# for n_feat=16, scale_orsnetfeats=8, i.e. 41-42 per channel; 44 leaves a margin. Used as is for
# bfloat16, where it overestimates.
_BYTES_PER_PIXEL_CHANNEL = 44
# Fraction of the free memory a whole-image pass may plan to use before tiling instead.
_MEMORY_HEADROOM = 0.7


def _is_out_of_memory(error: Exception) -> bool:
  return (isinstance(error, MemoryError) or 'RESOURCE_EXHAUSTED' in str(error) or
          'out of memory' in str(error).lower())


def _free_memory_bytes(device) -> int | None:
  """Memory free for a forward pass on `device`: the accelerator's free memory, or on the CPU
  the system's available memory (MemAvailable), bounded by the container's (cgroup v2) limit
  and the address-space limit; None when unknown."""
  if device.platform != 'cpu':
    try:
      stats = device.memory_stats() or {}
      return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
    except (KeyError, TypeError, ValueError, RuntimeError):
      return None
  free = None
  try:
    with open('/proc/meminfo') as info:
      for line in info:
        if line.startswith('MemAvailable:'):
          free = int(line.split()[1]) * 1024
  except OSError:
    pass
  try:  # a container's limit, which MemAvailable (the host's) does not show
    limit = Path('/sys/fs/cgroup/memory.max').read_text().strip()
    if limit != 'max':
      left = int(limit) - int(Path('/sys/fs/cgroup/memory.current').read_text())
      free = left if free is None else min(free, left)
  except (OSError, ValueError):
    pass
  try:
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
      with open('/proc/self/statm') as statm:
        used = int(statm.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
      free = min(free if free is not None else soft, soft - used)
  except (ImportError, OSError, ValueError):
    pass
  return free


def _geometric(x: jax.Array, mode: int) -> jax.Array:
  """One of the 8 flips/rotations of (N, H, W, C) images (mode 4+ adds a vertical flip)."""
  x = jnp.flip(x, axis=1) if mode >= 4 else x
  return jnp.rot90(x, k=mode % 4, axes=(1, 2))


def _inverse_geometric(x: jax.Array, mode: int) -> jax.Array:
  x = jnp.rot90(x, k=-(mode % 4), axes=(1, 2))
  return jnp.flip(x, axis=1) if mode >= 4 else x


# The jitted forward pass of the networks restored with lately, by graph (sizes and compute
# dtype) and XLA optimisation setting: every Restorer of the same network shares it, so a new
# one (each command, each test) neither traces nor compiles again for an image size seen before.
@functools.lru_cache(maxsize=4)
def _jitted_apply(graphdef, disable_most_optimizations: bool):
  """`apply(params, x)`: the final stage's output of the network `graphdef`, clipped to [0, 1]."""
  del disable_most_optimizations  # part of the cache key only

  @jax.jit
  def apply(params, x):
    outputs = nnx.merge(graphdef, params)(x)
    return jnp.clip(outputs[0], 0.0, 1.0)

  return apply


class Restorer:
  """Restores images with an MPRNet.

  `Restorer(weights)` takes our .safetensors weights, an official .pth, a training workdir
  (each a path or a `gs://` URL), or an MPRNet. Calling it on an (H, W, 3) image (uint8, uint16, or float in [0, 1]; any H and W)
  returns the restored image with the same dtype and size.

  Args:
    dtype: 'float32' or 'bfloat16' compute.
    tile, overlap: restore in overlapping tiles of `tile` pixels (None: whole image, falling
      back to tiles automatically when the device runs out of memory).
    bucket: images are reflect-padded at the bottom/right to a multiple of `bucket` (a multiple
      of 8) so that images of similar sizes share one compiled function. 8 is exactly the
      official demo's padding; larger buckets compile less often and change the output only
      near the bottom/right border.
    ensemble: average the 8 flips/rotations (geometric self-ensemble).
    memory_budget: bytes a whole-image pass may use (None: 70% of the device's free memory,
      on the CPU the system's available memory). Without `tile`, an image whose estimated
      peak (`estimate_bytes`) exceeds it is restored in tiles from the start, with a warning:
      on the CPU an oversized allocation may kill the process rather than raise an error. An
      out-of-memory error that still happens falls back to tiles too.
  """

  def __init__(self, weights, *, dtype: str = 'float32', tile: int | None = None, overlap: int = 64,
               bucket: int = 8, ensemble: bool = False, memory_budget: int | None = None):
    compute = compute_dtype(dtype)
    if bucket <= 0 or bucket % 8:
      raise MprnetError(f'bucket must be a positive multiple of 8, got {bucket}')
    if isinstance(weights, MPRNet):
      model = weights
    else:
      from mprnet_jax.weights import load_model
      model = load_model(weights, dtype=compute)
    if jnp.dtype(model.dtype) != jnp.dtype(compute):  # always the dtype asked for
      rebuilt = abstract_mprnet(**model.config.to_dict(), dtype=compute)
      nnx.update(rebuilt, nnx.state(model, nnx.Param))
      model = rebuilt
    self.model, self.tile, self.overlap, self.bucket = model, tile, overlap, bucket
    self.ensemble, self.memory_budget = ensemble, memory_budget
    graphdef, params = nnx.split(model)
    self._params = params
    self._apply = _jitted_apply(graphdef, jax.config.values.get('jax_disable_most_optimizations'))

  def apply_batch(self, x: jax.Array) -> jax.Array:
    """The network's final output, clipped to [0, 1], for (N, H, W, 3) with H, W multiples of 8;
    with `ensemble`, the mean over the 8 flips/rotations."""
    if not self.ensemble:
      return self._apply(self._params, x)
    total = sum(
        _inverse_geometric(self._apply(self._params, _geometric(x, mode)), mode)
        for mode in range(8))
    return total / 8.0

  def estimate_bytes(self, height: int, width: int) -> int:
    """Estimated peak memory of one whole-image forward pass on an (height, width) image
    (padded to the bucket), parameters included."""
    padded = -(-height // self.bucket) * self.bucket * (-(-width // self.bucket) * self.bucket)
    config = self.model.config
    params = sum(int(np.size(p)) * 4 for p in jax.tree_util.tree_leaves(self._params))
    channels = config.n_feat + config.scale_orsnetfeats
    return padded * channels * _BYTES_PER_PIXEL_CHANNEL + params

  def _budget(self) -> int | None:
    if self.memory_budget is not None:
      return self.memory_budget
    free = _free_memory_bytes(jax.devices()[0])
    return None if free is None else int(free * _MEMORY_HEADROOM)

  def restore_float(self, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] -> restored (H, W, 3) float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'expected an (H, W, 3) image, got shape {image.shape}')
    if self.tile:
      return tiling.restore_tiled(self.apply_batch, image, self.tile, self.overlap, self.bucket)
    height, width = image.shape[:2]
    budget, need = self._budget(), self.estimate_bytes(height, width)
    tiles = [t for t in FALLBACK_TILES if t < max(height, width)]
    if budget is not None and need > budget and tiles:
      # Tile before running: on the CPU the kernel may kill the process instead of XLA
      # reporting RESOURCE_EXHAUSTED, and then nothing could fall back.
      fitting = [t for t in tiles if self.estimate_bytes(t, t) <= budget] or tiles[-1:]
      warnings.warn(
          f'image of {height}x{width} needs about {need / 2**30:.1f} GiB to restore '
          f'whole, more than the {budget / 2**30:.1f} GiB budget on '
          f'{jax.devices()[0].platform}; restoring in {fitting[0]}-pixel tiles', stacklevel=2)
      tiles = fitting
    else:
      try:
        return tiling.restore_full(self.apply_batch, image, self.bucket)
      except Exception as error:  # XLA reports running out of memory as a runtime error
        if not _is_out_of_memory(error):
          raise
      if tiles:
        warnings.warn(
            f'image of {height}x{width} does not fit in device memory; restoring in '
            f'{tiles[0]}-pixel tiles', stacklevel=2)
    for index, tile in enumerate(tiles):
      if index:
        warnings.warn(
            f'image of {height}x{width} does not fit in device memory even in '
            f'{tiles[index - 1]}-pixel tiles; restoring in {tile}-pixel tiles', stacklevel=2)
      try:
        return tiling.restore_tiled(self.apply_batch, image, tile, min(self.overlap, tile // 4),
                                    self.bucket, batch_tiles=1)
      except Exception as error:
        if not _is_out_of_memory(error):
          raise
    raise MprnetError(f'image of {image.shape[0]}x{image.shape[1]} does not fit in device memory '
                      f'even in {FALLBACK_TILES[-1]}-pixel tiles')

  def __call__(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
      peak = np.iinfo(image.dtype).max
      restored = self.restore_float(image.astype(np.float32) / peak)
      return np.round(restored * peak).astype(image.dtype)
    return self.restore_float(image.astype(np.float32))


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
  """The image files named by `inputs` (files, or folders whose images are taken, sorted)."""
  files: list[Path] = []
  for item in map(Path, inputs):
    if item.is_dir():
      files.extend(list_images(item))
    elif not item.exists():
      raise ImageError(f'{item}: no such file or folder')
    else:  # refuses a FIFO, device or socket, whose open() could block forever
      files.append(require_regular_file(item, ImageError, 'image file'))
  if not files:
    raise ImageError('no input images given')
  return files


def restore_files(restorer: Restorer, inputs: Iterable[str | os.PathLike],
                  output_dir: str | os.PathLike, *, suffix: str | None = None,
                  progress: bool = True) -> list[Path | str]:
  """Restores every image of `inputs` into `output_dir` (same name; same format unless
  `suffix`); never writes over an input. Returns the written paths.

  Inputs and `output_dir` may be URLs (`gs://...`): inputs are staged into the local cache,
  and the restorations are written to a local folder and uploaded when all are done (their
  URLs are returned)."""
  inputs = [
      storage.stage_in(item, 'image or folder of images') if storage.is_remote(item) else item
      for item in inputs
  ]
  with storage.urls_in_errors():
    files = collect_inputs(inputs)
  if storage.is_remote(output_dir):
    targets = _remote_targets(files, os.fspath(output_dir), suffix)
  else:
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
      raise NotADirectoryError(f'{output_dir}: output folder is a file')
    targets = [output_dir / (f.stem + (suffix or f.suffix)) for f in files]
    resolved_inputs = {f.resolve() for f in files}
    for target in targets:
      if target.resolve() in resolved_inputs:
        raise FileExistsError(f'{target}: would overwrite an input; choose another --output')
      refuse_overwriting_inputs(target, files, FileExistsError)  # hard links: the same inode
  if len(set(targets)) != len(targets):
    raise MprnetError('two inputs share a file name; restore them into separate folders')
  with storage.local_output_dir(output_dir) as local_dir:
    local_dir.mkdir(parents=True, exist_ok=True)
    for source, target in tqdm(list(zip(files, targets)), desc='restore', unit='img',
                               disable=not progress):
      with storage.urls_in_errors():
        image, info = read_image(source)
      write_image(local_dir / Path(target).name, restorer.restore_float(image), info)
  return targets


def _remote_targets(files: list[Path], output_url: str, suffix: str | None) -> list[str]:
  """The URLs the restorations of `files` go to, refusing any that is an input: an object has
  no inode, so inputs and outputs are compared by their normalised URLs (a staged input by the
  URL it was staged from)."""
  if storage.exists(output_url) and not storage.is_dir(output_url):
    raise NotADirectoryError(f'{output_url}: output folder is a file')
  staged_from = [storage.display_name(os.fspath(f)) for f in files]
  input_urls = {storage.normalize(url) for url in staged_from if storage.is_remote(url)}
  targets = [storage.join(output_url, f.stem + (suffix or f.suffix)) for f in files]
  for target in targets:
    if storage.normalize(target) in input_urls:
      raise FileExistsError(f'{target}: would overwrite an input; choose another --output')
  return targets


def evaluate_folder(restorer: Restorer, data_dir: str | os.PathLike, *,
                    csv_path: str | os.PathLike | None = None, protocol: str = 'rgb',
                    progress: bool = True) -> dict[str, float | list]:
  """PSNR and SSIM of the restorations of a paired folder (`input/`, `target/`) under
  `protocol` (default 'rgb': RGB, [0, 1]; see `protocols.py`). Writes a CSV (one row per
  image, then the means) when asked. The result also holds the rows under 'rows'."""
  from mprnet_jax import protocols

  summary = protocols.evaluate_pairs(protocol, data_dir, restorer=restorer, progress=progress)
  summary['rows'] = summary['per_image']
  if csv_path is not None:
    protocols.write_csv(csv_path, [summary])
  return summary

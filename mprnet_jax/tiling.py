"""Inference geometry: pad to a multiple of 8, and restore large images tile by tile.

Model-agnostic: everything here takes an `apply_fn` mapping float32 (N, h, w, C) -> (N, h, w, C)
with h and w multiples of 8 (MPRNet halves its input twice per axis in stage 1 and its U-Net
downsamples twice more). The tiled path exists because the official code restores a whole image
in one forward pass and runs out of device memory on large photographs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax.numpy as jnp
import numpy as np

from mprnet_jax.errors import MprnetError

__all__ = ['pad_to_multiple', 'restore_full', 'restore_tiled', 'blend_window', 'tile_starts']

ApplyFn = Callable[[jnp.ndarray], jnp.ndarray]


def pad_to_multiple(image, multiple: int = 8) -> tuple[jnp.ndarray, tuple[int, int]]:
  """Reflect-pad the bottom and right of (..., H, W, C) up to multiples of `multiple`.

  Returns the padded (..., Hp, Wp, C) array and the original (H, W). As the official demo
  (`F.pad(x, (0, padw, 0, padh), 'reflect')`), the pad is `(-H) % multiple` rows at the bottom
  and `(-W) % multiple` columns at the right, mirrored without repeating the edge pixel.
  Unlike torch, an axis shorter than its pad + 1 does not fail: the reflection repeats
  (numpy's rule), and a 1-pixel axis is repeated.
  """
  if multiple < 1:
    raise ValueError(f'multiple must be >= 1, got {multiple}')
  image = jnp.asarray(image)
  if image.ndim < 3:
    raise ValueError(f'expected (..., H, W, C), got shape {image.shape}')
  height, width = image.shape[-3], image.shape[-2]
  pad_h, pad_w = (-height) % multiple, (-width) % multiple
  if pad_h or pad_w:
    widths = [(0, 0)] * (image.ndim - 3) + [(0, pad_h), (0, pad_w), (0, 0)]
    image = jnp.pad(image, widths, mode='reflect')
  return image, (height, width)


def restore_full(apply_fn: ApplyFn, image, multiple: int = 8) -> np.ndarray:
  """Restore one (H, W, C) image in a single call: pad, apply, crop -> (H, W, C) float32."""
  image = jnp.asarray(image, jnp.float32)
  if image.ndim != 3:
    raise ValueError(f'expected one image (H, W, C), got shape {image.shape}')
  padded, (height, width) = pad_to_multiple(image, multiple)
  restored = apply_fn(padded[None])
  return np.asarray(restored[0, :height, :width], dtype=np.float32)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of size `tile` covering [0, length), at stride tile - overlap.

  The last tile is moved flush with the end (it may then overlap its neighbour by more than
  `overlap`), so every tile has the same size and the function compiles once.
  """
  if tile >= length:
    return [0]
  starts = list(range(0, length - tile, tile - overlap))
  return starts + [length - tile]


def blend_window(size: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
  """1-D blending weights (size,) float32 for one tile along one axis.

  A network's output is wrong near a tile's edge (it sees its own zero padding there, not the
  neighbouring pixels), so on a side that faces another tile the weight is zero over the outer
  `overlap // 4` pixels and then rises linearly across the middle of the overlap to 1. Two
  neighbours overlapping by exactly `overlap` get weights summing to 1 (a cross-fade); the
  caller normalises by the summed weights anyway. A side on the image border keeps weight 1:
  no other tile covers it. Every pixel thus has positive total weight as long as tiles overlap
  by at least `overlap`.
  """
  margin = overlap // 4
  ramp = overlap - 2 * margin
  index = np.arange(size, dtype=np.float64)
  rise = np.clip((index - margin + 1) / (ramp + 1), 0.0, 1.0)
  weights = np.ones(size)
  if not at_start:
    weights = np.minimum(weights, rise)
  if not at_end:
    weights = np.minimum(weights, rise[::-1])
  return weights.astype(np.float32)


def _batches(items: list, size: int) -> Iterator[list]:
  for begin in range(0, len(items), size):
    yield items[begin:begin + size]


def restore_tiled(
    apply_fn: ApplyFn,
    image,
    tile: int,
    overlap: int,
    multiple: int = 8,
    batch_tiles: int = 4,
) -> np.ndarray:
  """Restore one (H, W, C) image tile by tile -> (H, W, C) float32.

  The image is padded as in `restore_full`, cut into tiles of `tile` x `tile` (smaller along an
  axis the padded image does not exceed) overlapping by at least `overlap`, and the tiles go
  through `apply_fn` in batches of `batch_tiles` (the last batch is filled up with repeats, so
  one shape and one compilation serve the whole image). Outputs are blended with
  `blend_window` weights, normalised by their sum on the host, and cropped back.

  When `tile` covers the padded image, this is exactly `restore_full` (bit for bit).
  `overlap` should exceed four times the distance over which the network's output feels a
  tile's edge for the blend to be seamless.
  """
  if tile <= 0 or tile % multiple:
    raise MprnetError(f'tile must be a positive multiple of {multiple}, got {tile}')
  if overlap < 0 or overlap >= tile:
    raise MprnetError(f'overlap must be in [0, tile={tile}), got {overlap}')
  if batch_tiles < 1:
    raise MprnetError(f'batch_tiles must be >= 1, got {batch_tiles}')
  image = jnp.asarray(image, jnp.float32)
  if image.ndim != 3:
    raise ValueError(f'expected one image (H, W, C), got shape {image.shape}')
  padded, (height, width) = pad_to_multiple(image, multiple)
  padded_h, padded_w, channels = padded.shape
  if tile >= padded_h and tile >= padded_w:
    return restore_full(apply_fn, image, multiple)
  padded = np.asarray(padded)  # tiles are sliced on the host

  tile_h, tile_w = min(tile, padded_h), min(tile, padded_w)
  rows, cols = tile_starts(padded_h, tile_h, overlap), tile_starts(padded_w, tile_w, overlap)
  row_weights = {
      top: blend_window(tile_h, overlap, top == 0, top + tile_h == padded_h) for top in rows
  }
  col_weights = {
      left: blend_window(tile_w, overlap, left == 0, left + tile_w == padded_w) for left in cols
  }
  # Accumulate on the host: the point of tiling is an image too large for the device.
  total = np.zeros((padded_h, padded_w, channels), np.float32)
  weight_sum = np.zeros((padded_h, padded_w, 1), np.float32)
  positions = [(top, left) for top in rows for left in cols]
  for batch in _batches(positions, batch_tiles):
    tiles = [padded[top:top + tile_h, left:left + tile_w] for top, left in batch]
    tiles += [tiles[-1]] * (batch_tiles - len(tiles))
    outputs = np.asarray(apply_fn(jnp.stack(tiles)), dtype=np.float32)
    for (top, left), output in zip(batch, outputs):
      weights = np.outer(row_weights[top], col_weights[left])[:, :, None]
      total[top:top + tile_h, left:left + tile_w] += weights * output
      weight_sum[top:top + tile_h, left:left + tile_w] += weights
  return (total / weight_sum)[:height, :width]

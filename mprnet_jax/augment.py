"""Per-example augmentations of (input, target) pairs, and batch MixUp.

The numpy functions run in the data pipeline (grain workers), one example at a time, on
HxWx3 arrays; every random choice comes from a `numpy.random.Generator` passed in, so
results depend only on the seed and the example's index, never on worker order.
`mixup` runs inside the jitted train step, so it is pure `jax.numpy` with an explicit key.

They follow the official MPRNet training loaders (`dataset_RGB.py`): reflect-pad to the
patch size, random crop at the same place in both images, one of 8 flips/rotations, and for
deblurring a random saturation change applied to both images with the same factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ITU-R 601 luma weights: the grayscale that torchvision's `adjust_saturation` blends with.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

NUM_GEOMETRIC = 8


def pad_to_patch(image: np.ndarray, patch_size: int) -> np.ndarray:
  """Reflect-pads (H, W, C) at the bottom and right to at least (P, P, C).

  As the official loader: padding only on the far sides, 'reflect' (edge not repeated).
  Apply to input and target alike, so the pair stays aligned.
  """
  h, w = image.shape[:2]
  pad_h, pad_w = max(patch_size - h, 0), max(patch_size - w, 0)
  if pad_h == 0 and pad_w == 0:
    return image
  return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode='reflect')


def random_crop_pair(inp: np.ndarray, tgt: np.ndarray, patch_size: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Crops (P, P, C) from both images at one random position (after reflect-padding)."""
  if inp.shape[:2] != tgt.shape[:2]:
    raise ValueError(f'input {inp.shape} and target {tgt.shape} differ in size')
  inp, tgt = pad_to_patch(inp, patch_size), pad_to_patch(tgt, patch_size)
  h, w = inp.shape[:2]
  top = int(rng.integers(0, h - patch_size + 1))
  left = int(rng.integers(0, w - patch_size + 1))
  window = (slice(top, top + patch_size), slice(left, left + patch_size))
  return inp[window], tgt[window]


def geometric(image: np.ndarray, mode: int) -> np.ndarray:
  """One of the 8 flips/rotations of (H, W, C), numbered as the official loader.

  0 identity, 1 flip rows (up-down), 2 flip columns (left-right), 3/4/5 rot90 k=1/2/3,
  6 rot90 of the up-down flip, 7 rot90 of the left-right flip.
  """
  if mode == 0:
    return image
  if mode == 1:
    return image[::-1]
  if mode == 2:
    return image[:, ::-1]
  if mode in (3, 4, 5):
    return np.rot90(image, k=mode - 2, axes=(0, 1))
  if mode == 6:
    return np.rot90(image[::-1], axes=(0, 1))
  if mode == 7:
    return np.rot90(image[:, ::-1], axes=(0, 1))
  raise ValueError(f'geometric mode must be in 0..7, got {mode}')


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """Scales saturation of float (H, W, 3) in [0, 1]: blend with its luma gray, clip.

  out = clip(factor * image + (1 - factor) * gray, 0, 1), gray = 0.299 R + 0.587 G + 0.114 B;
  the definition of torchvision's `adjust_saturation`, which the official code calls.
  factor 1 is the identity, 0 gives the gray image, > 1 saturates more.
  """
  gray = image @ _LUMA
  out = factor * image + (1.0 - factor) * gray[..., None]
  return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, C) -> float32 in [0, 1]; float input is passed through as float32."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) * np.float32(1.0 / 255.0)
  return image.astype(np.float32, copy=False)


def train_pair(
    inp: np.ndarray,
    tgt: np.ndarray,
    patch_size: int,
    rng: np.random.Generator,
    *,
    saturation: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
  """The training augmentation of one pair: (H, W, 3) uint8 -> two (P, P, 3) float32.

  Crop first, then convert: converting a 720p frame to float would cost ~50x the crop.
  With `saturation` = s > 0 (deblurring recipe), as the official loader: one time in three,
  both crops get the same saturation factor drawn uniformly in [1 - s, 1 + s].
  """
  inp, tgt = random_crop_pair(inp, tgt, patch_size, rng)
  mode = int(rng.integers(0, NUM_GEOMETRIC))
  inp, tgt = to_float(geometric(inp, mode)), to_float(geometric(tgt, mode))
  if saturation > 0 and int(rng.integers(0, 3)) == 2:
    factor = 1.0 + saturation * (2.0 * float(rng.random()) - 1.0)
    inp, tgt = adjust_saturation(inp, factor), adjust_saturation(tgt, factor)
  # Contiguous copies: rotated views would be copied anyway when batched, and contiguous
  # arrays pickle cheaply between worker processes.
  return np.ascontiguousarray(inp), np.ascontiguousarray(tgt)


def center_crop(image: np.ndarray, patch_size: int) -> np.ndarray:
  """Central (P, P, C) window of (H, W, C), reflect-padded first if smaller.

  Offsets round((H - P) / 2) as torchvision's `center_crop` (the official validation crop).
  """
  image = pad_to_patch(image, patch_size)
  h, w = image.shape[:2]
  top = int(round((h - patch_size) / 2.0))
  left = int(round((w - patch_size) / 2.0))
  return image[top:top + patch_size, left:left + patch_size]


def crop_to_multiple(image: np.ndarray, multiple: int = 8) -> np.ndarray:
  """Top-left (H - H % m, W - W % m) window: the network needs sides divisible by 8."""
  h, w = image.shape[:2]
  return image[:h - h % multiple, :w - w % multiple]


def mixup(rng: jax.Array, inputs: jax.Array, targets: jax.Array,
          alpha: float = 0.6) -> tuple[jax.Array, jax.Array]:
  """MixUp of a batch with a shuffled copy of itself (official denoising recipe).

  Args:
    rng: a JAX PRNG key.
    inputs, targets: (B, H, W, C) arrays.
    alpha: both parameters of the Beta distribution of the weights.

  Returns:
    (lam * inputs + (1 - lam) * inputs[perm], same for targets), with lam ~ Beta(alpha,
    alpha) of shape (B, 1, 1, 1), and one permutation `perm` shared by both, so a mixed
    input still matches its mixed target.
  """
  key_lam, key_perm = jax.random.split(rng)
  batch = inputs.shape[0]
  lam = jax.random.beta(key_lam, alpha, alpha, (batch, 1, 1, 1), dtype=jnp.float32)
  perm = jax.random.permutation(key_perm, batch)
  mixed_inputs = lam * inputs + (1.0 - lam) * inputs[perm]
  mixed_targets = lam * targets + (1.0 - lam) * targets[perm]
  return mixed_inputs.astype(inputs.dtype), mixed_targets.astype(targets.dtype)

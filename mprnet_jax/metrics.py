"""Image-quality metrics under the protocols the official MPRNet evaluation uses.

Pure JAX, float32, jit-able; every function accepts one image (H, W, C) or a batch (N, H, W, C)
and returns one value per image (shape () or (N,)).

- `psnr`, `ssim`: RGB metrics on [0, 1] floats. `psnr` is the official `utils.torchPSNR` /
  MATLAB `psnr` definition; `ssim` is scikit-image's `structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)`, which the official
  RealBlur evaluation uses.
- `psnr_y`, `ssim_y`: the official deraining protocol (`Deraining/evaluate_PSNR_SSIM.m`):
  MATLAB `rgb2ycbcr` of the uint8 images, Y channel only, PSNR at peak 255, and Wang's
  `SSIM_index` (11x11 Gaussian window, sigma 1.5, K = (0.01, 0.03), L = 255, 'valid' filtering,
  no downsampling).

- `psnr_matlab`, `ssim_matlab`: MATLAB's `psnr` and default `ssim`, which the official
  GoPro/HIDE (`Deblurring/evaluate_GOPRO_HIDE.m`, uint8, L = 255) and SIDD
  (`Denoising/evaluate_SIDD.m`, single in [0, 1], L = 1) evaluations call. MATLAB's `ssim`
  treats an H x W x 3 array as a 3-D volume: an 11 x 11 x 11 Gaussian (sigma 1.5) with
  'replicate' padding along all three axes, the channel axis included, and the mean of the
  whole map. This is not the per-channel mean of 2-D SSIMs (0.59 against 0.40 on a noisy photo).
- `realblur_psnr_ssim`: the official RealBlur evaluation (`Deblurring/evaluate_RealBlur.py`):
  intensity matching and ECC homography alignment of the restoration to the target (OpenCV,
  the `[eval]` extra), then PSNR and scikit-image's Gaussian SSIM over the valid mask.

Every SSIM is checked against the fixtures' reference numbers (scikit-image, GNU Octave, and a
float64 implementation of MATLAB's documented `ssim`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mprnet_jax.errors import MprnetError

__all__ = [
    'psnr', 'ssim', 'psnr_y', 'ssim_y', 'gaussian_taps', 'rgb_to_y', 'psnr_matlab', 'ssim_matlab',
    'realblur_align', 'realblur_masked_metrics', 'realblur_psnr_ssim', 'require_opencv'
]

_SIGMA = 1.5
_TRUNCATE = 3.5  # scikit-image's default for gaussian_weights: radius int(3.5 * 1.5 + 0.5) = 5
_K1, _K2 = 0.01, 0.03


def gaussian_taps(sigma: float = _SIGMA, truncate: float = _TRUNCATE) -> jnp.ndarray:
  """Normalised 1-D Gaussian of radius int(truncate * sigma + 0.5), as scipy builds it.

  The 2-D MATLAB `fspecial('gaussian', 11, 1.5)` window is the outer product of this (its
  normalisation factorises and no entry falls below its eps cut-off), so one 1-D kernel serves
  both SSIMs.
  """
  radius = int(truncate * sigma + 0.5)
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-0.5 * (offsets / sigma)**2)
  return taps / jnp.sum(taps)


def _check_image(name: str, x: jnp.ndarray) -> None:
  if x.ndim not in (3, 4):
    raise ValueError(f'{name}: expected (H, W, C) or (N, H, W, C), got shape {x.shape}')


def psnr(restored: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """PSNR in dB of images in [0, 1]: (..., H, W, C) -> (...).

  Both images are clamped to [0, 1] (as the official `torchPSNR` does), the squared error is
  averaged over all pixels and channels, and PSNR = 10 log10(1 / mse). Identical images
  (mse == 0) give +inf, as scikit-image does.
  """
  restored = jnp.asarray(restored, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  _check_image('psnr', restored)
  if restored.shape != target.shape:
    raise ValueError(f'psnr: shapes differ: {restored.shape} vs {target.shape}')
  diff = jnp.clip(restored, 0.0, 1.0) - jnp.clip(target, 0.0, 1.0)
  mse = jnp.mean(diff * diff, axis=(-3, -2, -1))
  return 10.0 * jnp.log10(1.0 / mse)


def _filter_separable(x: jnp.ndarray, taps: jnp.ndarray) -> jnp.ndarray:
  """'valid' correlation of (..., H, W, C) with taps along H then W -> (..., H-k+1, W-k+1, C).

  A sum of shifted slices: exact, static-shaped, and cheap for 11 taps.
  """
  k = taps.shape[0]
  h, w = x.shape[-3], x.shape[-2]
  rows = sum(taps[i] * x[..., i:h - k + 1 + i, :, :] for i in range(k))
  return sum(taps[i] * rows[..., :, i:w - k + 1 + i, :] for i in range(k))


def _ssim_map(x: jnp.ndarray, y: jnp.ndarray, data_range: float, taps: jnp.ndarray) -> jnp.ndarray:
  """SSIM map of already-padded (..., H, W, C) images, population covariances, 'valid'.

  Second moments are taken about each image's mean: variance is shift-invariant, and centring
  keeps float32's cancellation in E[x^2] - E[x]^2 far below the constant C2.
  """
  x_mean = jnp.mean(x, axis=(-3, -2), keepdims=True)
  y_mean = jnp.mean(y, axis=(-3, -2), keepdims=True)
  xc, yc = x - x_mean, y - y_mean
  # One filter call on the five maps stacked keeps the compiled program five times smaller.
  stacked = jnp.stack([xc, yc, xc * xc, yc * yc, xc * yc])
  mu_xc, mu_yc, e_xx, e_yy, e_xy = _filter_separable(stacked, taps)
  var_x = e_xx - mu_xc * mu_xc
  var_y = e_yy - mu_yc * mu_yc
  cov_xy = e_xy - mu_xc * mu_yc
  mu_x, mu_y = mu_xc + x_mean, mu_yc + y_mean
  c1 = (_K1 * data_range)**2
  c2 = (_K2 * data_range)**2
  return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) *
                                                         (var_x + var_y + c2))


def ssim(restored: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """SSIM of images in [0, 1]: (..., H, W, C) -> (...), scikit-image's Gaussian definition.

  Per channel: Gaussian-weighted local statistics (11 taps, sigma 1.5) with scipy's 'reflect'
  boundary (half-sample symmetric, numpy's 'symmetric'), population covariances, data range 1;
  the map is cropped by 5 pixels on every side before averaging, then channels are averaged.
  No clamping (scikit-image does none). H and W must be at least 11, as scikit-image requires.
  """
  restored = jnp.asarray(restored, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  _check_image('ssim', restored)
  if restored.shape != target.shape:
    raise ValueError(f'ssim: shapes differ: {restored.shape} vs {target.shape}')
  taps = gaussian_taps()
  k = taps.shape[0]
  if min(restored.shape[-3:-1]) < k:
    raise ValueError(f'ssim: images must be at least {k}x{k}, got {restored.shape}')
  # Filtering the symmetric-padded image 'valid' reproduces scipy's 'reflect' filter at every
  # pixel; scikit-image then discards (k-1)//2 = pad pixels per border, which is the 'valid'
  # map of the unpadded image. So the padding never reaches the mean: skip it.
  ssim_map = _ssim_map(restored, target, 1.0, taps)
  return jnp.mean(ssim_map, axis=(-3, -2, -1))


def rgb_to_y(rgb: jnp.ndarray) -> jnp.ndarray:
  """MATLAB `rgb2ycbcr` Y channel of uint8 RGB: (..., H, W, 3) -> (..., H, W) float32 in [16, 235].

  Y = round(16 + (65.481 R + 128.553 G + 24.966 B) / 255) with R, G, B in 0..255, as MATLAB and
  Octave return it for uint8 input. Computed in exact integer arithmetic (scaled by 255000, at
  most 6e7, fits int32), rounding halves up as MATLAB's `round` does, so no float rounding can
  flip a pixel. Float input is rounded to the nearest integer and clipped to [0, 255] first.
  """
  rgb = jnp.asarray(rgb)
  if rgb.shape[-1] != 3:
    raise ValueError(f'rgb_to_y: expected 3 channels last, got shape {rgb.shape}')
  if not jnp.issubdtype(rgb.dtype, jnp.integer):
    rgb = jnp.round(rgb)
  rgb = jnp.clip(rgb, 0, 255).astype(jnp.int32)
  scaled = 16 * 255000 + 65481 * rgb[..., 0] + 128553 * rgb[..., 1] + 24966 * rgb[..., 2]
  return ((scaled + 127500) // 255000).astype(jnp.float32)


def psnr_y(restored: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """Deraining-protocol PSNR: uint8 RGB (..., H, W, 3) -> (...) dB, on the Y channel at peak 255.

  Float input is taken as values in [0, 255] and rounded first (see `rgb_to_y`). Identical
  Y channels give +inf.
  """
  _check_image('psnr_y', jnp.asarray(restored))
  y_restored, y_target = rgb_to_y(restored), rgb_to_y(target)
  if y_restored.shape != y_target.shape:
    raise ValueError(f'psnr_y: shapes differ: {y_restored.shape} vs {y_target.shape}')
  diff = y_restored - y_target
  mse = jnp.mean(diff * diff, axis=(-2, -1))
  return 10.0 * jnp.log10(255.0**2 / mse)


def ssim_y(restored: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """Deraining-protocol SSIM: uint8 RGB (..., H, W, 3) -> (...), Wang's `SSIM_index` on Y.

  11x11 Gaussian window (sigma 1.5), K = (0.01, 0.03), L = 255, 'valid' filtering (the map is
  (H-10, W-10)), averaged. No downsampling: `SSIM_index.m` (2003) has none; the fixtures
  (images up to 624x419) match it to 1e-7. Float input is rounded as in `rgb_to_y`.
  """
  _check_image('ssim_y', jnp.asarray(restored))
  y_restored, y_target = rgb_to_y(restored), rgb_to_y(target)
  if y_restored.shape != y_target.shape:
    raise ValueError(f'ssim_y: shapes differ: {y_restored.shape} vs {y_target.shape}')
  taps = gaussian_taps()
  if min(y_restored.shape[-2:]) < taps.shape[0]:
    raise ValueError(f'ssim_y: images must be at least 11x11, got {y_restored.shape}')
  # Work on [0, 1] (SSIM is unchanged when data, L and hence C1, C2 scale together).
  ssim_map = _ssim_map(y_restored[..., None] / 255.0, y_target[..., None] / 255.0, 1.0, taps)
  return jnp.mean(ssim_map, axis=(-3, -2, -1))


def psnr_matlab(restored: jnp.ndarray, target: jnp.ndarray, data_range: float = 1.0) -> jnp.ndarray:
  """MATLAB `psnr(A, REF)`: 10 log10(L^2 / MSE), the MSE over every value of (..., H, W, C).

  `data_range` is L: 255 for uint8 images as read from disk, 1 for single/double in [0, 1].
  No clamping (MATLAB does none). Identical images give +inf.
  """
  restored = jnp.asarray(restored, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  _check_image('psnr_matlab', restored)
  if restored.shape != target.shape:
    raise ValueError(f'psnr_matlab: shapes differ: {restored.shape} vs {target.shape}')
  # Work at L = 1 so float32 keeps the same relative precision for uint8 and [0, 1] data.
  diff = (restored - target) / data_range
  mse = jnp.mean(diff * diff, axis=(-3, -2, -1))
  return 10.0 * jnp.log10(1.0 / mse)


def _replicate_mixing(length: int, sigma: float = _SIGMA) -> np.ndarray:
  """The (length, length) matrix of a 'same' correlation with `taps` under 'replicate' padding.

  Along the 3-long channel axis an 11-tap filter with replicate padding reads every channel
  many times over; row c of this matrix holds the total weight it gives each channel.
  """
  radius = int(np.ceil(3 * sigma))  # MATLAB's window: 2 ceil(3 sigma) + 1 taps
  offsets = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (offsets / sigma)**2)
  taps /= taps.sum()
  mixing = np.zeros((length, length), np.float64)
  for out in range(length):
    for j, weight in enumerate(taps):
      mixing[out, min(max(out + j - radius, 0), length - 1)] += weight
  return mixing


def ssim_matlab(restored: jnp.ndarray, target: jnp.ndarray, data_range: float = 1.0) -> jnp.ndarray:
  """MATLAB `ssim(A, REF)` with default arguments: (..., H, W, C) -> (...).

  A 3-D volume SSIM, as MATLAB computes it for an H x W x 3 array: local means, variances and
  covariance under a normalised Gaussian of sigma 1.5 on an 11 x 11 x 11 window (size
  2 ceil(3 sigma) + 1 along every axis), 'replicate' padding along every axis (also the channel
  axis), C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = `data_range` (255 for uint8, 1 for single),
  and the mean of the whole H x W x C map. With C = 1 it is MATLAB's 2-D SSIM of a gray image.
  """
  restored = jnp.asarray(restored, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  _check_image('ssim_matlab', restored)
  if restored.shape != target.shape:
    raise ValueError(f'ssim_matlab: shapes differ: {restored.shape} vs {target.shape}')
  taps = gaussian_taps()  # radius 5 = ceil(3 * 1.5): MATLAB's window along each axis
  radius = (taps.shape[0] - 1) // 2
  x, y = restored / data_range, target / data_range
  # Centre on each image's mean (the filter's weights sum to 1, padding included), so float32
  # cancellation in E[x^2] - E[x]^2 stays far below C2.
  x_mean = jnp.mean(x, axis=(-3, -2, -1), keepdims=True)
  y_mean = jnp.mean(y, axis=(-3, -2, -1), keepdims=True)
  x, y = x - x_mean, y - y_mean
  widths = [(0, 0)] * (x.ndim - 3) + [(radius, radius), (radius, radius), (0, 0)]
  x = jnp.pad(x, widths, mode='edge')
  y = jnp.pad(y, widths, mode='edge')
  stacked = jnp.stack([x, y, x * x, y * y, x * y])
  spatial = _filter_separable(stacked, taps)
  mixing = jnp.asarray(_replicate_mixing(restored.shape[-1]), jnp.float32)
  mu_xc, mu_yc, e_xx, e_yy, e_xy = jnp.einsum('...c,dc->...d', spatial, mixing)
  var_x = e_xx - mu_xc * mu_xc
  var_y = e_yy - mu_yc * mu_yc
  cov_xy = e_xy - mu_xc * mu_yc
  mu_x, mu_y = mu_xc + x_mean, mu_yc + y_mean
  c1, c2 = _K1**2, _K2**2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) *
                                                             (var_x + var_y + c2))
  return jnp.mean(ssim_map, axis=(-3, -2, -1))


# --- RealBlur: ECC alignment (OpenCV), then masked metrics (JAX) ---

_ECC_ITERATIONS = 100
_ECC_EPS = 0.0
_ECC_GAUSS_SIZE = 5


def require_opencv():
  """The cv2 module, or a one-line error naming the extra that installs it."""
  try:
    import cv2
  except ImportError:
    raise MprnetError('the realblur protocol aligns images with OpenCV, which is not installed: '
                      "pip install 'mprnet-jax[eval]' (opencv-python-headless)") from None
  return cv2


def realblur_align(restored: np.ndarray, target: np.ndarray):
  """Aligns a restoration to its target as the official RealBlur evaluation does.

  Inputs: float32 (H, W, 3) in [0, 1]. The restoration is scaled by the least-squares factor
  sum(target * restored) / sum(restored^2) (intensity matching), a homography is fitted by
  OpenCV's ECC on the two gray images (100 iterations, eps 0, Gaussian filter size 5), and the
  scaled restoration is warped onto the target (bicubic, inverse map, reflected border). The
  mask is the warp of an all-ones image (nearest, zero border): the pixels the restoration
  really covers. Returns (aligned restoration * mask, target * mask, mask), float32 (H, W, 3).
  Raises cv2.error when ECC fails (e.g. on a constant image).
  """
  cv2 = require_opencv()
  restored = np.ascontiguousarray(restored, np.float32)
  target = np.ascontiguousarray(target, np.float32)
  if restored.shape != target.shape or restored.ndim != 3 or restored.shape[-1] != 3:
    raise ValueError(f'realblur_align: need two (H, W, 3) images of one size, got '
                     f'{restored.shape} and {target.shape}')
  scaled = (np.sum(target * restored) / np.sum(restored * restored)) * restored
  criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, _ECC_ITERATIONS, _ECC_EPS)
  _, warp = cv2.findTransformECC(cv2.cvtColor(target, cv2.COLOR_RGB2GRAY),
                                 cv2.cvtColor(scaled, cv2.COLOR_RGB2GRAY),
                                 np.eye(3, dtype=np.float32), cv2.MOTION_HOMOGRAPHY, criteria, None,
                                 _ECC_GAUSS_SIZE)
  size = (target.shape[1], target.shape[0])
  aligned = cv2.warpPerspective(scaled, warp, size, flags=cv2.INTER_CUBIC + cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REFLECT)
  mask = cv2.warpPerspective(np.ones_like(scaled), warp, size,
                             flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  return aligned * mask, target * mask, mask


@jax.jit
def realblur_masked_metrics(aligned: jnp.ndarray, target: jnp.ndarray,
                            mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """PSNR and SSIM of masked (..., H, W, 3) images in [0, 1], as the RealBlur evaluation.

  PSNR: the squared error summed over every value, divided by the number of valid values (the
  mask's sum, all channels), at peak 1. SSIM: scikit-image's Gaussian SSIM map (as `ssim`)
  of the masked images, weighted by the mask, cropped by the window radius (5), summed per
  channel over the mask's sum, averaged over channels.
  """
  aligned = jnp.asarray(aligned, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  err = jnp.sum((target - aligned)**2, axis=(-3, -2, -1)) / jnp.sum(mask, axis=(-3, -2, -1))
  psnr_value = 10.0 * jnp.log10(1.0 / err)
  taps = gaussian_taps()
  pad = (taps.shape[0] - 1) // 2
  # The cropped scikit-image map is the 'valid' map of the unpadded images (see `ssim`).
  ssim_map = _ssim_map(target, aligned, 1.0, taps)
  crop = mask[..., pad:-pad, pad:-pad, :]
  per_channel = jnp.sum(ssim_map * crop, axis=(-3, -2)) / jnp.sum(crop, axis=(-3, -2))
  return psnr_value, jnp.mean(per_channel, axis=-1)


def realblur_psnr_ssim(restored: np.ndarray, target: np.ndarray) -> tuple[float, float]:
  """The official RealBlur PSNR and SSIM of one restoration: align (`realblur_align`, OpenCV),
  then `realblur_masked_metrics`. Float (H, W, 3) images in [0, 1] (8-bit data / 255)."""
  aligned, masked_target, mask = realblur_align(restored, target)
  psnr_value, ssim_value = realblur_masked_metrics(aligned, masked_target, mask)
  return float(psnr_value), float(ssim_value)

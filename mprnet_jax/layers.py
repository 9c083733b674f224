"""Building blocks of MPRNet (Zamir et al., CVPR 2021), in Flax NNX and NHWC.

Attribute names and list positions mirror the module paths of the official PyTorch model, so
that `conversion.py` can map a checkpoint onto this tree by walking paths: a PyTorch
`nn.Sequential(conv, act, conv)` becomes an `nnx.List` whose parameterless entries (activation,
resampling) keep their positions.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
CONV_OUTPUT = 'cab_conv_output'
REMAT_MODES = ('none', 'convs', 'runs', 'full')


def normalize_remat(remat) -> str:
  """Rematerialisation mode of the CABs: False/'none'; 'convs' (each CAB keeps its input and
  its two conv outputs, and recomputes the elementwise work); 'runs' (a run of consecutive CABs
  keeps only its input and the conv outputs, and recomputes the blocks' inputs too); True/'full'
  (keep only each block's input)."""
  mode = {False: 'none', True: 'full', None: 'none'}.get(remat, remat)
  if mode not in REMAT_MODES:
    raise ValueError(f'remat must be one of {", ".join(REMAT_MODES)} (or a bool), got {remat!r}')
  return mode


# XLA's optimising passes take about 0.6 s on a CPU core per random-bits program, and a model
# has about 30 distinct kernel shapes: 20 s of compiling to build even a tiny model. The bits are
# integers, the same whatever the optimisation level, so their program is compiled without it.
_QUICK_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@functools.partial(jax.jit, static_argnames='shape', compiler_options=_QUICK_COMPILE)
def _random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.bits(key, shape, jnp.uint32)


def _bits_like_jax(key: jax.Array, shape: tuple[int, ...]) -> np.ndarray:
  """`jax.random.bits(key, shape, jnp.uint32)`. With partitionable threefry (jax's default),
  element i of any shape is drawn from counter i alone, so the bits of a shape are the first
  ones of a longer vector: one program per power-of-two length serves every kernel shape,
  where one per shape cost a process about 2 s of compiling for each new model size."""
  if not jax.config.jax_threefry_partitionable:
    return np.asarray(_random_bits(key, shape))
  size = math.prod(shape)
  length = max(1024, 1 << (size - 1).bit_length())
  return np.asarray(_random_bits(key, (length,)))[:size].reshape(shape)


def uniform_like_jax(key: jax.Array, shape, low: float, high: float) -> jax.Array:
  """`jax.random.uniform(key, shape, jnp.float32, low, high)`, bit for bit, built in a tenth of
  the time on a CPU: the random bits from a quickly compiled program, then jax's own mapping of
  bits to floats in numpy. That mapping fills a float's mantissa (1 <= f < 2), subtracts 1 and
  computes f * (high - low) + low in one rounding (XLA fuses it into a multiply-add); float64
  holds that product and sum exactly, so rounding it to float32 once gives the same value."""
  bits = _bits_like_jax(key, tuple(shape))
  mantissa = (bits >> np.uint32(9)) | np.float32(1).view(np.uint32)
  unit = mantissa.view(np.float32) - np.float32(1)
  low32, high32 = np.float32(low), np.float32(high)
  scaled = unit.astype(np.float64) * np.float64(high32 - low32) + np.float64(low32)
  return jnp.asarray(np.maximum(low32, scaled.astype(np.float32)))


def _torch_uniform(fan_in: int):
  """PyTorch's default conv initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    if jnp.dtype(dtype) != jnp.float32 or isinstance(key, jax.core.Tracer):
      # Other dtypes, and abstract builds (nnx.eval_shape, inside jit): jax's own sampler.
      return jax.random.uniform(key, shape, dtype, -bound, bound)
    return uniform_like_jax(key, shape, -bound, bound)

  return init


def conv(in_features: int, out_features: int, kernel_size: int, *, bias: bool = False,
         dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """A stride-1 convolution with zero 'same' padding and PyTorch's default initialisation."""
  fan_in = in_features * kernel_size * kernel_size
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), padding='SAME',
                  use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in), rngs=rngs)


class PReLU(nnx.Module):
  """PReLU with one learnt slope; the official network builds one and shares it everywhere."""

  def __init__(self, init: float = 0.25, param_dtype: Dtype = jnp.float32):
    # An explicit dtype: a weakly typed scalar would change type after the first update and
    # make the jitted step compile again.
    self.weight = nnx.Param(jnp.full((1,), init, dtype=param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.weight[...].astype(x.dtype)
    return jnp.where(x >= 0, x, slope * x)


class ReLU(nnx.Module):
  """Placeholder keeping the position of PyTorch's ReLU in a sequential list."""

  def __call__(self, x):
    return jax.nn.relu(x)


class Sigmoid(nnx.Module):
  """Placeholder keeping the position of PyTorch's Sigmoid in a sequential list."""

  def __call__(self, x):
    return jax.nn.sigmoid(x)


def downsample_half(x: jax.Array) -> jax.Array:
  """Bilinear resize by 1/2 (torch, align_corners=False, no antialiasing) of an even-sized map.

  For even sizes every output sample falls exactly between two input samples on each axis, so
  the resize is the mean of each 2x2 block. (N, H, W, C) -> (N, H/2, W/2, C).
  """
  n, h, w, c = x.shape
  blocks = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return blocks.mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
  # torch's align_corners=False maps output 2j to input j - 1/4 and 2j+1 to j + 1/4, with
  # source indices clamped at the borders (hence edge padding).
  size = x.shape[axis]
  padded = jnp.concatenate([
      jax.lax.slice_in_dim(x, 0, 1, axis=axis), x,
      jax.lax.slice_in_dim(x, size - 1, size, axis=axis)
  ], axis=axis)
  before = jax.lax.slice_in_dim(padded, 0, size, axis=axis)
  after = jax.lax.slice_in_dim(padded, 2, size + 2, axis=axis)
  even = 0.25 * before + 0.75 * x
  odd = 0.75 * x + 0.25 * after
  interleaved = jnp.stack([even, odd], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] = 2 * size
  return interleaved.reshape(shape)


def upsample_double(x: jax.Array) -> jax.Array:
  """Bilinear resize by 2 (torch, align_corners=False). (N, H, W, C) -> (N, 2H, 2W, C)."""
  return _upsample_axis(_upsample_axis(x, 1), 2)


class Resample(nnx.Module):
  """Placeholder for PyTorch's nn.Upsample inside a sequential list (by 2 or by 1/2)."""

  def __init__(self, factor: float):
    self.factor = factor

  def __call__(self, x):
    return upsample_double(x) if self.factor == 2 else downsample_half(x)


class CALayer(nnx.Module):
  """Channel attention (the 'CA' of a CAB): squeeze by global mean, excite by two 1x1 convs."""

  def __init__(self, channels: int, reduction: int = 16, bias: bool = False, *, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    squeezed = channels // reduction
    self.conv_du = nnx.List([
        conv(channels, squeezed, 1, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        ReLU(),
        conv(squeezed, channels, 1, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        Sigmoid(),
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    # The mean is accumulated in float32 so bfloat16 compute does not lose the squeeze.
    weights = x.mean(axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x.dtype)
    for layer in self.conv_du:
      weights = layer(weights)
    return x * weights.astype(x.dtype)


class CAB(nnx.Module):
  """Channel Attention Block: conv, PReLU, conv, channel attention, plus a residual."""

  def __init__(self, channels: int, kernel_size: int, reduction: int, bias: bool, act: PReLU, *,
               dtype: Dtype = None, param_dtype: Dtype = jnp.float32, remat: bool | str = False,
               rngs: nnx.Rngs):
    # Registered in the official order (attention first), so state dicts list keys alike.
    self.CA = CALayer(channels, reduction, bias=bias, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
    self.body = nnx.List([
        conv(channels, channels, kernel_size, bias=bias, dtype=dtype, param_dtype=param_dtype,
             rngs=rngs),
        act,
        conv(channels, channels, kernel_size, bias=bias, dtype=dtype, param_dtype=param_dtype,
             rngs=rngs),
    ])
    self.remat = normalize_remat(remat)

  def forward(self, x: jax.Array) -> jax.Array:
    conv1, act, conv2 = self.body
    # The conv outputs are tagged so that the 'convs' rematerialisation policy can keep them
    # and recompute only the cheap elementwise work around them.
    y = checkpoint_name(conv1(x), CONV_OUTPUT)
    y = checkpoint_name(conv2(act(y)), CONV_OUTPUT)
    return self.CA(y) + x

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.remat == 'full':
      # Keep only the block's input for the backward pass and recompute the rest: about a
      # third more compute for a much smaller activation footprint.
      return nnx.remat(CAB.forward)(self, x)
    if self.remat in ('convs', 'runs'):
      # Keep the two conv outputs, recompute PReLU and channel attention: little extra compute,
      # fewer saved activations than XLA's default. (A CAB called on its own is a run of one.)
      return nnx.remat(CAB.forward, policy=_KEEP_CONV_OUTPUTS)(self, x)
    return self.forward(x)


_KEEP_CONV_OUTPUTS = jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT)


def _apply_in_order(layers, x):
  for layer in layers:
    x = layer.forward(x) if isinstance(layer, CAB) else layer(x)
  return x


def run_sequence(layers, x):
  """Applies the entries of an nnx.List in order (PyTorch's nn.Sequential).

  When its CABs use the 'runs' rematerialisation, the whole list is one rematerialised region
  that keeps only its input and the CABs' conv outputs: a block's input is the previous block's
  conv output passed through channel attention (a mean and two 1x1 convs on one pixel per
  image) and a residual add, so recomputing it costs no full-size convolution and saves one
  activation per block against 'convs'.
  """
  if any(isinstance(layer, CAB) and layer.remat == 'runs' for layer in layers):
    return nnx.remat(_apply_in_order, policy=_KEEP_CONV_OUTPUTS)(layers, x)
  for layer in layers:
    x = layer(x)
  return x


class SAM(nnx.Module):
  """Supervised Attention Module: predicts the stage's image and gates its features with it."""

  def __init__(self, channels: int, kernel_size: int, bias: bool, *, out_c: int = 3,
               dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kwargs = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = conv(channels, channels, kernel_size, **kwargs)
    self.conv2 = conv(channels, out_c, kernel_size, **kwargs)
    self.conv3 = conv(out_c, channels, kernel_size, **kwargs)

  def __call__(self, features: jax.Array, degraded: jax.Array) -> tuple[jax.Array, jax.Array]:
    """features (N, H, W, C), degraded image (N, H, W, 3) -> (gated features, stage image)."""
    # The stage image is a residual on the float32 input, kept in float32.
    image = self.conv2(features).astype(jnp.float32) + degraded.astype(jnp.float32)
    gate = jax.nn.sigmoid(self.conv3(image))
    gated = self.conv1(features) * gate + features
    return gated, image


class DownSample(nnx.Module):
  """Halves the resolution and widens the channels by `extra` (U-Net encoder step)."""

  def __init__(self, channels: int, extra: int, *, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.down = nnx.List([
        Resample(0.5),
        conv(channels, channels + extra, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
    ])

  def __call__(self, x):
    return run_sequence(self.down, x)


class UpSample(nnx.Module):
  """Doubles the resolution and narrows `channels + extra` channels to `channels`."""

  def __init__(self, channels: int, extra: int, *, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.up = nnx.List([
        Resample(2),
        conv(channels + extra, channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
    ])

  def __call__(self, x):
    resample, narrow = self.up
    # A bias-free 1x1 conv commutes with bilinear resizing (both are linear, one per pixel, one
    # per channel), so narrowing first gives the official result on a quarter of the pixels.
    return resample(narrow(x))


class SkipUpSample(UpSample):
  """UpSample followed by adding the encoder's skip connection."""

  def __call__(self, x, skip):
    return super().__call__(x) + skip

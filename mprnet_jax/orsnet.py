"""ORSNet, MPRNet's third stage: original-resolution blocks (ORB, a run of CABs plus a conv, with
a residual) that never downsample, fed with the stage-2 U-Net features brought up to full
resolution."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mprnet_jax.layers import CAB, PReLU, UpSample, conv, run_sequence


class ORB(nnx.Module):
  """Original Resolution Block: `num_cab` CABs and a conv, with a residual over all of them."""

  def __init__(self, channels: int, kernel_size: int, reduction: int, act: PReLU, bias: bool,
               num_cab: int, *, dtype=None, param_dtype=jnp.float32, remat: bool | str = False,
               rngs: nnx.Rngs):
    cabs = [
        CAB(channels, kernel_size, reduction, bias, act, dtype=dtype, param_dtype=param_dtype,
            remat=remat, rngs=rngs) for _ in range(num_cab)
    ]
    # The closing conv of an ORB is bias-free whatever `bias` says, as in the official model.
    tail = conv(channels, channels, kernel_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.body = nnx.List(cabs + [tail])

  def __call__(self, x: jax.Array) -> jax.Array:
    return run_sequence(self.body, x) + x


class ORSNet(nnx.Module):
  """Three ORBs; after each, the matching scale of the stage-2 encoder and decoder is upsampled
  to full resolution, projected by a 1x1 conv and added."""

  def __init__(self, n_feat: int, scale_orsnetfeats: int, kernel_size: int, reduction: int,
               act: PReLU, bias: bool, scale_unetfeats: int, num_cab: int, *, dtype=None,
               param_dtype=jnp.float32, remat: bool | str = False, rngs: nnx.Rngs):
    width = n_feat + scale_orsnetfeats
    orb_kwargs = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    self.orb1 = ORB(width, kernel_size, reduction, act, bias, num_cab, **orb_kwargs)
    self.orb2 = ORB(width, kernel_size, reduction, act, bias, num_cab, **orb_kwargs)
    self.orb3 = ORB(width, kernel_size, reduction, act, bias, num_cab, **orb_kwargs)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up_enc1 = UpSample(n_feat, scale_unetfeats, **kwargs)
    self.up_dec1 = UpSample(n_feat, scale_unetfeats, **kwargs)
    self.up_enc2 = nnx.List([
        UpSample(n_feat + scale_unetfeats, scale_unetfeats, **kwargs),
        UpSample(n_feat, scale_unetfeats, **kwargs)
    ])
    self.up_dec2 = nnx.List([
        UpSample(n_feat + scale_unetfeats, scale_unetfeats, **kwargs),
        UpSample(n_feat, scale_unetfeats, **kwargs)
    ])
    for kind in ('enc', 'dec'):
      for level in (1, 2, 3):
        setattr(self, f'conv_{kind}{level}', conv(n_feat, width, 1, bias=bias, **kwargs))

  def __call__(self, x: jax.Array, encoder_outs: Sequence[jax.Array],
               decoder_outs: Sequence[jax.Array]) -> jax.Array:
    """x (N, H, W, n_feat + scale_orsnetfeats); U-Net features at H, H/2, H/4 -> same as x."""
    x = self.orb1(x)
    x = x + self.conv_enc1(encoder_outs[0]) + self.conv_dec1(decoder_outs[0])
    x = self.orb2(x)
    x = (x + self.conv_enc2(self.up_enc1(encoder_outs[1])) +
         self.conv_dec2(self.up_dec1(decoder_outs[1])))
    x = self.orb3(x)
    x = (x + self.conv_enc3(run_sequence(self.up_enc2, encoder_outs[2])) +
         self.conv_dec3(run_sequence(self.up_dec2, decoder_outs[2])))
    return x

"""The U-Net of MPRNet's first two stages: an encoder with cross-stage feature fusion (CSFF) and
a decoder with attention on its skip connections. Three scales; channels grow by
`scale_unetfeats` per scale: n_feat, n_feat + s, n_feat + 2s.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mprnet_jax.layers import CAB, DownSample, PReLU, SkipUpSample, conv, run_sequence


def _cab_pair(channels, kernel_size, reduction, bias, act, **kwargs):
  return nnx.List([CAB(channels, kernel_size, reduction, bias, act, **kwargs) for _ in range(2)])


class Encoder(nnx.Module):
  """Three scales of two CABs each. With `csff`, every scale adds 1x1-projected features of the
  previous stage's encoder and decoder (cross-stage feature fusion, stage 2 only)."""

  def __init__(self, n_feat: int, kernel_size: int, reduction: int, act: PReLU, bias: bool,
               scale_unetfeats: int, csff: bool, *, dtype=None, param_dtype=jnp.float32,
               remat: bool | str = False, rngs: nnx.Rngs):
    widths = [n_feat + i * scale_unetfeats for i in range(3)]
    cab_kwargs = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    self.encoder_level1 = _cab_pair(widths[0], kernel_size, reduction, bias, act, **cab_kwargs)
    self.encoder_level2 = _cab_pair(widths[1], kernel_size, reduction, bias, act, **cab_kwargs)
    self.encoder_level3 = _cab_pair(widths[2], kernel_size, reduction, bias, act, **cab_kwargs)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down12 = DownSample(widths[0], scale_unetfeats, **kwargs)
    self.down23 = DownSample(widths[1], scale_unetfeats, **kwargs)
    self.csff = csff
    if csff:
      for kind in ('enc', 'dec'):
        for level, width in enumerate(widths, start=1):
          setattr(self, f'csff_{kind}{level}', conv(width, width, 1, bias=bias, **kwargs))

  def __call__(self, x: jax.Array, encoder_outs: Sequence[jax.Array] | None = None,
               decoder_outs: Sequence[jax.Array] | None = None) -> list[jax.Array]:
    """x (N, H, W, n_feat) -> features at H, H/2, H/4 (widths n_feat, +s, +2s)."""
    fuse = self.csff and encoder_outs is not None and decoder_outs is not None
    levels = [self.encoder_level1, self.encoder_level2, self.encoder_level3]
    downs = [self.down12, self.down23]
    outs = []
    for index, cabs in enumerate(levels):
      x = run_sequence(cabs, x)
      if fuse:
        level = index + 1
        x = (x + getattr(self, f'csff_enc{level}')(encoder_outs[index]) +
             getattr(self, f'csff_dec{level}')(decoder_outs[index]))
      outs.append(x)
      if index < 2:
        x = downs[index](x)
    return outs


class Decoder(nnx.Module):
  """Mirror of the encoder: two CABs per scale, upsampling with CAB-filtered skip connections."""

  def __init__(self, n_feat: int, kernel_size: int, reduction: int, act: PReLU, bias: bool,
               scale_unetfeats: int, *, dtype=None, param_dtype=jnp.float32,
               remat: bool | str = False, rngs: nnx.Rngs):
    widths = [n_feat + i * scale_unetfeats for i in range(3)]
    cab_kwargs = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    self.decoder_level1 = _cab_pair(widths[0], kernel_size, reduction, bias, act, **cab_kwargs)
    self.decoder_level2 = _cab_pair(widths[1], kernel_size, reduction, bias, act, **cab_kwargs)
    self.decoder_level3 = _cab_pair(widths[2], kernel_size, reduction, bias, act, **cab_kwargs)
    self.skip_attn1 = CAB(widths[0], kernel_size, reduction, bias, act, **cab_kwargs)
    self.skip_attn2 = CAB(widths[1], kernel_size, reduction, bias, act, **cab_kwargs)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up21 = SkipUpSample(widths[0], scale_unetfeats, **kwargs)
    self.up32 = SkipUpSample(widths[1], scale_unetfeats, **kwargs)

  def __call__(self, encoder_outs: Sequence[jax.Array]) -> list[jax.Array]:
    """Encoder features at three scales -> decoder features at the same three scales."""
    enc1, enc2, enc3 = encoder_outs
    dec3 = run_sequence(self.decoder_level3, enc3)
    dec2 = run_sequence(self.decoder_level2, self.up32(dec3, self.skip_attn2(enc2)))
    dec1 = run_sequence(self.decoder_level1, self.up21(dec2, self.skip_attn1(enc1)))
    return [dec1, dec2, dec3]

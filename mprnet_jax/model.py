"""MPRNet, the three-stage network (Zamir et al., "Multi-Stage Progressive Image Restoration").

Stage 1 restores four quarters of the image independently and stage 2 two halves; here the
quarters (and the halves) run as one batch stacked on the batch axis: the same arithmetic as
four (two) separate calls, in fewer and larger kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mprnet_jax.layers import CAB, PReLU, SAM, conv, normalize_remat, run_sequence
from mprnet_jax.orsnet import ORSNet
from mprnet_jax.unet import Decoder, Encoder


@dataclasses.dataclass(frozen=True)
class MPRNetConfig:
  """The sizes that define an MPRNet (the constructor arguments of the official model)."""
  n_feat: int = 96
  scale_unetfeats: int = 48
  scale_orsnetfeats: int = 32
  num_cab: int = 8
  kernel_size: int = 3
  reduction: int = 4
  bias: bool = False
  in_c: int = 3
  out_c: int = 3

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# The official models of the three tasks differ only in their widths.
PRESETS = {
    'deblurring': MPRNetConfig(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32),
    'denoising': MPRNetConfig(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32),
    'deraining': MPRNetConfig(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16),
}

# Compute dtypes by name. Each is a real dtype (never None), so "compute in float32" can be
# told apart from "leave the model as it is".
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  """The compute dtype called `name` ('float32' or 'bfloat16'); ValueError otherwise."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'dtype must be one of {", ".join(COMPUTE_DTYPES)}, got {name!r}')
  return COMPUTE_DTYPES[name]


def resolve_config(task: str | None = None, **sizes) -> MPRNetConfig:
  """A preset's sizes (deblurring's when `task` is None), with explicit sizes overriding them."""
  if task is not None and task not in PRESETS:
    raise ValueError(f'unknown task {task!r}: expected one of {", ".join(PRESETS)}')
  base = PRESETS[task or 'deblurring']
  overrides = {k: v for k, v in sizes.items() if v is not None}
  unknown = set(overrides) - {f.name for f in dataclasses.fields(MPRNetConfig)}
  if unknown:
    raise TypeError(f'unknown MPRNet size(s): {", ".join(sorted(unknown))}')
  return dataclasses.replace(base, **overrides)


def check_input_shape(shape) -> None:
  """Raises ValueError unless `shape` is (N, H, W, C) with H and W multiples of 8."""
  if len(shape) != 4:
    raise ValueError(f'MPRNet expects images of shape (N, H, W, C), got shape {tuple(shape)}')
  n, h, w, c = shape
  if h % 8 or w % 8 or h == 0 or w == 0:
    nearest = tuple(max(8, 8 * round(s / 8)) for s in (h, w))
    raise ValueError(
        f'MPRNet needs height and width that are multiples of 8, got {h}x{w} (input shape '
        f'{tuple(shape)}); the nearest valid size is {nearest[0]}x{nearest[1]} (or pad, as '
        f'mprnet_jax.tiling.pad_to_multiple does)')


def split_rows(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (2N, H/2, W, C): top halves, then bottom halves."""
  n, h, w, c = x.shape
  return x.reshape(n, 2, h // 2, w, c).swapaxes(0, 1).reshape(2 * n, h // 2, w, c)


def merge_rows(x: jax.Array) -> jax.Array:
  """Inverse of split_rows: (2N, h, W, C) -> (N, 2h, W, C)."""
  n2, h, w, c = x.shape
  return x.reshape(2, n2 // 2, h, w, c).swapaxes(0, 1).reshape(n2 // 2, 2 * h, w, c)


def split_columns(x: jax.Array) -> jax.Array:
  """(M, H, W, C) -> (2M, H, W/2, C): left halves, then right halves, per row block.

  Applied after split_rows, the batch holds [top-left, top-right, bottom-left, bottom-right]."""
  m, h, w, c = x.shape
  blocks = x.reshape(2, m // 2, h, 2, w // 2, c)  # (row, n, h, column, w/2, c)
  return blocks.transpose(0, 3, 1, 2, 4, 5).reshape(2 * m, h, w // 2, c)


def merge_columns(x: jax.Array) -> jax.Array:
  """Inverse of split_columns: (2M, h, w, C) -> (M, h, 2w, C)."""
  m2, h, w, c = x.shape
  blocks = x.reshape(2, 2, m2 // 4, h, w, c)  # (row, column, n, h, w, c)
  return blocks.transpose(0, 2, 3, 1, 4, 5).reshape(m2 // 2, h, 2 * w, c)


class MPRNet(nnx.Module):
  """MPRNet in NHWC. `model(x)` with x (N, H, W, 3), H and W multiples of 8, returns
  `[final, stage2, stage1]`, each (N, H, W, 3) float32: the official output order.

  Build it from a task preset (`MPRNet('deraining')`) or explicit sizes; `dtype` is the compute
  dtype (e.g. jnp.bfloat16), `param_dtype` that of the parameters, `remat` recomputes parts of
  each CAB in the backward pass to save memory ('convs': the elementwise work; 'runs': that and
  the inputs of the blocks inside a run of CABs; True/'full': everything but the block's input).
  """

  def __init__(self, task: str | None = None, *, n_feat: int | None = None,
               scale_unetfeats: int | None = None, scale_orsnetfeats: int | None = None,
               num_cab: int | None = None, kernel_size: int | None = None,
               reduction: int | None = None, bias: bool | None = None, in_c: int | None = None,
               out_c: int | None = None, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               remat: bool | str = False, rngs: nnx.Rngs | None = None):
    cfg = resolve_config(task, n_feat=n_feat, scale_unetfeats=scale_unetfeats,
                         scale_orsnetfeats=scale_orsnetfeats, num_cab=num_cab,
                         kernel_size=kernel_size, reduction=reduction, bias=bias, in_c=in_c,
                         out_c=out_c)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    # None was once the spelling of float32; keep accepting it, but store the real dtype.
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    self.config = cfg
    self.dtype = dtype
    n, k, r, b = cfg.n_feat, cfg.kernel_size, cfg.reduction, cfg.bias
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    blocks = dict(kwargs, remat=remat)
    # One PReLU shared by every CAB of the network, as the official model builds it.
    act = PReLU(param_dtype=param_dtype)

    def shallow_feat():
      return nnx.List([conv(cfg.in_c, n, k, bias=b, **kwargs), CAB(n, k, r, b, act, **blocks)])

    self.shallow_feat1 = shallow_feat()
    self.shallow_feat2 = shallow_feat()
    self.shallow_feat3 = shallow_feat()
    s = cfg.scale_unetfeats
    self.stage1_encoder = Encoder(n, k, r, act, b, s, csff=False, **blocks)
    self.stage1_decoder = Decoder(n, k, r, act, b, s, **blocks)
    self.stage2_encoder = Encoder(n, k, r, act, b, s, csff=True, **blocks)
    self.stage2_decoder = Decoder(n, k, r, act, b, s, **blocks)
    self.stage3_orsnet = ORSNet(n, cfg.scale_orsnetfeats, k, r, act, b, s, cfg.num_cab, **blocks)
    self.sam12 = SAM(n, 1, b, out_c=cfg.out_c, **kwargs)
    self.sam23 = SAM(n, 1, b, out_c=cfg.out_c, **kwargs)
    self.concat12 = conv(2 * n, n, k, bias=b, **kwargs)
    self.concat23 = conv(2 * n, n + cfg.scale_orsnetfeats, k, bias=b, **kwargs)
    self.tail = conv(n + cfg.scale_orsnetfeats, cfg.out_c, k, bias=b, **kwargs)

  def set_remat(self, remat: bool | str) -> None:
    """Sets the rematerialisation of every CAB: False/'none', 'convs', 'runs' or True/'full'."""
    mode = normalize_remat(remat)
    for _, module in nnx.iter_graph(self):
      if isinstance(module, CAB):
        module.remat = mode

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    check_input_shape(x.shape)
    x = x.astype(jnp.float32)

    # Stage 1: four quarters through the encoder, re-joined into two halves for the decoder.
    quarters = split_columns(split_rows(x))
    quarter_feats = self.stage1_encoder(run_sequence(self.shallow_feat1, quarters))
    feat1 = [merge_columns(f) for f in quarter_feats]
    res1 = self.stage1_decoder(feat1)
    halves = split_rows(x)
    sam_feats2, stage1_halves = self.sam12(res1[0], halves)
    stage1_img = merge_rows(stage1_halves)

    # Stage 2: two halves, fed with stage 1's attended features and its U-Net features.
    x2 = run_sequence(self.shallow_feat2, halves)
    x2 = self.concat12(jnp.concatenate([x2, sam_feats2.astype(x2.dtype)], axis=-1))
    half_feats = self.stage2_encoder(x2, feat1, res1)
    feat2 = [merge_rows(f) for f in half_feats]
    res2 = self.stage2_decoder(feat2)
    sam_feats3, stage2_img = self.sam23(res2[0], x)

    # Stage 3: the whole image at full resolution.
    x3 = run_sequence(self.shallow_feat3, x)
    x3 = self.concat23(jnp.concatenate([x3, sam_feats3.astype(x3.dtype)], axis=-1))
    x3 = self.stage3_orsnet(x3, feat2, res2)
    final = self.tail(x3).astype(jnp.float32) + x
    return [final, stage2_img, stage1_img]


def abstract_mprnet(task: str | None = None, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, remat: bool | str = False, **sizes) -> MPRNet:
  """`MPRNet(task, dtype=..., param_dtype=..., remat=..., **sizes)` built abstractly: its
  parameters are shapes and dtypes (nothing allocated or drawn), for a model whose parameters
  are about to be replaced (a weight file, a checkpoint, another model's).

  Building the module tree costs about 0.35 s of Python on a CPU core, whatever the sizes; it
  runs once per distinct set of arguments, and every call gets its own copy of the result
  (`nnx.merge`, about 20 ms), which it may change freely."""
  key = (task, jnp.dtype(jnp.float32 if dtype is None else dtype),
         jnp.dtype(jnp.float32 if param_dtype is None else param_dtype), normalize_remat(remat),
         tuple(sorted(sizes.items())))
  return nnx.merge(*_abstract_parts(*key), copy=True)


@functools.lru_cache(maxsize=32)
def _abstract_parts(task, dtype, param_dtype, remat, sizes) -> tuple[nnx.GraphDef, nnx.State]:
  abstract = nnx.eval_shape(
      lambda: MPRNet(task, dtype=dtype, param_dtype=param_dtype, remat=remat, **dict(sizes)))
  return nnx.split(abstract)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters, the shared PReLU counted once (as PyTorch's parameters())."""
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

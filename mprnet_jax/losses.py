"""MPRNet's training losses (NHWC, computed in float32): Charbonnier, the Laplacian edge loss,
and the per-task multi-stage sum of the official recipes."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# A 5-tap binomial-like low-pass; the 2-D kernel is its outer product.
_GAUSS_TAPS = np.array([0.05, 0.25, 0.4, 0.25, 0.05], np.float32)
EDGE_WEIGHT = 0.05
TASKS = ('deblurring', 'denoising', 'deraining')


def charbonnier(x: jax.Array, y: jax.Array, eps: float = 1e-3) -> jax.Array:
  """mean(sqrt((x - y)^2 + eps^2)), a smooth L1."""
  if x.shape != y.shape:
    raise ValueError(f'charbonnier: shapes differ, {x.shape} vs {y.shape}')
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)
  return jnp.mean(jnp.sqrt(diff * diff + eps * eps))


def _blur(x: jax.Array) -> jax.Array:
  """The 5x5 low-pass on each channel, with edge-replicating padding. (N, H, W, C)."""
  padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='edge')
  h, w = x.shape[1], x.shape[2]
  # Separable: rows then columns; the 2-D kernel is exactly the outer product of the taps.
  rows = sum(float(t) * padded[:, i:i + h, :, :] for i, t in enumerate(_GAUSS_TAPS))
  return sum(float(t) * rows[:, :, j:j + w, :] for j, t in enumerate(_GAUSS_TAPS))


def laplacian(x: jax.Array) -> jax.Array:
  """One level of a Laplacian pyramid: x minus its blurred, decimated and re-expanded self.

  The decimated samples (every other pixel from the first) are put back at their places times
  4, the gaps left at zero, and blurred again. (N, H, W, C) -> (N, H, W, C); odd sizes work.
  """
  x = x.astype(jnp.float32)
  blurred = _blur(x)
  keep = np.zeros(x.shape[1:3], np.float32)
  keep[::2, ::2] = 4.0
  expanded = _blur(blurred * keep[None, :, :, None])
  return x - expanded


def edge_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Charbonnier distance between the Laplacians of x and y."""
  if x.shape != y.shape:
    raise ValueError(f'edge_loss: shapes differ, {x.shape} vs {y.shape}')
  return charbonnier(laplacian(x), laplacian(y))


def mprnet_loss_terms(outputs: Sequence[jax.Array], target: jax.Array,
                      task: str) -> dict[str, jax.Array]:
  """The official loss of `task` over the network's stage outputs, with its parts.

  Deblurring and deraining: sum over stages of Charbonnier + 0.05 * sum of edge losses.
  Denoising: sum over stages of Charbonnier on outputs clipped to [0, 1].
  Returns {'loss', 'charbonnier_sum'} and, except for denoising, {'edge_sum'}.
  """
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}: expected one of {", ".join(TASKS)}')
  target = target.astype(jnp.float32)
  if task == 'denoising':
    char = sum(charbonnier(jnp.clip(o.astype(jnp.float32), 0.0, 1.0), target) for o in outputs)
    return {'loss': char, 'charbonnier_sum': char}
  char = sum(charbonnier(o, target) for o in outputs)
  edge = sum(edge_loss(o, target) for o in outputs)
  return {'loss': char + EDGE_WEIGHT * edge, 'charbonnier_sum': char, 'edge_sum': edge}


def mprnet_loss(outputs: Sequence[jax.Array], target: jax.Array, task: str) -> jax.Array:
  """The official training loss of `task` (a scalar); see mprnet_loss_terms."""
  return mprnet_loss_terms(outputs, target, task)['loss']

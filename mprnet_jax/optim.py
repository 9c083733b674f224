"""The official optimiser and learning-rate schedule, as optax transformations.

The official train.py builds Adam(lr 2e-4, betas (0.9, 0.999), eps 1e-8), a
`GradualWarmupScheduler(multiplier=1, total_epoch=3, after_scheduler=CosineAnnealingLR(T_max=
epochs - 3, eta_min=1e-6))`, calls `scheduler.step()` once before the first epoch and once after
each epoch. `learning_rate_schedule` states the resulting per-epoch learning rate as a pure
function of the step; see its docstring for the epoch-by-epoch reading.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from mprnet_jax.errors import ConfigError

__all__ = ['epoch_learning_rate', 'learning_rate_schedule', 'make_optimizer']


def _schedule_fields(config):
  optim = config.optim
  warmup = int(optim.get('warmup_epochs', 3))
  cosine_length = int(config.num_epochs) - warmup + int(optim.get('cosine_extra_epochs', 0))
  return (float(optim.lr), float(optim.get('min_lr', 1e-6)), warmup, max(cosine_length, 1))


def epoch_learning_rate(epoch, base_lr: float, min_lr: float, warmup_epochs: int,
                        cosine_epochs: int):
  """The official learning rate of 0-based epoch `epoch` (a float or array; fractional epochs
  interpolate, which is what `schedule_unit='step'` uses).

  - warm-up, epoch < W:  base_lr * (epoch + 1) / W
  - cosine,  epoch >= W: min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2, t = epoch - W,
    held at min_lr once t >= T (torch's closed form would rise again; the official runs stop
    before t reaches T).
  Written as base_lr - (base_lr - min_lr) * (1 - cos) / 2 so that t = 0 gives base_lr exactly.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  if warmup_epochs > 0:
    warm = base_lr * jnp.minimum(epoch + 1.0, warmup_epochs) / warmup_epochs
  else:
    warm = jnp.float32(base_lr)
  t = jnp.clip(epoch - warmup_epochs, 0.0, cosine_epochs)
  cosine = base_lr - (base_lr - min_lr) * (1.0 - jnp.cos(math.pi * t / cosine_epochs)) / 2.0
  return jnp.where(epoch < warmup_epochs, warm, cosine).astype(jnp.float32)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The official warm-up + cosine schedule as a function of the optimiser step (0-based).

  Reading of the official code (0-based epoch e = step // steps_per_epoch, official epoch e + 1):
  the scheduler's constructor steps it to last_epoch 0 (lr 0) and train.py's extra
  `scheduler.step()` before the loop moves it to last_epoch 1, so epoch e trains at the
  warm-up value of last_epoch e + 1, i.e. base * (e + 1) / W: with W = 3, 2e-4 / 3, 2e-4 * 2/3,
  2e-4 for e = 0, 1, 2 (without that extra step the first epoch would run at lr 0). At
  last_epoch W + 1 the warm-up hands over to the cosine, whose own counter is still 0, so epoch
  e = W trains at base again (base is held for two epochs), and epoch e >= W at the cosine's
  value for t = e - W: min + (base - min) * (1 + cos(pi t / T)) / 2 with T = num_epochs - W +
  cosine_extra_epochs (official: T_max = epochs - 3, denoising epochs - 3 + 40). The last
  official epoch has t = T - 1, so the lr never quite reaches min_lr.

  `config.optim.schedule_unit`: 'epoch' (official) changes the lr once per epoch;
  'step' evaluates the same curve at the fractional epoch step / steps_per_epoch, so both agree
  on the first step of every epoch.
  """
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}')
  base_lr, min_lr, warmup, cosine_length = _schedule_fields(config)
  unit = config.optim.get('schedule_unit', 'epoch')
  if unit not in ('epoch', 'step'):
    raise ConfigError(f"config.optim.schedule_unit must be 'epoch' or 'step', got {unit!r}")

  def schedule(step):
    step = jnp.asarray(step)
    if unit == 'epoch':
      epoch = (step // steps_per_epoch).astype(jnp.float32)
    else:
      epoch = step.astype(jnp.float32) / steps_per_epoch
    return epoch_learning_rate(epoch, base_lr, min_lr, warmup, cosine_length)

  return schedule


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """The official optimiser with `learning_rate_schedule`.

  'adam': torch.optim.Adam. optax's `eps` sits outside the square root of the bias-corrected
  second moment, as torch's does; torch's `weight_decay` is an L2 term added to the gradient
  before the moments (not AdamW's decoupled decay), hence `add_decayed_weights` first.
  'sgd': plain `-lr * g` (used by tests, where Adam's normalisation would hide a constant factor
  in the gradient).
  """
  optim = config.optim
  schedule = learning_rate_schedule(config, steps_per_epoch)
  name = optim.get('name', 'adam')
  weight_decay = float(optim.get('weight_decay', 0.0) or 0.0)
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  if name == 'adam':
    return optax.chain(
        *decay,
        optax.scale_by_adam(b1=float(optim.get('b1', 0.9)), b2=float(optim.get('b2', 0.999)),
                            eps=float(optim.get('eps', 1e-8))),
        optax.scale_by_learning_rate(schedule))
  if name == 'sgd':
    return optax.chain(*decay, optax.scale_by_learning_rate(schedule))
  raise ConfigError(f"config.optim.name must be 'adam' or 'sgd', got {name!r}")

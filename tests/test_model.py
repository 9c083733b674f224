"""The network's structure and geometry: sizes, shapes, resampling, the quarter/half stacking."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mprnet_jax import MPRNet, count_params
from mprnet_jax.layers import downsample_half, uniform_like_jax, upsample_double
from mprnet_jax.model import (abstract_mprnet, merge_columns, merge_rows, split_columns, split_rows)

# Every comparison here is between two programs compiled alike (remat against none, bf16
# against float32 within a tolerance), so XLA's quick compile suffices.
pytestmark = pytest.mark.usefixtures('fast_compile')

TINY = dict(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8, num_cab=2)


@pytest.mark.parametrize('task,expected', [('deblurring', 20_127_073), ('denoising', 15_741_025),
                                           ('deraining', 3_637_249)])
def test_preset_parameter_counts(task, expected):
  assert count_params(nnx.eval_shape(lambda: MPRNet(task))) == expected


def test_tiny_parameter_count():
  assert count_params(nnx.eval_shape(lambda: MPRNet(**TINY))) == 427_033


def test_abstract_builds_are_independent_copies_of_the_network():
  built = nnx.eval_shape(lambda: MPRNet(**TINY, dtype=jnp.bfloat16, remat='convs'))
  first = abstract_mprnet(**TINY, dtype=jnp.bfloat16, remat='convs')
  second = abstract_mprnet(**TINY, dtype=jnp.bfloat16, remat='convs')
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))
  assert shapes(first) == shapes(built) and nnx.graphdef(first) == nnx.graphdef(built)
  # The one PReLU stays shared by every CAB, within each copy and not between them.
  assert first.shallow_feat1[1].body[1] is first.stage3_orsnet.orb3.body[0].body[1]
  assert first.shallow_feat1[1].body[1] is not second.shallow_feat1[1].body[1]
  # Changing one copy (as loading weights does) leaves the next one as built.
  first.tail.kernel.set_value(jnp.ones(first.tail.kernel.shape))
  first.set_remat('full')
  third = abstract_mprnet(**TINY, dtype=jnp.bfloat16, remat='convs')
  assert isinstance(third.tail.kernel.get_value(), jax.ShapeDtypeStruct)
  assert third.shallow_feat1[1].remat == 'convs'


def test_explicit_sizes_override_preset():
  model = nnx.eval_shape(lambda: MPRNet('deraining', num_cab=2))
  assert model.config.n_feat == 40 and model.config.num_cab == 2


def test_unknown_task_is_refused():
  with pytest.raises(ValueError, match='unknown task'):
    MPRNet('deblur')


def test_initialiser_draws_exactly_what_jax_random_uniform_draws():
  # The reference with XLA's optimisations on, as a user's process has them: jax.random.uniform
  # then fuses its last multiply-add into one rounding, which the fast initialiser reproduces.
  jax.config.update('jax_disable_most_optimizations', False)
  partitionable = jax.config.jax_threefry_partitionable
  try:
    # Shapes whose bits come from one longer vector (of 1024, 4096 and 131072), and with the
    # older, non-partitionable threefry, which draws each shape on its own.
    for partitionable_now in (True, False):
      jax.config.update('jax_threefry_partitionable', partitionable_now)
      for seed, shape, fan_in in [(0, (3, 3, 16, 24), 144), (1, (1, 1, 8, 2), 8), (2, (7,), 27),
                                  (3, (3, 3, 3, 96), 27), (4, (3, 3, 96, 96), 864)]:
        key = jax.random.fold_in(jax.random.key(seed), 5)
        bound = 1 / np.sqrt(fan_in)
        expected = np.asarray(jax.random.uniform(key, shape, jnp.float32, -bound, bound))
        drawn = np.asarray(uniform_like_jax(key, shape, -bound, bound))
        assert drawn.dtype == np.float32 and drawn.shape == shape
        np.testing.assert_array_equal(drawn, expected, err_msg=f'{shape} {partitionable_now}')
  finally:
    jax.config.update('jax_threefry_partitionable', partitionable)
    jax.config.update('jax_disable_most_optimizations', True)


@pytest.mark.parametrize('shape,nearest', [((1, 30, 64, 3), '32x64'), ((1, 64, 63, 3), '64x64')])
def test_size_not_multiple_of_8_names_nearest(shape, nearest):
  model = MPRNet(**TINY)
  with pytest.raises(ValueError, match=rf'{shape[1]}x{shape[2]}.*nearest valid size is {nearest}'):
    model(jnp.zeros(shape))


def _torch_bilinear(x, out_size):
  """torch.nn.functional.interpolate(mode='bilinear', align_corners=False) along axis 1 and 2,
  written from its formula: src = (dst + 0.5) * in / out - 0.5, clamped at 0, linear weights."""

  def along(a, axis, out):
    size = a.shape[axis]
    src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    frac = (src - lo).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    return np.take(a, lo, axis) * (1 - frac) + np.take(a, hi, axis) * frac

  return along(along(x, 1, out_size[0]), 2, out_size[1])


def test_resampling_matches_torch_bilinear_formula():
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 5)).astype(np.float32)
  np.testing.assert_allclose(upsample_double(jnp.asarray(x)), _torch_bilinear(x, (16, 24)),
                             atol=1e-6)
  np.testing.assert_allclose(downsample_half(jnp.asarray(x)), _torch_bilinear(x, (4, 6)), atol=1e-6)


def test_quarter_stacking_matches_slicing_and_inverts():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  halves = split_rows(x)
  quarters = split_columns(halves)
  # Order on the batch axis: top-left, top-right, bottom-left, bottom-right (each N images).
  expected = [x[:, :4, :6], x[:, :4, 6:], x[:, 4:, :6], x[:, 4:, 6:]]
  chex.assert_trees_all_equal(quarters, jnp.concatenate(expected, axis=0))
  chex.assert_trees_all_equal(halves, jnp.concatenate([x[:, :4], x[:, 4:]], axis=0))
  chex.assert_trees_all_equal(merge_columns(quarters), halves)
  chex.assert_trees_all_equal(merge_rows(halves), x)


@pytest.fixture(scope='module')
def tiny_model():
  return MPRNet(**TINY, rngs=nnx.Rngs(1))


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def forward(model, x):
  """`model(x)` as one compiled program: run op by op, a forward compiles hundreds of small
  programs, which took longer than the test's one."""
  return _jitted_forward(*nnx.split(model), x)


# Not square, and the same shape for every forward here: each model compiles once.
IMAGES = (2, 32, 40, 3)


def test_outputs_are_three_float32_images(tiny_model):
  x = jax.random.uniform(jax.random.key(0), IMAGES)
  outputs = forward(tiny_model, x)
  assert len(outputs) == 3
  for out in outputs:
    chex.assert_shape(out, x.shape)
    assert out.dtype == jnp.float32


def test_bfloat16_compute_stays_close_and_float32_params(tiny_model):
  x = jax.random.uniform(jax.random.key(0), IMAGES)
  _, params = nnx.split(tiny_model, nnx.Param)
  model16 = MPRNet(**TINY, dtype=jnp.bfloat16)
  nnx.update(model16, params)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  full, half = forward(tiny_model, x)[0], forward(model16, x)[0]
  assert half.dtype == jnp.float32
  assert float(jnp.abs(full - half).max()) < 0.1 * float(jnp.abs(full).max())
  assert float(jnp.abs(full - half).max()) > 0  # it really computed in bfloat16


def test_remat_changes_nothing_numerically(tiny_model):
  with pytest.raises(ValueError, match='remat must be'):
    tiny_model.set_remat('sometimes')
  x = jax.random.uniform(jax.random.key(2), (1, 32, 32, 3))
  graphdef, params = nnx.split(tiny_model, nnx.Param)

  def loss(params, remat):
    model = nnx.merge(graphdef, params)
    model.set_remat(remat)
    return sum(jnp.mean(o**2) for o in model(x))

  plain = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
  for mode in ('convs', 'runs', 'full'):
    remat = jax.jit(jax.value_and_grad(lambda p: loss(p, mode)))(params)
    chex.assert_trees_all_close(plain, remat, rtol=1e-5, atol=1e-7)


def test_each_remat_mode_keeps_fewer_activations(tiny_model):
  """What the backward pass keeps (the residuals JAX saves, parameters included) shrinks from
  'none' through 'convs' and 'runs' to 'full'; a mode that silently did nothing would tie."""
  x = jax.random.uniform(jax.random.key(2), (1, 32, 32, 3))
  graphdef, params = nnx.split(tiny_model, nnx.Param)

  def saved_bytes(mode):

    def loss(params):
      model = nnx.merge(graphdef, params)
      model.set_remat(mode)
      return sum(jnp.mean(o**2) for o in model(x))

    # Traced only (nothing computed): the residuals' shapes and dtypes are what is kept.
    backward = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(backward))

  sizes = [saved_bytes(mode) for mode in ('none', 'convs', 'runs', 'full')]
  assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes

"""Padding and tiled inference against the untiled result, with a local filter as the 'model'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata

from mprnet_jax import tiling

RADIUS = 2  # the 5x5 filter below


def _make_filter():
  """A jitted fixed 5x5 depthwise convolution, 'SAME' (zero padding): (N, h, w, 3) -> same."""
  kernel = np.random.default_rng(0).normal(size=(5, 5, 1, 3)).astype(np.float32) / 5.0
  calls = []

  @jax.jit
  def apply_fn(batch):
    return jax.lax.conv_general_dilated(
        batch,
        kernel,
        (1, 1),
        'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=3,
        precision=jax.lax.Precision.HIGHEST,
    )

  def counted(batch):
    calls.append(batch.shape)
    return apply_fn(batch)

  return counted, calls


@pytest.fixture(scope='module')
def photo():
  """A real photograph at an odd size that is not a multiple of 8: (301, 457, 3) in [0, 1]."""
  return (skdata.astronaut()[:301, :457] / 255.0).astype(np.float32)


def test_pad_is_reflect_bottom_right_and_crops_back(photo):
  padded, (height, width) = tiling.pad_to_multiple(photo, 8)
  assert padded.shape == (304, 464, 3) and (height, width) == (301, 457)
  np.testing.assert_array_equal(np.asarray(padded[:301, :457]), photo)
  # torch's 'reflect': the edge pixel is not repeated.
  np.testing.assert_array_equal(np.asarray(padded[301:304, :457]), photo[299:296:-1])
  np.testing.assert_array_equal(np.asarray(padded[:301, 457:464]), photo[:, 455:448:-1])
  unchanged, size = tiling.pad_to_multiple(photo[:296, :456], 8)
  assert unchanged.shape == (296, 456, 3) and size == (296, 456)


def test_pad_small_images_repeat_the_reflection():
  tiny = np.arange(3 * 2 * 1, dtype=np.float32).reshape(3, 2, 1)
  padded, size = tiling.pad_to_multiple(tiny, 8)
  assert padded.shape == (8, 8, 1) and size == (3, 2)
  np.testing.assert_array_equal(np.asarray(padded[:, 0, 0]), [0, 2, 4, 2, 0, 2, 4, 2])
  single, _ = tiling.pad_to_multiple(np.ones((1, 1, 3)), 8)
  assert single.shape == (8, 8, 3) and np.all(np.asarray(single) == 1)
  batched, _ = tiling.pad_to_multiple(np.zeros((2, 5, 9, 3)), 8)
  assert batched.shape == (2, 8, 16, 3)


def test_whole_image_tile_is_bit_identical_to_untiled(photo):
  apply_fn, _ = _make_filter()
  padded, _ = tiling.pad_to_multiple(photo)
  reference = np.asarray(apply_fn(padded[None]))[0, :301, :457]
  full = tiling.restore_full(apply_fn, photo)
  tiled = tiling.restore_tiled(apply_fn, photo, tile=512, overlap=32)
  assert full.shape == tiled.shape == (301, 457, 3) and tiled.dtype == np.float32
  np.testing.assert_array_equal(full, reference)
  np.testing.assert_array_equal(tiled, reference)


@pytest.mark.parametrize('tile, overlap, batch_tiles', [(64, 16, 4), (96, 40, 3), (320, 24, 1)])
def test_small_tiles_match_untiled(photo, tile, overlap, batch_tiles):
  apply_fn, calls = _make_filter()
  full = tiling.restore_full(apply_fn, photo)
  tiled = tiling.restore_tiled(apply_fn, photo, tile, overlap, batch_tiles=batch_tiles)
  assert tiled.shape == (301, 457, 3)
  tile_shape = (batch_tiles, min(tile, 304), min(tile, 464), 3)
  assert len(calls) > 2 and set(calls[1:]) == {tile_shape}  # one shape: one compilation
  # Tiles are cut from the padded image, so even the borders see the same context.
  np.testing.assert_allclose(tiled, full, atol=1e-5, rtol=0)


def test_without_overlap_the_seams_show(photo):
  apply_fn, _ = _make_filter()
  full = tiling.restore_full(apply_fn, photo)
  tiled = tiling.restore_tiled(apply_fn, photo, tile=64, overlap=0)
  assert np.abs(tiled - full).max() > 1e-2


def test_blend_window_cross_fades():
  window = tiling.blend_window(64, 16, at_start=False, at_end=False)
  assert np.all(window[:4] == 0) and np.all(window[-4:] == 0) and window[32] == 1
  neighbour_sum = window[-16:] + window[:16]  # two tiles overlapping by exactly 16
  np.testing.assert_allclose(neighbour_sum, 1.0, atol=1e-6)
  edge = tiling.blend_window(64, 16, at_start=True, at_end=False)
  assert np.all(edge[:8] == 1)
  assert tiling.tile_starts(304, 64, 16) == [0, 48, 96, 144, 192, 240]
  assert tiling.tile_starts(48, 64, 16) == [0]


@pytest.mark.parametrize(
    'tile, overlap, message',
    [(60, 8, 'multiple of 8'), (0, 0, 'multiple of 8'), (64, 64, 'overlap'), (64, -1, 'overlap')],
)
def test_bad_tiling_arguments_raise(photo, tile, overlap, message):
  apply_fn, _ = _make_filter()
  with pytest.raises(ValueError, match=message):
    tiling.restore_tiled(apply_fn, photo, tile, overlap)
  with pytest.raises(ValueError, match='batch_tiles'):
    tiling.restore_tiled(apply_fn, photo, 64, 8, batch_tiles=0)
  with pytest.raises(ValueError, match=r'\(H, W, C\)'):
    tiling.restore_tiled(apply_fn, photo[None], 64, 8)


def test_gray_like_single_channel_works():
  image = jnp.linspace(0, 1, 13 * 21).reshape(13, 21, 1)
  out = tiling.restore_full(lambda batch: batch * 2.0, image)
  assert out.shape == (13, 21, 1)
  np.testing.assert_allclose(out, np.asarray(image) * 2.0)

"""Metrics against scikit-image and against the reference numbers in the metrics fixtures."""

import csv
import filecmp
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mprnet_jax import metrics

FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'metrics'
SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'metrics'

# Reached against the fixtures: about 2e-6 (float32 here, float64 in the references).
FIXTURE_TOL = 1e-5
SKIMAGE_TOL = 1e-4

WRAPS = pytest.mark.parametrize('wrap', [lambda f: f, jax.jit], ids=['eager', 'jit'])


def _sk_ssim(x, y):
  return structural_similarity(
    x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
    channel_axis=-1,
  )


def _degrade(image_u8, seed):
  """A real photograph in [0, 1], blurred and noised: (H, W, 3) float64 pair."""
  clean = image_u8.astype(np.float64) / 255.0
  rng = np.random.default_rng(seed)
  blurred = ndimage.gaussian_filter(clean, sigma=(1.2, 1.2, 0))
  noisy = np.clip(blurred + rng.normal(0, 0.04, clean.shape), 0, 1)
  return noisy, clean


def _fixture_rows():
  table = FIXTURES / 'metrics.csv'
  assert table.is_file(), f'missing fixture {table}'
  with open(table, newline='') as handle:
    rows = list(csv.DictReader(handle))
  assert len(rows) == 4
  for row in rows:
    row['target'] = np.asarray(Image.open(FIXTURES / 'target' / row['file']).convert('RGB'))
    row['restored'] = np.asarray(Image.open(FIXTURES / 'restored' / row['file']).convert('RGB'))
  return rows


@pytest.fixture(scope='module')
def fixture_rows():
  return _fixture_rows()


def test_fixture_copy_is_unchanged():
  assert (FIXTURES / 'PROVENANCE.md').is_file()
  names = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob('*.png'))
  assert len(names) == 8
  if SHARED.is_dir():  # the copy must stay byte-identical to its source
    for name in names + [Path('metrics.csv')]:
      assert filecmp.cmp(FIXTURES / name, SHARED / name, shallow=False), name


def _all_metrics(restored_u8, target_u8):
  """The four metrics of one uint8 pair, as the fixtures' table lists them."""
  restored, target = restored_u8 / 255.0, target_u8 / 255.0
  return {
    'psnr_rgb': metrics.psnr(restored, target),
    'ssim_rgb_skimage_gaussian': metrics.ssim(restored, target),
    'psnr_y': metrics.psnr_y(restored_u8, target_u8),
    'ssim_y': metrics.ssim_y(restored_u8, target_u8),
  }


def test_all_metrics_match_fixture_references_under_jit(fixture_rows):
  all_metrics = jax.jit(_all_metrics)
  for row in fixture_rows:
    got = all_metrics(row['restored'], row['target'])
    for column, value in got.items():
      assert abs(float(value) - float(row[column])) < FIXTURE_TOL, (row['file'], column)
    assert abs(float(got['psnr_rgb']) - float(row['psnr_rgb_skimage'])) < FIXTURE_TOL


def test_all_metrics_match_fixture_references_eagerly(fixture_rows):
  # Eager dispatch compiles every op per shape: one pair keeps this quick.
  row = fixture_rows[2]
  for column, value in _all_metrics(row['restored'], row['target']).items():
    assert abs(float(value) - float(row[column])) < FIXTURE_TOL, (row['file'], column)


def test_y_metrics_accept_rounded_floats(fixture_rows):
  row = fixture_rows[2]
  as_float = (row['restored'].astype(np.float32), row['target'].astype(np.float32))
  assert float(metrics.psnr_y(*as_float)) == float(metrics.psnr_y(row['restored'], row['target']))
  assert float(metrics.ssim_y(*as_float)) == float(metrics.ssim_y(row['restored'], row['target']))


def test_rgb_to_y_matches_matlab_formula():
  rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  exact = 16 + (rgb.astype(np.float64) @ np.array([65.481, 128.553, 24.966])) / 255.0
  expected = np.floor(exact + 0.5)
  np.testing.assert_array_equal(np.asarray(metrics.rgb_to_y(rgb)), expected)


@pytest.mark.parametrize(
  'wrap, name',
  [(jax.jit, 'astronaut'), (jax.jit, 'chelsea'), (jax.jit, 'coffee'), (lambda f: f, 'chelsea')],
  ids=['jit-astronaut', 'jit-chelsea', 'jit-coffee', 'eager-chelsea'],
)
def test_on_skimage_photographs(wrap, name):
  restored, target = _degrade(getattr(skdata, name)(), seed=len(name))
  got_psnr = float(wrap(metrics.psnr)(restored, target))
  got_ssim = float(wrap(metrics.ssim)(restored, target))
  assert abs(got_psnr - peak_signal_noise_ratio(target, restored, data_range=1)) < SKIMAGE_TOL
  assert abs(got_ssim - _sk_ssim(restored, target)) < SKIMAGE_TOL


@WRAPS
def test_batched_random_images_match_skimage_per_image(wrap):
  rng = np.random.default_rng(1)
  target = rng.random((3, 37, 53, 3))
  restored = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
  restored[2] = rng.random((37, 53, 3))  # an unrelated pair: SSIM near 0
  got_psnr = np.asarray(wrap(metrics.psnr)(restored, target))
  got_ssim = np.asarray(wrap(metrics.ssim)(restored, target))
  assert got_psnr.shape == got_ssim.shape == (3,)
  for i in range(3):
    expected_psnr = peak_signal_noise_ratio(target[i], restored[i], data_range=1)
    assert abs(got_psnr[i] - expected_psnr) < SKIMAGE_TOL
    assert abs(got_ssim[i] - _sk_ssim(restored[i], target[i])) < SKIMAGE_TOL


def test_psnr_clamps_and_identical_is_inf():
  rng = np.random.default_rng(2)
  target = rng.random((16, 16, 3)).astype(np.float32)
  assert np.isinf(float(metrics.psnr(target, target)))
  outside = target + 2.0  # clamps to all ones
  expected = peak_signal_noise_ratio(target, np.ones_like(target), data_range=1)
  assert abs(float(metrics.psnr(outside, target)) - expected) < SKIMAGE_TOL
  assert np.isinf(float(metrics.psnr_y(np.uint8(target * 255), np.uint8(target * 255))))
  assert abs(float(metrics.ssim(target, target)) - 1.0) < 1e-6


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match='shapes differ'):
    metrics.psnr(np.zeros((16, 16, 3)), np.zeros((16, 17, 3)))
  with pytest.raises(ValueError, match='at least 11x11'):
    metrics.ssim(np.zeros((10, 16, 3)), np.zeros((10, 16, 3)))
  with pytest.raises(ValueError, match=r'\(H, W, C\)'):
    metrics.ssim(np.zeros((16, 16)), np.zeros((16, 16)))

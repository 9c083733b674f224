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
      x,
      y,
      gaussian_weights=True,
      sigma=1.5,
      use_sample_covariance=False,
      data_range=1,
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


# --- MATLAB psnr / ssim (GoPro, HIDE, SIDD protocols) ---


def _matlab_ssim_float64(x, y, data_range):
  """MATLAB's documented default `ssim` in float64: 3-D Gaussian (sigma 1.5, 11 taps per axis,
  'replicate' padding: SciPy's 'nearest') over H x W x C, mean of the whole map."""
  x, y = np.float64(x), np.float64(y)
  blur = lambda a: ndimage.gaussian_filter(a, 1.5, mode='nearest', truncate=5 / 1.5)  # noqa: E731
  mu_x, mu_y = blur(x), blur(y)
  var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
  cov = blur(x * y) - mu_x * mu_y
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) *
                                                          (var_x + var_y + c2))
  return ssim_map.mean()


def test_ssim_matlab_is_the_3d_volume_ssim_not_the_channel_mean():
  restored, target = _degrade(skdata.chelsea()[:96, :128], seed=3)
  restored_u8, target_u8 = np.round(restored * 255), np.round(target * 255)
  ssim_3d = jax.jit(metrics.ssim_matlab, static_argnums=2)
  got = float(ssim_3d(restored_u8, target_u8, 255.0))
  assert abs(got - _matlab_ssim_float64(restored_u8, target_u8, 255.0)) < 2e-5
  # The same at L = 1 on the /255 values (what SIDD's single blocks use).
  assert abs(float(ssim_3d(restored_u8 / 255, target_u8 / 255, 1.0)) - got) < 2e-5
  # One channel at a time is MATLAB's 2-D ssim; their mean is a different, lower number.
  per_channel = np.mean(
      [float(ssim_3d(restored_u8[..., c:c + 1], target_u8[..., c:c + 1], 255.0)) for c in range(3)])
  for c in range(3):
    two_d = _matlab_ssim_float64(restored_u8[..., c:c + 1], target_u8[..., c:c + 1], 255.0)
    assert abs(float(ssim_3d(restored_u8[..., c:c + 1], target_u8[..., c:c + 1], 255.0)) -
               two_d) < 2e-5
  assert got - per_channel > 0.05


def test_ssim_matlab_batched_and_other_channel_counts():
  rng = np.random.default_rng(4)
  target = rng.random((2, 23, 31, 5))
  restored = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
  got = np.asarray(jax.jit(metrics.ssim_matlab)(restored, target))
  want = [_matlab_ssim_float64(restored[i], target[i], 1.0) for i in range(2)]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_psnr_matlab_formula_without_clamping():
  rng = np.random.default_rng(5)
  target = rng.integers(0, 256, (2, 17, 19, 3)).astype(np.float64)
  restored = target + rng.normal(0, 9, target.shape)  # leaves [0, 255]: MATLAB does not clamp
  want = 10 * np.log10(255.0**2 / np.mean((restored - target)**2, axis=(1, 2, 3)))
  got = np.asarray(metrics.psnr_matlab(restored, target, 255.0))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.isinf(float(metrics.psnr_matlab(target[0], target[0], 255.0)))

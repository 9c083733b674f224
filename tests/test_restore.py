"""Restoring and evaluating real photographs, exporting weights, and the command line's
answers to bad input.

Each image size is a compile of the network (seconds): besides the odd-sized photo (padded to
208 x 320) the tests use images padded to 64 x 64 and tiles of 64 (one program, from the
cache after its first compile) wherever the size is not what they test."""

import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import FIXTURES
from mprnet_jax import from_pytorch, to_pytorch_state_dict
from mprnet_jax.cli import main
from mprnet_jax.errors import MprnetError
from mprnet_jax.image_io import read_image, write_image
from mprnet_jax.inference import Restorer
from mprnet_jax.metrics import psnr

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, and tiling within one setting

TINY = FIXTURES / 'tiny.pth'


@pytest.fixture(scope='module')
def restorer():
  return Restorer(TINY)


@pytest.fixture(scope='module')
def photo():
  # A real photograph at an odd size (not a multiple of 8 either way).
  return skimage.data.astronaut()[101:304, 57:374]


def test_odd_sized_photo_comes_back_at_its_size_and_dtype(restorer, photo):
  restored = restorer(photo)
  assert restored.shape == photo.shape and restored.dtype == np.uint8
  sixteen = restorer(photo.astype(np.uint16) * 257)
  assert sixteen.dtype == np.uint16 and sixteen.shape == photo.shape


def test_whole_image_tile_equals_untiled_exactly(restorer, photo):
  image = photo.astype(np.float32) / 255
  untiled = restorer.restore_float(image)
  whole = Restorer(restorer.model, tile=320, overlap=32).restore_float(image)
  assert np.array_equal(untiled, whole)


def test_small_tiles_stay_close_to_untiled_on_a_trained_model(photo):
  # demo_denoise.safetensors: the demo's model (experiments/default.py, 400 steps), exported
  # with `mprnet export`. Channel attention averages over the whole input, so tiles cannot be
  # exact; measured 43.4 dB between tiled (96 px, overlap 48) and untiled (README).
  trained = Restorer(FIXTURES / 'demo_denoise.safetensors')
  clean = photo.astype(np.float32) / 255
  noisy = np.clip(clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape), 0, 1)
  untiled = trained.restore_float(noisy.astype(np.float32))
  tiled = Restorer(trained.model, tile=96, overlap=48).restore_float(noisy.astype(np.float32))
  assert float(psnr(tiled, untiled)) > 40.0
  assert not np.array_equal(tiled, untiled)
  # And tiling costs the restoration almost nothing against the clean photo.
  assert abs(float(psnr(tiled, clean)) - float(psnr(untiled, clean))) < 0.05
  assert float(psnr(untiled, clean)) > float(psnr(noisy, clean)) + 5


def test_each_ensemble_view_is_undone_exactly():
  from mprnet_jax.inference import _geometric, _inverse_geometric
  for shape in ((1, 8, 8, 3), (2, 8, 16, 3)):  # square, and not square
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    views = [np.asarray(_geometric(x, mode)) for mode in range(8)]
    for mode, view in enumerate(views):
      assert np.array_equal(np.asarray(_inverse_geometric(jnp.asarray(view), mode)), x), mode
    # Eight different views (as sets of pixel positions), so none is skipped or repeated.
    flat = {view.tobytes() + str(view.shape).encode() for view in views}
    assert len(flat) == 8


def test_ensemble_of_an_equivariant_network_is_that_network(restorer, photo, monkeypatch):
  """A stand-in network that commutes with flips and rotations (a per-pixel function) gives
  the same result with and without the ensemble: every view is mapped back onto the image."""
  model = restorer.model
  image = photo[:64, :48].astype(np.float32) / 255
  plain = Restorer(model)
  ensembled = Restorer(model, ensemble=True)
  for restorer in (plain, ensembled):
    monkeypatch.setattr(restorer, '_apply',
                        lambda params, x: jnp.sqrt(x) * 0.5 + x[..., ::-1] * 0.25)
  assert np.allclose(ensembled.restore_float(image), plain.restore_float(image), atol=2e-7)


def test_ensemble_averages_eight_views(restorer, photo):
  model = restorer.model
  image = photo[:64, :64].astype(np.float32) / 255
  plain = Restorer(model).restore_float(image)
  ensembled = Restorer(model, ensemble=True).restore_float(image)
  assert ensembled.shape == plain.shape and not np.array_equal(plain, ensembled)


def test_out_of_memory_falls_back_to_tiles(restorer, photo, monkeypatch):
  """An image that exhausts device memory is restored in tiles instead (simulated: the
  compiled function refuses inputs above 64 pixels a side, as XLA reports it)."""
  tiled = Restorer(restorer.model, bucket=8)
  real_apply = tiled._apply

  def limited(params, x):
    if max(x.shape[1:3]) > 64:
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate')
    return real_apply(params, x)

  monkeypatch.setattr(tiled, '_apply', limited)
  monkeypatch.setattr('mprnet_jax.inference.FALLBACK_TILES', (512, 64))  # 512: not below 317
  image = photo.astype(np.float32) / 255  # 203 x 317: too large here
  with pytest.warns(UserWarning, match='restoring in 64-pixel tiles'):
    restored = tiled.restore_float(image)
  assert restored.shape == image.shape
  assert float(psnr(restored, restorer.restore_float(image))) > 10  # a restoration, not noise
  monkeypatch.setattr('mprnet_jax.inference.FALLBACK_TILES', (512,))
  with pytest.raises(MprnetError, match='does not fit in device memory'):
    tiled.restore_float(image)


def test_restorer_is_public_api():
  import mprnet_jax
  assert mprnet_jax.Restorer is Restorer


def _write_pairs(root, photo):
  (root / 'input').mkdir(parents=True)
  (root / 'target').mkdir()
  rng = np.random.default_rng(0)
  for i, crop in enumerate([photo[:64, :64], photo[40:101, 100:163]]):  # both padded to 64x64
    noisy = np.clip(crop + rng.normal(0, 20, crop.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(root / 'input' / f'{i}.png')
    Image.fromarray(crop).save(root / 'target' / f'{i}.png')


def test_cli_convert_with_reference(tmp_path, capsys):
  out = tmp_path / 'tiny.safetensors'
  assert main(['convert',
               str(TINY),
               str(out), '--reference',
               str(FIXTURES / 'tiny_outputs.npz')]) == 0
  printed = capsys.readouterr().out
  assert '427,033 parameters' in printed and 'stage3: largest |difference|' in printed
  assert out.exists()
  assert main(['convert', str(TINY), str(out)]) == 2  # refuses to overwrite
  assert 'already exists' in capsys.readouterr().err


def test_cli_restore_folder_keeps_depth_and_never_overwrites(tmp_path, photo, capsys):
  folder = tmp_path / 'in'
  folder.mkdir()
  # Odd sizes, both padded to 64 x 64.
  write_image(folder / 'a.png', photo[:61, :59] / 255.0)
  Image.fromarray((photo[:57, :60, 0].astype(np.uint16) * 257)).save(folder / 'gray16.png')
  out = tmp_path / 'out'
  with pytest.warns(UserWarning, match='grayscale'):
    assert main(['restore', '--weights', str(TINY), str(folder), '--output', str(out)]) == 0
  restored, info = read_image(out / 'a.png')
  assert restored.shape == (61, 59, 3) and info.bit_depth == 8
  with pytest.warns(UserWarning):
    _, info16 = read_image(out / 'gray16.png')
  assert info16.bit_depth == 16 and info16.mode == 'gray'
  assert main(['restore', '--weights', str(TINY), str(folder), '--output', str(folder)]) == 2
  assert 'would overwrite an input' in capsys.readouterr().err


def test_cli_evaluate_writes_csv(tmp_path, photo, capsys):
  _write_pairs(tmp_path / 'pairs', photo)
  csv_path = tmp_path / 'metrics.csv'
  assert main([
      'evaluate', '--weights',
      str(TINY), '--data',
      str(tmp_path / 'pairs'), '--csv',
      str(csv_path)
  ]) == 0
  assert '2 images: PSNR' in capsys.readouterr().out
  lines = csv_path.read_text().splitlines()
  assert lines[0] == 'name,psnr,ssim' and lines[-1].startswith('mean,') and len(lines) == 4


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_export_round_trips_bit_for_bit(tmp_path, suffix):
  out = tmp_path / f'exported{suffix}'
  assert main(['export', str(TINY), str(out)]) == 0
  original = to_pytorch_state_dict(from_pytorch(TINY))
  from mprnet_jax.weights import load_model
  back = to_pytorch_state_dict(load_model(out))
  assert set(back) == set(original)
  assert all(np.array_equal(back[k], original[k]) for k in original)
  if suffix == '.pth':
    from mprnet_jax.torch_format import load_pth
    assert set(load_pth(out)) == {'state_dict'}


def test_cli_bad_inputs_give_one_line_errors(tmp_path, capsys):
  not_image = tmp_path / 'notes.png'
  not_image.write_text('hello')
  empty = tmp_path / 'empty'
  empty.mkdir()
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  foreign = tmp_path / 'foreign.safetensors'
  from safetensors.numpy import save_file
  save_file({'conv.weight': np.zeros((2, 2), np.float32)}, str(foreign))
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / 'ok.png')
  cases = [
      (['restore', '--weights',
        str(TINY),
        str(not_image), '--output',
        str(tmp_path / 'o1')], 'notes.png'),
      (['restore', '--weights',
        str(TINY), str(empty), '--output',
        str(tmp_path / 'o2')], 'empty'),
      (['restore', '--weights',
        str(TINY),
        str(tmp_path / 'ok.png'), '--output',
        str(a_file)], 'output folder is a file'),
      ([
          'restore', '--weights',
          str(foreign),
          str(tmp_path / 'ok.png'), '--output',
          str(tmp_path / 'o3')
      ], 'not an MPRNet state dict'),
      (['evaluate', '--weights', str(TINY), '--data',
        str(empty)], 'input'),
      (['convert', str(not_image), str(tmp_path / 'x.safetensors')], 'notes.png'),
  ]
  for argv, expected in cases:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('mprnet ')]
    assert len(errors) == 1 and expected in errors[0] and 'Traceback' not in err, (argv, err)


def test_image_above_the_memory_budget_is_tiled_before_running(restorer, photo, monkeypatch):
  """On the CPU an oversized allocation can kill the process before XLA reports anything, so
  an image whose estimated peak exceeds the budget is tiled from the start, with a warning."""
  image = photo.astype(np.float32) / 255
  small = Restorer(restorer.model, bucket=8, memory_budget=1)  # nothing fits: smallest tile
  whole_calls = []
  real_apply = small._apply

  def counting(params, x):
    whole_calls.append(x.shape)
    return real_apply(params, x)

  monkeypatch.setattr(small, '_apply', counting)
  monkeypatch.setattr('mprnet_jax.inference.FALLBACK_TILES', (128, 64))
  with pytest.warns(UserWarning, match=r'203x317 needs about .* budget on cpu; restoring in '
                    r'64-pixel tiles'):
    restored = small.restore_float(image)
  assert all(shape[1:3] == (64, 64) for shape in whole_calls)  # never the whole image
  from mprnet_jax import tiling
  # the fall-back's tiling: one tile per call, overlap min(64, tile // 4)
  expected = tiling.restore_tiled(lambda x: real_apply(small._params, x), image, 64, 16, 8,
                                  batch_tiles=1)
  np.testing.assert_array_equal(restored, expected)
  roomy = Restorer(restorer.model, bucket=8, memory_budget=small.estimate_bytes(203, 317))
  np.testing.assert_array_equal(roomy.restore_float(image), restorer.restore_float(image))


def test_memory_estimate_grows_with_pixels_and_width(restorer):
  est = restorer.estimate_bytes
  params = est(0, 0)
  channels = restorer.model.config.n_feat + restorer.model.config.scale_orsnetfeats
  # the stated formula: 44 bytes per padded pixel and channel, plus the float32 parameters
  assert est(64, 64) - params == 64 * 64 * channels * 44
  assert est(61, 63) == est(64, 64)  # padded to the bucket first


def test_numpy_memory_error_also_falls_back_to_tiles(restorer, photo, monkeypatch):
  tiled = Restorer(restorer.model, bucket=8, memory_budget=1 << 40)
  real_apply = tiled._apply

  def limited(params, x):
    if max(x.shape[1:3]) > 64:
      raise MemoryError()
    return real_apply(params, x)

  monkeypatch.setattr(tiled, '_apply', limited)
  monkeypatch.setattr('mprnet_jax.inference.FALLBACK_TILES', (64,))
  with pytest.warns(UserWarning, match='restoring in 64-pixel tiles'):
    restored = tiled.restore_float(photo[:80, :100].astype(np.float32) / 255)
  assert restored.shape == (80, 100, 3)

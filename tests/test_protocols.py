"""`mprnet evaluate --protocol ...` against the reference values of ../shared/fixtures/protocols
(official scripts and MATLAB's documented definitions) and the official file formats."""

import csv
import json
import shutil
import sys

import h5py
import numpy as np
import pytest
import scipy.io
from conftest import shared_fixture
from PIL import Image

from mprnet_jax import protocols
from mprnet_jax.cli import main

PSNR_TOL = 2e-3  # dB
SSIM_TOL = 2e-4
ARRAY_TOL = 1e-3  # Idenoised.mat and DND patches against the official restorations
# One batch size for SIDD blocks and DND patches (all 64x64): a single compiled shape.
BATCH = ['--batch', '3']


def _csv_rows(path):
  with open(path) as handle:
    return {row['file']: row for row in csv.DictReader(handle)}


def _assert_close(per_image, reference, psnr_key, ssim_key):
  assert [r['name'] for r in per_image] == sorted(reference)
  for row in per_image:
    ref = reference[row['name']]
    assert abs(row['psnr'] - float(ref[psnr_key])) < PSNR_TOL, (row, ref)
    assert abs(row['ssim'] - float(ref[ssim_key])) < SSIM_TOL, (row, ref)


def _one_error_line(capsys):
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('mprnet ')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  return lines[0]


# --- folder protocols, results mode, on the reference pairs ---


@pytest.mark.parametrize('protocol', ['gopro', 'realblur'])
def test_pair_protocols_match_the_official_references(protocol):
  pairs = shared_fixture('protocols/pairs')
  reference = _csv_rows(pairs / 'protocols.csv')
  result = protocols.evaluate_pairs(protocol, pairs, results_dir=pairs / 'restored', progress=False)
  _assert_close(result['per_image'], reference, f'psnr_{protocol}', f'ssim_{protocol}')
  assert result['images'] == 3
  assert result['psnr'] == pytest.approx(
      np.mean([float(r[f'psnr_{protocol}']) for r in reference.values()]), abs=PSNR_TOL)


def test_rain_and_rgb_protocols_match_the_metrics_references(tmp_path):
  folder = shared_fixture('metrics')
  reference = _csv_rows(folder / 'metrics.csv')
  rain = protocols.evaluate_pairs('rain', folder, results_dir=folder / 'restored', progress=False)
  _assert_close(rain['per_image'], reference, 'psnr_y', 'ssim_y')
  # The default protocol keeps its numbers: RGB PSNR and scikit-image's Gaussian SSIM (on two
  # of the pairs, so that fewer image sizes compile).
  (tmp_path / 'target').mkdir()
  kept = sorted(reference)[:2]
  for name in kept:
    shutil.copy(folder / 'target' / name, tmp_path / 'target' / name)
  rgb = protocols.evaluate_pairs('rgb', tmp_path, results_dir=folder / 'restored', progress=False)
  _assert_close(rgb['per_image'], {n: reference[n] for n in kept}, 'psnr_rgb',
                'ssim_rgb_skimage_gaussian')


def test_cli_json_and_several_datasets_with_a_mean_row(tmp_path, capsys):
  folder = shared_fixture('metrics')
  reference = _csv_rows(folder / 'metrics.csv')
  # A second dataset: two of the four pairs, its results in a folder of their own.
  small = tmp_path / 'Small'
  (small / 'target').mkdir(parents=True)
  results = tmp_path / 'small_results'
  results.mkdir()
  for name in sorted(reference)[:2]:
    shutil.copy(folder / 'target' / name, small / 'target' / name)
    shutil.copy(folder / 'restored' / name, results / name)
  out = tmp_path / 'rain.json'
  assert main([
      'evaluate', '--protocol', 'rain', '--results',
      str(folder / 'restored'),
      str(results), '--data',
      str(folder),
      str(small), '--json',
      str(out)
  ]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert sum('images: PSNR' in line for line in lines) == 2
  assert any(line.startswith('mean of 2 datasets (6 images)') for line in lines)
  document = json.loads(out.read_text())
  assert document['protocol'] == 'rain' and len(document['datasets']) == 2
  first, second = document['datasets']
  assert first['images'] == 4 and second['images'] == 2
  _assert_close(first['per_image'], reference, 'psnr_y', 'ssim_y')
  expected_small = np.mean([float(reference[n]['psnr_y']) for n in sorted(reference)[:2]])
  assert second['psnr'] == pytest.approx(expected_small, abs=PSNR_TOL)
  assert document['psnr'] == pytest.approx((first['psnr'] + second['psnr']) / 2, abs=1e-9)
  assert document['ssim'] == pytest.approx((first['ssim'] + second['ssim']) / 2, abs=1e-9)
  assert set(first['per_image'][0]) == {'name', 'psnr', 'ssim'}


# --- weights mode: restore, save, rescore ---


def _noisy_pairs(root, count=2, size=(36, 44)):
  """Pairs cut from a real photo, inputs noised: sizes not multiples of 8 (official padding)."""
  import skimage.data

  photo = skimage.data.astronaut()
  rng = np.random.default_rng(0)
  for sub in ('input', 'target'):
    (root / sub).mkdir(parents=True)
  for index in range(count):
    clean = photo[100 + 40 * index:100 + 40 * index + size[0], 150:150 + size[1]]
    noisy = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
    Image.fromarray(clean).save(root / 'target' / f'im{index}.png')
    Image.fromarray(noisy).save(root / 'input' / f'im{index}.png')


def test_saved_images_rescore_identically_in_results_mode(tmp_path, capsys):
  weights = shared_fixture('protocols/denoise.pth')
  data = tmp_path / 'pairs'
  _noisy_pairs(data)
  saved = tmp_path / 'saved'
  first, second = tmp_path / 'weights.json', tmp_path / 'results.json'
  assert main([
      'evaluate', '--protocol', 'gopro', '--weights',
      str(weights), '--data',
      str(data), '--save-images',
      str(saved), '--json',
      str(first)
  ]) == 0
  assert sorted(p.name for p in saved.iterdir()) == ['im0.png', 'im1.png']
  restored = np.asarray(Image.open(saved / 'im0.png'))
  assert restored.dtype == np.uint8 and restored.shape == (36, 44, 3)
  assert main([
      'evaluate', '--protocol', 'gopro', '--results',
      str(saved), '--data',
      str(data), '--json',
      str(second)
  ]) == 0
  a, b = json.loads(first.read_text()), json.loads(second.read_text())
  assert a['per_image'] == b['per_image'] and a['protocol'] == 'gopro' and a['images'] == 2
  # The restorations differ from the inputs: the model did run.
  noisy_score = protocols.evaluate_pairs('gopro', data, results_dir=data / 'input', progress=False)
  assert abs(noisy_score['psnr'] - a['psnr']) > 0.01


def test_sixteen_bit_targets_keep_sixteen_bits(tmp_path, capsys):
  """16-bit pairs are read, restored, saved and scored at 16 bits, not cut to 8."""
  from mprnet_jax.image_io import ImageInfo, read_image, write_image
  weights = shared_fixture('protocols/denoise.pth')
  data = tmp_path / 'deep'
  _noisy_pairs(data)
  for sub in ('input', 'target'):
    for path in (data / sub).iterdir():
      image, _ = read_image(path)
      fine = image + np.float32(97 / 65535)  # a value no 8-bit level can hold
      write_image(path, np.clip(fine, 0, 1),
                  ImageInfo(bit_depth=16, mode='rgb', alpha=None, shape=()))
  saved, first, second = tmp_path / 'saved', tmp_path / 'a.json', tmp_path / 'b.json'
  assert main([
      'evaluate', '--weights',
      str(weights), '--data',
      str(data), '--save-images',
      str(saved), '--json',
      str(first), '--csv',
      str(tmp_path / 'm.csv')
  ]) == 0
  restored, info = read_image(saved / 'im0.png')
  assert info.bit_depth == 16
  assert not np.array_equal(np.round(restored * 255) / 255, restored)  # finer than 8 bits
  assert main(['evaluate', '--results',
               str(saved), '--data',
               str(data), '--json',
               str(second)]) == 0
  a, b = json.loads(first.read_text()), json.loads(second.read_text())
  assert a['per_image'] == b['per_image']


# --- SIDD ---


def _write_v73(path, variables):
  """A MATLAB v7.3 file as MATLAB writes it: HDF5, every array stored transposed."""
  with h5py.File(path, 'w') as handle:
    for name, array in variables.items():
      handle.create_dataset(name, data=np.asarray(array).transpose())


def test_sidd_restores_writes_idenoised_and_scores_like_evaluate_sidd(tmp_path, capsys):
  sidd = shared_fixture('protocols/sidd')
  expected = json.loads((sidd / 'expected.json').read_text())
  out = tmp_path / 'sidd.json'
  assert main([
      'evaluate', '--protocol', 'sidd', '--weights',
      str(shared_fixture('protocols/denoise.pth')), '--data',
      str(sidd), '--output',
      str(tmp_path), '--json',
      str(out), *BATCH
  ]) == 0
  result = json.loads(out.read_text())
  assert result['images'] == expected['blocks'] == 6
  assert result['psnr'] == pytest.approx(expected['psnr'], abs=PSNR_TOL)
  assert result['ssim'] == pytest.approx(expected['ssim'], abs=SSIM_TOL)
  assert [r['name'] for r in result['per_image']] == ['0_0', '0_1', '0_2', '1_0', '1_1', '1_2']
  np.testing.assert_allclose([r['psnr'] for r in result['per_image']], expected['psnr_per_block'],
                             atol=PSNR_TOL, rtol=0)
  np.testing.assert_allclose([r['ssim'] for r in result['per_image']], expected['ssim_per_block'],
                             atol=SSIM_TOL, rtol=0)
  written = scipy.io.loadmat(tmp_path / 'Idenoised.mat')['Idenoised']
  reference = np.load(sidd / 'expected_Idenoised.npy')
  assert written.dtype == np.float32 and written.shape == reference.shape
  np.testing.assert_allclose(written, reference, atol=ARRAY_TOL, rtol=0)


def test_sidd_results_mode_reads_v5_and_v73_files(tmp_path):
  sidd = shared_fixture('protocols/sidd')
  expected = json.loads((sidd / 'expected.json').read_text())
  reference = np.load(sidd / 'expected_Idenoised.npy')
  gt = scipy.io.loadmat(sidd / 'ValidationGtBlocksSrgb.mat')['ValidationGtBlocksSrgb']
  # v7.3 ground truth and v7.3 results next to each other; v5 results from the fixture's data.
  v73 = tmp_path / 'v73'
  v73.mkdir()
  _write_v73(v73 / 'ValidationGtBlocksSrgb.mat', {'ValidationGtBlocksSrgb': gt})
  _write_v73(v73 / 'Idenoised.mat', {'Idenoised': reference})
  scipy.io.savemat(tmp_path / 'Idenoised.mat', {'Idenoised': reference})
  for data, results in [(v73, v73), (sidd, tmp_path / 'Idenoised.mat')]:
    result = protocols.evaluate_sidd(data, results=results, progress=False)
    assert result['psnr'] == pytest.approx(expected['psnr'], abs=PSNR_TOL)
    np.testing.assert_allclose([r['ssim'] for r in result['per_image']], expected['ssim_per_block'],
                               atol=SSIM_TOL, rtol=0)


# --- DND ---


def test_dnd_writes_the_official_submission_files(tmp_path, capsys):
  dnd = shared_fixture('protocols/dnd')
  out = tmp_path / 'submit'
  assert main([
      'evaluate', '--protocol', 'dnd', '--weights',
      str(shared_fixture('protocols/denoise.pth')), '--data',
      str(dnd), '--output',
      str(out), *BATCH
  ]) == 0
  assert 'no public ground truth' in capsys.readouterr().out
  expected = np.load(dnd / 'expected_patches.npz')
  assert sorted(p.name for p in out.iterdir()) == ['0001.mat', '0002.mat']
  for number in (1, 2):
    contents = scipy.io.loadmat(out / f'{number:04d}.mat')
    assert {'Idenoised', 'israw', 'eval_version'} <= set(contents)
    assert not contents['israw'].item() and contents['eval_version'].item() == '1.0'
    patches = contents['Idenoised'].reshape(-1)
    assert len(patches) == 3
    for k, patch in enumerate(patches):
      want = expected[f'{number:04d}_{k:02d}']
      assert patch.dtype == np.float32 and patch.shape == want.shape
      np.testing.assert_allclose(patch, want, atol=ARRAY_TOL, rtol=0)


# --- bad input: one line, exit status 2 ---


def _write_info(path, boxes_per_image):
  """A DND info.mat (HDF5): info/boundingboxes holds a reference per image to a 4 x K array."""
  with h5py.File(path, 'w') as handle:
    refs = handle.create_group('#refs#')
    table = handle.create_group('info').create_dataset('boundingboxes', (1, len(boxes_per_image)),
                                                       dtype=h5py.ref_dtype)
    for index, boxes in enumerate(boxes_per_image):
      table[0, index] = refs.create_dataset(f'b{index}', data=np.float64(boxes).T).ref


def test_bad_inputs_give_one_line_and_status_2(tmp_path, capsys, monkeypatch):
  weights = str(shared_fixture('protocols/denoise.pth'))
  sidd, dnd = shared_fixture('protocols/sidd'), shared_fixture('protocols/dnd')
  pairs = shared_fixture('protocols/pairs')
  blocks = np.zeros((1, 2, 16, 16, 3), np.uint8)

  def sidd_folder(name, noisy, gt):
    folder = tmp_path / name
    folder.mkdir()
    scipy.io.savemat(folder / 'ValidationNoisyBlocksSrgb.mat', noisy)
    scipy.io.savemat(folder / 'ValidationGtBlocksSrgb.mat', gt)
    return folder

  no_variable = sidd_folder('novar', {'ValidationNoisyBlocksSrgb': blocks}, {'blocks': blocks})
  wrong_rank = sidd_folder('rank', {'ValidationNoisyBlocksSrgb': blocks[0]},
                           {'ValidationGtBlocksSrgb': blocks[0]})
  wrong_dtype = sidd_folder('dtype', {'ValidationNoisyBlocksSrgb': blocks / 255.0},
                            {'ValidationGtBlocksSrgb': blocks})
  outside = tmp_path / 'dnd_outside'
  shutil.copytree(dnd / 'images_srgb', outside / 'images_srgb')
  _write_info(outside / 'info.mat', [[[1, 1, 64, 64]], [[100, 100, 400, 164]]])
  not_hdf5 = tmp_path / 'dnd_v5'
  shutil.copytree(dnd / 'images_srgb', not_hdf5 / 'images_srgb')
  scipy.io.savemat(not_hdf5 / 'info.mat', {'info': np.zeros(2)})
  partial = tmp_path / 'partial'
  partial.mkdir()
  shutil.copy(pairs / 'restored' / '00.png', partial / '00.png')
  unpaired = tmp_path / 'unpaired'
  shutil.copytree(pairs / 'target', unpaired / 'target')
  shutil.copytree(pairs / 'target', unpaired / 'input')
  shutil.copy(pairs / 'target' / '00.png', unpaired / 'input' / 'extra.png')

  cases = [
      (['--protocol', 'sidd', '--weights', weights, '--data',
        str(no_variable)], "no variable 'ValidationGtBlocksSrgb'"),
      (['--protocol', 'sidd', '--weights', weights, '--data',
        str(wrong_rank)], 'expected (N, M, H, W, 3)'),
      (['--protocol', 'sidd', '--weights', weights, '--data',
        str(wrong_dtype)], 'float64'),
      ([
          '--protocol', 'dnd', '--weights', weights, '--data',
          str(outside), '--output',
          str(tmp_path / 'o')
      ], 'box 1 of image 2'),
      ([
          '--protocol', 'dnd', '--weights', weights, '--data',
          str(not_hdf5), '--output',
          str(tmp_path / 'o')
      ], 'not an HDF5 file'),
      (['--protocol', 'gopro', '--results',
        str(partial), '--data',
        str(pairs)], '01'),
      (['--protocol', 'gopro', '--weights', weights, '--data',
        str(unpaired)], 'input/extra.png'),
      (['--protocol', 'psnr', '--results',
        str(partial), '--data',
        str(pairs)], "unknown protocol 'psnr'"),
      (['--protocol', 'sidd', '--results',
        str(tmp_path / 'nowhere.mat'), '--data',
        str(sidd)], 'nowhere.mat'),
      (['--protocol', 'gopro', '--data', str(pairs)], '--weights'),
      (['--protocol', 'gopro', '--results',
        str(partial),
        str(partial), '--data',
        str(pairs)], '2 --results for 1 --data'),
      ([
          '--protocol', 'gopro', '--weights', weights, '--data',
          str(pairs), '--output',
          str(tmp_path / 'o')
      ], '--save-images'),
      (['--protocol', 'dnd', '--results',
        str(partial), '--data', str(dnd)], 'no ground truth'),
  ]
  for argv, expected in cases:
    assert main(['evaluate', *argv]) == 2, argv
    line = _one_error_line(capsys)
    assert line.startswith('mprnet evaluate: error: ') and expected in line, (argv, line)
  assert not (tmp_path / 'o').exists()  # nothing written for a bad DND folder

  # Without OpenCV the RealBlur protocol names the extra that brings it.
  monkeypatch.setitem(sys.modules, 'cv2', None)
  assert main([
      'evaluate', '--protocol', 'realblur', '--results',
      str(pairs / 'restored'), '--data',
      str(pairs)
  ]) == 2
  assert "mprnet-jax[eval]" in _one_error_line(capsys)


def test_reports_never_replace_an_input(tmp_path, capsys):
  """--csv / --json onto an input image or onto the weights file: one line, nothing written."""
  weights = tmp_path / 'denoise.pth'
  shutil.copy(shared_fixture('protocols/denoise.pth'), weights)
  data = tmp_path / 'pairs'
  _noisy_pairs(data, count=1)
  target = data / 'target' / 'im0.png'
  before = {p: p.read_bytes() for p in (weights, target)}
  for flag, victim in (('--csv', target), ('--json', weights), ('--csv', weights)):
    assert main(['evaluate', '--weights',
                 str(weights), '--data',
                 str(data), flag,
                 str(victim)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'refusing to write over an input' in err, err
  assert {p: p.read_bytes() for p in before} == before

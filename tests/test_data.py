"""Data pipeline: sources, augmentations, grain loaders, shards, MixUp."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mprnet_jax import augment, data, shards, tfds_builder

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity


def _write_pair_folder(root, sizes, *, seed=0, ext='png'):
  """root/input, root/target with random images; target = input XOR 0x55 (known relation)."""
  rng = np.random.default_rng(seed)
  for sub in ('input', 'target'):
    os.makedirs(root / sub, exist_ok=True)
  for i, (h, w) in enumerate(sizes):
    inp = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(inp).save(root / 'input' / f'im{i:02d}.{ext}')
    Image.fromarray(inp ^ 0x55).save(root / 'target' / f'im{i:02d}.{ext}')
  return root


class _ArraySource:
  """In-memory pairs whose pixels encode (example, row, column), target = input + 7."""

  def __init__(self, n, size=12):
    yy, xx = np.mgrid[:size, :size]
    self.items = [
        np.stack([np.full_like(yy, i), yy * 4, xx * 4], -1).astype(np.uint8) for i in range(n)
    ]

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return {'input': self.items[i], 'target': self.items[i] + 7, 'name': str(i)}


# ---------------------------------------------------------------- paired folders


def test_paired_folder_matches_by_name(tmp_path):
  _write_pair_folder(tmp_path, [(10, 12), (9, 9), (16, 8)])
  source = data.PairedFolderSource(str(tmp_path), cache=True).preload()
  assert len(source) == 3 and source.names == ['im00.png', 'im01.png', 'im02.png']
  for i in range(3):
    ex = source[i]
    np.testing.assert_array_equal(ex['target'], ex['input'] ^ 0x55)
  assert source[1]['input'].shape == (9, 9, 3)


def test_paired_folder_errors(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    data.PairedFolderSource(str(tmp_path / 'nope'))
  os.makedirs(tmp_path / 'input')
  with pytest.raises(ValueError, match='no target/ subfolder'):
    data.PairedFolderSource(str(tmp_path))
  os.makedirs(tmp_path / 'target')
  with pytest.raises(ValueError, match='no images'):
    data.PairedFolderSource(str(tmp_path))
  _write_pair_folder(tmp_path, [(8, 8)] * 13)
  for i in range(12):
    os.rename(tmp_path / 'target' / f'im{i:02d}.png', tmp_path / 'target' / f'x{i:02d}.png')
  with pytest.raises(ValueError) as err:
    data.PairedFolderSource(str(tmp_path))
  message = str(err.value)
  assert '\n' not in message and message.startswith('24 images')
  assert 'input/im00.png' in message and message.endswith(', ...')
  assert message.count('.png') == 10


def test_paired_folder_size_mismatch(tmp_path):
  _write_pair_folder(tmp_path, [(8, 8), (8, 8)])
  Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / 'target' / 'im01.png')
  with pytest.raises(ValueError, match=r'im01\.png differs in size: input 8x8, target 6x8'):
    data.PairedFolderSource(str(tmp_path))


# ---------------------------------------------------------------- augmentations


def test_crops_are_aligned_and_padded():
  rng = np.random.default_rng(0)
  inp = rng.integers(0, 200, (20, 30, 3), dtype=np.uint8)
  seen = set()
  for _ in range(20):
    a, b = augment.random_crop_pair(inp, inp + 7, 8, rng)
    np.testing.assert_array_equal(b, a + 7)
    seen.add(a.tobytes())
  assert len(seen) > 10  # crops do move
  small = rng.integers(0, 200, (5, 6, 3), dtype=np.uint8)
  a, b = augment.random_crop_pair(small, small + 7, 8, rng)
  assert a.shape == (8, 8, 3)
  np.testing.assert_array_equal(b, a + 7)
  padded = augment.pad_to_patch(small, 8)
  np.testing.assert_array_equal(padded[:5, :6], small)
  np.testing.assert_array_equal(padded[5, :6], small[3])  # reflect: the edge row is not repeated


def test_geometric_transforms_distinct_and_shared():
  image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
  outs = [augment.geometric(image, m) for m in range(8)]
  assert len({o.tobytes() for o in outs}) == 8
  np.testing.assert_array_equal(outs[3], np.rot90(image))
  np.testing.assert_array_equal(outs[6], np.rot90(np.flipud(image)))
  for seed in range(8):  # the full training augmentation transforms both alike
    a, b = augment.train_pair(image, image + 7, 4, np.random.default_rng(seed), saturation=0.0)
    np.testing.assert_allclose(b - a, 7 / 255, atol=1e-6)


def test_saturation_applied_alike_to_both():
  # Saturation is linear and keeps constants (luma weights sum to 1), so away from the
  # clipping bounds target = input + 7 survives iff both got the same factor.
  image = np.random.default_rng(0).integers(60, 180, (6, 6, 3), dtype=np.uint8)
  changed = 0
  for seed in range(30):
    a, b = augment.train_pair(image, image + 7, 6, np.random.default_rng(seed), saturation=0.2)
    np.testing.assert_allclose(b - a, 7 / 255, atol=1e-5)
    plain = augment.train_pair(image, image + 7, 6, np.random.default_rng(seed))[0]
    changed += not np.allclose(a, plain)
  assert 3 < changed < 20  # one time in three


def test_saturation_blends_with_luma():
  rng = np.random.default_rng(1)
  image = rng.random((4, 4, 3), dtype=np.float32) * 0.5 + 0.25
  gray = image @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(augment.adjust_saturation(image, 1.0), image, atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(image, 0.0),
                             np.repeat(gray[..., None], 3, -1), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(image, 1.2),
                             np.clip(1.2 * image - 0.2 * gray[..., None], 0, 1), atol=1e-6)


def test_center_crop_and_multiple_of_8():
  image = np.arange(10 * 13 * 1, dtype=np.uint8).reshape(10, 13, 1)
  np.testing.assert_array_equal(augment.center_crop(image, 4), image[3:7, 4:8])  # round(4.5)=4
  assert augment.crop_to_multiple(np.zeros((21, 17, 3))).shape == (16, 16, 3)


# ---------------------------------------------------------------- MixUp


def test_mixup_convex_and_shared_weights():
  key = jax.random.key(0)
  inputs = jax.random.uniform(key, (6, 3, 3, 3))
  targets = 2.0 * inputs + 1.0  # affine relation survives mixing iff lam, perm are shared
  mixed_in, mixed_tgt = jax.jit(augment.mixup)(jax.random.key(1), inputs, targets)
  assert mixed_in.shape == inputs.shape and mixed_in.dtype == inputs.dtype
  np.testing.assert_allclose(mixed_tgt, 2.0 * mixed_in + 1.0, rtol=1e-5, atol=1e-5)
  # Constant images make each output a convex combination of two known values.
  consts = jnp.arange(6.0)[:, None, None, None] * jnp.ones((6, 3, 3, 3))
  out, _ = augment.mixup(jax.random.key(2), consts, consts)
  assert jnp.all(out >= 0) and jnp.all(out <= 5)
  assert jnp.all(out == out[:, :1, :1, :1])  # one lam per example, shape (B, 1, 1, 1)
  assert not np.allclose(out, consts)


# ---------------------------------------------------------------- loaders


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    for key in ('input', 'target'):
      np.testing.assert_array_equal(a[key], b[key])


def test_loader_batches_deterministic_and_aligned():
  source = _ArraySource(10)
  # 'plain': saturation clips the dark pixels of this source, breaking target = input + 7.
  make = lambda seed: iter(
      data.make_train_loader(source, batch_size=4, patch_size=8, seed=seed, augment='plain'))
  first, again, other = _take(make(0), 4), _take(make(0), 4), _take(make(1), 4)
  _assert_same(first, again)
  assert not np.array_equal(first[0]['input'], other[0]['input'])
  for batch in first:
    assert batch['input'].shape == (4, 8, 8, 3) and batch['input'].dtype == np.float32
    assert set(batch) == {'input', 'target'}
    np.testing.assert_allclose(batch['target'] - batch['input'], 7 / 255, atol=1e-6)


def test_loader_state_restore():
  source = _ArraySource(10)
  loader = data.make_train_loader(source, batch_size=3, patch_size=8, seed=5)
  iterator = iter(loader)
  _take(iterator, 5)
  state = data.loader_state(iterator)
  expected = _take(iterator, 3)
  restored = data.restore_loader(iter(loader), state)
  _assert_same(expected, _take(restored, 3))


def test_loader_shards_disjoint_and_cover_one_epoch():
  source = _ArraySource(12)

  def epoch_ids(index):
    loader = data.make_train_loader(source, batch_size=2, patch_size=12, seed=0, shard_index=index,
                                    shard_count=2, num_epochs=1, augment='plain')
    # Channel 0 of every pixel is the example number (flips and crops keep it).
    return [int(round(b['input'][j, 0, 0, 0] * 255)) for b in loader for j in range(2)]

  a, b = epoch_ids(0), epoch_ids(1)
  assert len(a) == len(b) == 6 and not set(a) & set(b) and set(a) | set(b) == set(range(12))


@pytest.fixture(scope='module')
def worker_run():
  """A loader with two worker processes, read for 5 + 3 batches with its state saved after
  the fifth: both worker tests read this one run (each start of the workers is a few seconds
  of imports per worker)."""
  source = _ArraySource(8)
  make = lambda workers: data.make_train_loader(source, batch_size=2, patch_size=8, seed=4,
                                                num_workers=workers)
  loader = make(2)
  iterator = iter(loader)
  first = _take(iterator, 5)
  state = data.loader_state(iterator)
  rest = _take(iterator, 3)
  iterator.close()
  return make, loader, first + rest, state


def test_loader_workers_match_in_process(worker_run):
  make, _, with_workers, _ = worker_run
  _assert_same(_take(iter(make(0)), len(with_workers)), with_workers)


def test_loader_state_restore_with_workers(worker_run):
  _, loader, batches, state = worker_run
  restored = data.restore_loader(iter(loader), state)  # fresh workers, moved to the saved state
  _assert_same(batches[5:], _take(restored, 3))
  restored.close()


def test_eval_batches():
  source = _ArraySource(5, size=13)
  crops = data.make_eval_batches(source, 8, batch_size=2)
  assert [b['input'].shape[0] for b in crops] == [2, 2, 1]
  assert crops[0]['name'] == ['0', '1']
  np.testing.assert_array_equal(crops[1]['input'][0],
                                augment.to_float(augment.center_crop(source[2]['input'], 8)))
  full = data.make_eval_batches(source, None)
  assert len(full) == 5 and full[0]['input'].shape == (1, 8, 8, 3)


# ---------------------------------------------------------------- synthetic and shards


def test_synthetic_noise_sigma_and_determinism():
  gray = {'gray': np.full((64, 64, 3), 128, np.uint8)}
  source = data.SyntheticSource(gray, 'noise', seed=0, noise_sigma=(20.0, 20.0))
  ex = source[0]
  residual = ex['input'].astype(np.float64) - ex['target']
  assert abs(residual.mean()) < 1.0 and abs(residual.std() - 20.0) < 1.0
  np.testing.assert_array_equal(ex['input'], source[0]['input'])
  other = data.SyntheticSource(gray, 'noise', seed=1, noise_sigma=(20.0, 20.0))
  assert not np.array_equal(ex['input'], other[0]['input'])


def test_synthetic_blurs_on_bundled_photos():
  train, val = data.bundled_photo_split()
  assert set(val) == set(data.VALIDATION_PHOTOS) and not set(train) & set(val)
  assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
             for im in list(train.values()) + list(val.values()))
  small = {k: v[:96, :96] for k, v in train.items()}
  for kind in ('gaussian_blur', 'motion_blur', 'mixed'):
    source = data.SyntheticSource(small, kind, seed=0, variants=2)
    assert len(source) == 2 * len(small)
    ex = source[1]
    assert ex['input'].shape == ex['target'].shape and ex['input'].dtype == np.uint8
    if kind != 'mixed':  # blur smooths: less high-frequency energy than the clean photo
      grad = lambda im: np.abs(np.diff(im.astype(np.float64), axis=1)).mean()
      assert grad(ex['input']) < grad(ex['target'])
  kernel = data.motion_kernel(9, 0.0)
  assert kernel.shape == (9, 9) and np.isclose(kernel.sum(), 1) and kernel[4].sum() == 1


def test_shards_round_trip(tmp_path):
  _write_pair_folder(tmp_path / 'set', [(10, 12), (9, 9), (16, 8), (7, 11), (8, 8)])
  source = data.PairedFolderSource(str(tmp_path / 'set'))
  paths = shards.write_shards(source, str(tmp_path / 'shards'), num_shards=2)
  assert len(paths) == 2 and all(os.path.exists(p) for p in paths)
  read = data.ShardSource(str(tmp_path / 'shards'))
  assert len(read) == len(source)
  for i in range(len(source)):
    a, b = source[i], read[i]
    assert a['name'] == b['name']
    for key in ('input', 'target'):
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
      np.testing.assert_array_equal(a[key], b[key])
  loader = data.make_train_loader(read, batch_size=2, patch_size=8, seed=0)
  assert next(iter(loader))['input'].shape == (2, 8, 8, 3)


def test_tfds_builder_round_trip_without_tensorflow(tmp_path):
  import tensorflow_datasets  # noqa: F401  (the 'tfds' extra; CI installs it: never skipped)
  import sys
  _write_pair_folder(tmp_path / 'set', [(10, 12), (9, 9), (7, 11)])
  reference = data.PairedFolderSource(str(tmp_path / 'set'))
  builder = tfds_builder.PairedFolderBuilder(splits={'train': str(tmp_path / 'set')},
                                             data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare()
  read = tfds_builder.TfdsSource('paired_folder_builder', 'train', str(tmp_path / 'tfds'))
  assert len(read) == len(reference)
  for i in range(len(read)):
    got = read[i]
    want = reference[reference.names.index(got['name'])]
    for key in ('input', 'target'):
      np.testing.assert_array_equal(got[key], want[key])
  assert 'tensorflow' not in sys.modules

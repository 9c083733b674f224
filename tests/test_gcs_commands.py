"""`mprnet convert / export / restore / evaluate` and the library calls behind them with
`gs://` paths, against a real GCS emulator: each writes the same bytes as with local paths,
refuses to write over an input, and answers a missing bucket, a missing object or an
unreachable service with one line and no object left behind."""

import json
import shutil
import socket
import time
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import FIXTURES, shared_fixture
from mprnet_jax import storage
from mprnet_jax.cli import main
from mprnet_jax.conversion import from_pytorch, to_pytorch_state_dict, unwrap_state_dict
from mprnet_jax.errors import CheckpointError
from mprnet_jax.inference import Restorer, restore_files
from mprnet_jax.torch_format import load_pth
from mprnet_jax.weights import export_weights, load_model, save_weights

# Only our own code's outputs are compared with each other, so XLA's optimisations do not matter.
pytestmark = pytest.mark.usefixtures('fast_compile')

TINY = FIXTURES / 'tiny.pth'
NO_BUCKET = 'gs://no-such-bucket-mprnet'


def _write_inputs(root):
  """Photos cut from a real photograph, all padded to one 64x64 shape (one compile for every
  restoration in this module), and a paired dataset of them."""
  photo = skimage.data.astronaut()
  rng = np.random.default_rng(0)
  crops = [photo[100 + 30 * i:160 + 30 * i, 150:210] for i in range(3)]  # 60x60
  noisy = [np.clip(c + rng.normal(0, 12, c.shape), 0, 255).astype(np.uint8) for c in crops]
  (root / 'photos').mkdir(parents=True)
  for i, image in enumerate(noisy[:2]):
    Image.fromarray(image).save(root / 'photos' / f'p{i}.png')
  Image.fromarray(noisy[2]).save(root / 'one.png')
  for sub in ('input', 'target'):
    (root / 'pairs' / sub).mkdir(parents=True)
  for i in range(2):
    Image.fromarray(noisy[i]).save(root / 'pairs' / 'input' / f'im{i}.png')
    Image.fromarray(crops[i]).save(root / 'pairs' / 'target' / f'im{i}.png')
  shutil.copy(TINY, root / 'tiny.pth')
  (root / 'notes.pth').write_text('not a checkpoint')
  shutil.copytree(shared_fixture('protocols/sidd'), root / 'sidd')


@pytest.fixture(scope='module')
def gcs(gcs_emulator, tmp_path_factory):
  """One bucket holding the inputs under `in/` (and the same files locally under `local`),
  and a staging cache of this module's own."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(storage.STAGE_DIR_ENV, str(tmp_path_factory.mktemp('stage')))
    local = tmp_path_factory.mktemp('inputs')
    _write_inputs(local)
    bucket = gcs_emulator.make_bucket(f'commands{time.time_ns()}')
    storage.upload(local, f'{bucket}/in')
    yield SimpleNamespace(bucket=bucket, local=local)


def _fs():
  fs = fsspec.filesystem('gs')
  fs.invalidate_cache()
  return fs


def _bytes(url: str) -> bytes:
  return _fs().cat_file(url)


def _same_weights(a: bytes, b: bytes) -> bool:
  """Equal weight files: safetensors writes its metadata in a random order (a Rust HashMap), so
  the headers are compared as JSON and everything after them byte for byte."""
  size_a, size_b = (int.from_bytes(x[:8], 'little') for x in (a, b))
  return (json.loads(a[8:8 + size_a]) == json.loads(b[8:8 + size_b]) and
          a[8 + size_a:] == b[8 + size_b:])


def _objects(bucket: str) -> set[str]:
  return set(_fs().find(bucket))


def _one_error(capsys, command: str) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('mprnet ')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert lines[0].startswith(f'mprnet {command}: error: ')
  return lines[0]


def test_convert_and_export_write_what_local_paths_get(gcs, tmp_path, capsys):
  b = gcs.bucket
  assert main(['convert', str(TINY), str(tmp_path / 'tiny.safetensors')]) == 0
  assert main([
      'convert', f'{b}/in/tiny.pth', f'{b}/w/tiny.safetensors', '--reference', f'{b}/in/missing.npz'
  ]) == 2
  assert 'no such object' in _one_error(capsys, 'convert')
  assert not storage.exists(f'{b}/w/tiny.safetensors')  # failed before converting
  assert main(['convert', f'{b}/in/tiny.pth', f'{b}/w/tiny.safetensors']) == 0
  assert f'wrote {b}/w/tiny.safetensors' in capsys.readouterr().out
  assert _same_weights(_bytes(f'{b}/w/tiny.safetensors'),
                       (tmp_path / 'tiny.safetensors').read_bytes())
  # Exported to .safetensors, weights without a task are what convert wrote.
  assert main(['export', str(tmp_path / 'tiny.safetensors'), str(tmp_path / 'e.pth')]) == 0
  for name, expected in (('e.pth', 'e.pth'), ('e.safetensors', 'tiny.safetensors')):
    assert main(['export', f'{b}/w/tiny.safetensors', f'{b}/w/{name}']) == 0
    remote, here = _bytes(f'{b}/w/{name}'), (tmp_path / expected).read_bytes()
    assert remote == here if name.endswith('.pth') else _same_weights(remote, here), name
  # An existing object needs --overwrite, and an input is never written over, also when spelt
  # another way (gcs:// is gs://).
  assert main(['convert', f'{b}/in/tiny.pth', f'{b}/w/tiny.safetensors']) == 2
  assert 'already exists (use --overwrite' in _one_error(capsys, 'convert')
  same = 'gcs://' + b[len('gs://'):] + '/w/tiny.safetensors'
  assert main(['export', f'{b}/w/tiny.safetensors', same, '--overwrite']) == 2
  assert 'refusing to write over an input' in _one_error(capsys, 'export')


def test_library_calls_take_urls(gcs, tmp_path):
  b = gcs.bucket
  model = from_pytorch(f'{b}/in/tiny.pth')
  expected = unwrap_state_dict(load_pth(TINY))  # what the model holds, bit for bit
  assert save_weights(model, f'{b}/lib/w.safetensors') == f'{b}/lib/w.safetensors'
  assert export_weights(model, f'{b}/lib/w.pth') == f'{b}/lib/w.pth'
  for url in (f'{b}/lib/w.safetensors', f'{b}/lib/w.pth'):
    loaded = load_model(url)
    back = to_pytorch_state_dict(loaded)
    assert all(np.array_equal(back[k], expected[k]) for k in expected), url
  with pytest.raises(FileExistsError, match='already exists'):
    save_weights(model, f'{b}/lib/w.safetensors')
  # Errors name the URL, not the staged copy the reader saw.
  with pytest.raises(CheckpointError, match=f'^{b}/in/notes.pth: '):
    load_model(f'{b}/in/notes.pth')
  restorer = Restorer(loaded)
  written = restore_files(restorer, [f'{b}/in/one.png'], f'{b}/lib/restored', progress=False)
  assert written == [f'{b}/lib/restored/one.png']
  restore_files(restorer, [gcs.local / 'one.png'], tmp_path, progress=False)
  assert _bytes(written[0]) == (tmp_path / 'one.png').read_bytes()


def test_restore_writes_what_local_paths_get(gcs, tmp_path, capsys):
  b, local = gcs.bucket, gcs.local
  assert main([
      'restore', '--weights',
      str(TINY),
      str(local / 'photos'),
      str(local / 'one.png'), '--output',
      str(tmp_path / 'out')
  ]) == 0
  assert main([
      'restore', '--weights', f'{b}/in/tiny.pth', f'{b}/in/photos/', f'{b}/in/one.png', '--output',
      f'{b}/restored'
  ]) == 0
  assert f'restored 3 image(s) into {b}/restored' in capsys.readouterr().out
  for name in ('p0.png', 'p1.png', 'one.png'):
    assert _bytes(f'{b}/restored/{name}') == (tmp_path / 'out' / name).read_bytes(), name
  before = _objects(b)
  assert main(['restore', '--weights',
               str(TINY), f'{b}/in/photos', '--output', f'{b}/in/photos']) == 2
  assert 'would overwrite an input' in _one_error(capsys, 'restore')
  assert _objects(b) == before


def test_evaluate_writes_what_local_paths_get(gcs, tmp_path, capsys):
  b, local = gcs.bucket, gcs.local
  reports = {}
  for where, data, weights, out in [('local', str(local / 'pairs'), str(TINY), str(tmp_path)),
                                    ('bucket', f'{b}/in/pairs', f'{b}/in/tiny.pth', f'{b}/ev')]:
    # The CSV goes where it has always gone by default, into the dataset folder, also for a URL.
    assert main([
        'evaluate', '--weights', weights, '--data', data, '--save-images', f'{out}/saved', '--json',
        f'{out}/m.json'
    ]) == 0
    reports[where] = capsys.readouterr().out
  assert reports['bucket'].startswith(f'{b}/in/pairs: 2 images: PSNR')
  first_line = {where: report.splitlines()[0].split(': ', 1)[1] for where, report in reports.items()}
  assert first_line['bucket'] == first_line['local']
  assert reports['bucket'].splitlines()[1:] == [
      f'per image: {b}/in/pairs/mprnet_metrics.csv', f'JSON: {b}/ev/m.json'
  ]
  local_csv = (local / 'pairs' / 'mprnet_metrics.csv').read_bytes()
  assert _bytes(f'{b}/in/pairs/mprnet_metrics.csv') == local_csv
  remote_json = json.loads(_bytes(f'{b}/ev/m.json'))
  local_json = json.loads((tmp_path / 'm.json').read_text())
  assert remote_json['dataset'] == f'{b}/in/pairs'  # named as given, not the staged copy
  assert {**remote_json, 'dataset': None} == {**local_json, 'dataset': None}
  for name in ('im0.png', 'im1.png'):
    assert _bytes(f'{b}/ev/saved/{name}') == (tmp_path / 'saved' / name).read_bytes()
  # The saved restorations score the same from the bucket in results mode.
  assert main([
      'evaluate', '--results', f'{b}/ev/saved', '--data', f'{b}/in/pairs', '--json',
      f'{b}/ev/r.json'
  ]) == 0
  assert json.loads(_bytes(f'{b}/ev/r.json'))['per_image'] == remote_json['per_image']
  # SIDD: the .mat files staged, Idenoised.mat written into an output folder URL; one block
  # per call is the same 64x64 shape as the photos above.
  assert main([
      'evaluate', '--protocol', 'sidd', '--weights', f'{b}/in/tiny.pth', '--data', f'{b}/in/sidd',
      '--output', f'{b}/sidd_out', '--batch', '1'
  ]) == 0
  assert main([
      'evaluate', '--protocol', 'sidd', '--results', f'{b}/sidd_out/Idenoised.mat', '--data',
      f'{b}/in/sidd', '--json', f'{b}/sidd_out/r.json'
  ]) == 0
  assert json.loads(_bytes(f'{b}/sidd_out/r.json'))['images'] == 6
  before = _objects(b)
  assert main([
      'evaluate', '--weights',
      str(TINY), '--data', f'{b}/in/pairs', '--save-images', f'{b}/in/pairs/input'
  ]) == 2
  assert 'would overwrite the dataset' in _one_error(capsys, 'evaluate')
  assert main([
      'evaluate', '--results', f'{b}/ev/saved', '--data', f'{b}/in/pairs', '--json',
      f'{b}/ev/saved/im0.png'
  ]) == 2
  assert 'refusing to write over an input' in _one_error(capsys, 'evaluate')
  assert _objects(b) == before


def test_failure_midway_uploads_nothing(gcs, tmp_path, capsys):
  """A dataset whose second pair does not match fails after the first restoration was saved:
  the saved folder and the reports are only local until the end, so nothing reaches the
  bucket."""
  pairs = tmp_path / 'pairs'
  shutil.copytree(gcs.local / 'pairs', pairs)
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(pairs / 'target' / 'im1.png')
  before = _objects(gcs.bucket)
  assert main([
      'evaluate', '--weights',
      str(TINY), '--data',
      str(pairs), '--save-images', f'{gcs.bucket}/half', '--json', f'{gcs.bucket}/half.json'
  ]) == 2
  assert 'im1.png is 40x40' in _one_error(capsys, 'evaluate')
  assert _objects(gcs.bucket) == before


def test_missing_bucket_or_object_is_one_line(gcs, tmp_path, capsys):
  b, local = gcs.bucket, gcs.local
  photo = str(local / 'one.png')
  cases = [
      (['convert', f'{NO_BUCKET}/tiny.pth',
        str(tmp_path / 'x.safetensors')], f'bucket {NO_BUCKET} does not exist'),
      (['convert', str(TINY), f'{NO_BUCKET}/x.safetensors'], f'bucket {NO_BUCKET} does not exist'),
      (['convert', f'{b}/in/missing.pth',
        f'{b}/out/x.safetensors'], f'{b}/in/missing.pth: no such object'),
      (['convert', f'{b}/in/notes.pth', f'{b}/out/x.safetensors'], f'{b}/in/notes.pth: '),
      (['export', f'{b}/in/missing.safetensors', f'{b}/out/x.pth'], 'no such object'),
      (['export', str(TINY), f'{NO_BUCKET}/x.pth'], 'does not exist'),
      (['export', f'{NO_BUCKET}/w.safetensors',
        str(tmp_path / 'x.pth')], f'bucket {NO_BUCKET} does not exist'),
      (['restore', '--weights',
        str(TINY), f'{b}/in/nothing', '--output', f'{b}/out/r'], 'no such object or folder'),
      (['restore', '--weights',
        str(TINY), photo, '--output', f'{NO_BUCKET}/r'], 'does not exist'),
      (['restore', '--weights', f'{b}/in/missing.pth', photo, '--output',
        f'{b}/out/r'], 'no such object'),
      (['evaluate', '--weights', str(TINY), '--data',
        f'{b}/in/missing'], f'{b}/in/missing: no such object'),
      (['evaluate', '--weights', str(TINY), '--data',
        f'{b}/in/photos'], f'{b}/in/photos has no input/'),
      ([
          'evaluate', '--weights',
          str(TINY), '--data',
          str(local / 'pairs'), '--json', f'{NO_BUCKET}/m.json'
      ], 'does not exist'),
  ]
  before = _objects(b)
  for argv, expected in cases:
    assert main(argv) == 2, argv
    line = _one_error(capsys, argv[0])
    assert expected in line, (argv, line)
  assert _objects(b) == before
  assert not list(tmp_path.iterdir())


def test_unreachable_storage_is_one_line(gcs, tmp_path, capsys, monkeypatch):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # closed again: nothing listens there
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{port}')
  b, photo = gcs.bucket, str(gcs.local / 'one.png')
  start = time.time()
  for argv in (['convert', f'{b}/in/tiny.pth',
                str(tmp_path / 'x.safetensors')], ['export', str(TINY), f'{b}/out/x.pth'],
               ['restore', '--weights',
                str(TINY), photo, '--output',
                f'{b}/out/r'], ['evaluate', '--weights',
                                str(TINY), '--data', f'{b}/in/pairs']):
    assert main(argv) == 2, argv
    assert 'cannot reach the emulator at STORAGE_EMULATOR_HOST' in _one_error(capsys, argv[0])
  assert time.time() - start < 20
  assert not list(tmp_path.iterdir())

"""`mprnet_jax.storage` against a real GCS emulator: staging with reuse, uploads, and the
one-line errors for a missing bucket, a missing object and an unreachable service."""

import time

import pytest

from mprnet_jax import storage
from mprnet_jax.errors import StorageError


@pytest.fixture
def bucket(gcs_emulator, tmp_path, monkeypatch):
  monkeypatch.setenv(storage.STAGE_DIR_ENV, str(tmp_path / 'stage'))
  return gcs_emulator.make_bucket(f'b{time.time_ns()}')


def test_local_paths_pass_through(tmp_path):
  assert not storage.is_remote(tmp_path) and not storage.is_remote('file:///x')
  assert storage.is_remote('gs://b/x') and storage.is_remote('s3://b/x')
  assert storage.stage_in(tmp_path / 'a.png') == tmp_path / 'a.png'
  with storage.local_output(tmp_path / 'o.txt') as out:
    assert out == tmp_path / 'o.txt'


def test_stage_folder_then_reuse_then_refresh(bucket, tmp_path):
  src = tmp_path / 'src'
  (src / 'sub').mkdir(parents=True)
  (src / 'a.txt').write_text('a')
  (src / 'sub' / 'b.txt').write_text('bb')
  storage.upload(src, f'{bucket}/data')
  local = storage.stage_in(f'{bucket}/data', 'dataset folder')
  assert (local / 'a.txt').read_text() == 'a' and (local / 'sub' / 'b.txt').read_text() == 'bb'
  assert local.is_relative_to(tmp_path / 'stage')
  # Unchanged objects are not downloaded again: a local edit survives a second staging...
  (local / 'a.txt').write_text('local edit')
  assert storage.stage_in(f'{bucket}/data') == local
  assert (local / 'a.txt').read_text() == 'local edit'
  # ...while a new generation of the object replaces the staged copy.
  storage.write_text(f'{bucket}/data/a.txt', 'new')
  storage.stage_in(f'{bucket}/data')
  assert (local / 'a.txt').read_text() == 'new'
  assert not [p for p in local.rglob('*') if 'partial' in p.name]


def test_output_uploads_only_when_complete(bucket):
  with storage.local_output(f'{bucket}/out/w.npz') as out:
    assert out.suffix == '.npz'
    out.write_bytes(b'weights')
  assert storage.read_text(f'{bucket}/out/w.npz') == 'weights'
  with pytest.raises(RuntimeError), storage.local_output(f'{bucket}/out/x.npz') as out:
    out.write_bytes(b'half')
    raise RuntimeError('interrupted')
  assert not storage.exists(f'{bucket}/out/x.npz')


def test_missing_bucket_and_object_are_one_line(bucket):
  with pytest.raises(StorageError, match=r'bucket gs://no-such-bucket-x does not exist'):
    storage.stage_in('gs://no-such-bucket-x/weights.npz')
  with pytest.raises(StorageError, match=r'no such object'):
    storage.stage_in(f'{bucket}/missing.npz')
  with pytest.raises(StorageError, match=r'bucket gs://no-such-bucket-x does not exist'):
    with storage.local_output('gs://no-such-bucket-x/out.npz'):
      pass


def test_unreachable_emulator_fails_fast(monkeypatch):
  with __import__('socket').socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # closed again: nothing listens there
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{port}')
  start = time.time()
  with pytest.raises(StorageError, match='cannot reach the emulator at STORAGE_EMULATOR_HOST'):
    storage.stage_in('gs://b/weights.npz')
  assert time.time() - start < 10


def test_no_credentials_is_one_line(monkeypatch, tmp_path):
  monkeypatch.delenv('STORAGE_EMULATOR_HOST', raising=False)
  monkeypatch.delenv('GOOGLE_APPLICATION_CREDENTIALS', raising=False)
  monkeypatch.setenv('NO_GCE_CHECK', 'True')  # no metadata server to ask
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path))  # no gcloud credentials either
  monkeypatch.setattr(storage, '_checked_endpoints', set())
  monkeypatch.setattr(storage.socket, 'create_connection', lambda *a, **k: _Closed())
  with pytest.raises(StorageError, match='no Google Cloud credentials'):
    storage.stage_in('gs://b/weights.npz')


class _Closed:

  def close(self):
    pass

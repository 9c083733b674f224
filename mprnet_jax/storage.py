"""Files in a bucket: `gs://...` (or any fsspec URL, `s3://` included) wherever a path is taken.

Three ways a URL is used, each chosen for what reads or writes it:
- Orbax checkpoints and `config.json` go straight to the bucket (orbax writes through
  tensorstore, which speaks GCS itself; every process of a multi-host run writes its part).
- Inputs that a reader cannot stream (array_record shards, image folders, weight files,
  evaluation data) are *staged*: copied once into a per-host cache (`MPRNET_STAGE_DIR`, default
  `~/.cache/mprnet_jax/staged`) with a progress bar, and reused while the object's size and
  generation are unchanged, so a resumed run downloads nothing.
- Outputs (weight files, restored images, reports, training logs) are written to a local file
  first and uploaded when complete; an object appears in the bucket whole or not at all.

Local paths never come through here except to be returned as they are, so the local path costs
nothing. Emulators are reached through `STORAGE_EMULATOR_HOST` (gcsfs and the Google clients
read it); `configure_emulator()` points tensorstore's GCS driver at the same host.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from mprnet_jax.errors import MprnetError, StorageError

__all__ = [
    'is_remote', 'join', 'stage_root', 'stage_in', 'local_output', 'local_output_dir', 'upload',
    'exists', 'read_text', 'write_text', 'check_reachable', 'configure_emulator', 'is_dir',
    'normalize', 'check_output', 'display_name', 'urls_in_errors', 'remove_tree', 'require_bucket',
    'create_exclusive', 'remove', 'age_s', 'list_names', 'move_tree', 'write_bytes'
]

_URL = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')
STAGE_DIR_ENV = 'MPRNET_STAGE_DIR'


def is_remote(path) -> bool:
  """Whether `path` is a URL with a scheme other than file:// (a bucket, not this disk)."""
  if not isinstance(path, (str, os.PathLike)):
    return False
  match = _URL.match(os.fspath(path))
  return bool(match) and match.group(1).lower() != 'file'


def join(base, *parts: str) -> str:
  """`base/part/...` for a URL or a local path (a string either way)."""
  if is_remote(base):
    return '/'.join([os.fspath(base).rstrip('/'), *(p.strip('/') for p in parts)])
  return os.path.join(os.fspath(base), *parts)


def stage_root() -> Path:
  return Path(os.environ.get(STAGE_DIR_ENV) or Path.home() / '.cache' / 'mprnet_jax' / 'staged')


def configure_emulator() -> None:
  """With `STORAGE_EMULATOR_HOST` set, points tensorstore (orbax's array writer) at it too, with
  the test token tensorstore takes instead of real credentials. Does nothing otherwise."""
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  if not host:
    return
  if not _URL.match(host):
    host = f'http://{host}'
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', host)
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')


def _split(url: str) -> tuple[str, str, str]:
  """(scheme, bucket, key) of `scheme://bucket/key`."""
  parsed = urllib.parse.urlsplit(url)
  return parsed.scheme.lower(), parsed.netloc, parsed.path.lstrip('/')


_checked_endpoints: set[str] = set()


def check_reachable(url: str) -> None:
  """One line, quickly, when the storage behind `url` cannot be used at all: no emulator at
  `STORAGE_EMULATOR_HOST`, no network to the service, no credentials. (Otherwise the clients
  retry for about half a minute and end with a traceback.)"""
  scheme, _, _ = _split(url)
  if scheme not in ('gs', 'gcs'):
    return
  configure_emulator()
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  endpoint = emulator or 'https://storage.googleapis.com'
  if endpoint in _checked_endpoints:
    return
  parsed = urllib.parse.urlsplit(endpoint if _URL.match(endpoint) else f'http://{endpoint}')
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=5).close()
  except OSError as exc:
    where = f'the emulator at STORAGE_EMULATOR_HOST={emulator}' if emulator else endpoint
    raise StorageError(f'{url}: cannot reach {where} ({exc.strerror or exc})') from None
  if not emulator:
    import google.auth  # gcsfs's own dependency; only needed for the real service
    try:
      google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
      raise StorageError(f'{url}: no Google Cloud credentials (run `gcloud auth application-'
                         'default login`, or set GOOGLE_APPLICATION_CREDENTIALS)') from None
  _checked_endpoints.add(endpoint)


def _filesystem(url: str):
  """(fsspec filesystem, path within it) for `url`, after `check_reachable`."""
  import fsspec  # imported here: the local path never needs it

  check_reachable(url)
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    # Without credentials gcsfs warns, once per request, that it cannot ask for a bucket's
    # layout; harmless against an emulator, and it would bury the command's own output.
    logging.getLogger('gcsfs').setLevel(logging.ERROR)
  try:
    return fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as exc:
    raise StorageError(f'{url}: no filesystem for this URL ({exc})') from None


def _missing(url: str, fs) -> StorageError:
  """The one-line error for an object that is not there, naming a missing bucket as such."""
  scheme, bucket, _ = _split(url)
  with contextlib.suppress(Exception):
    if not fs.exists(bucket):
      return StorageError(f'{url}: bucket {scheme}://{bucket} does not exist')
  return StorageError(f'{url}: no such object or folder')


def exists(url) -> bool:
  if not is_remote(url):
    return os.path.exists(url)
  fs, path = _filesystem(os.fspath(url))
  return fs.exists(path)


def is_dir(url) -> bool:
  """Whether `url` is a folder (for a URL: a prefix with objects under it, or a bucket)."""
  if not is_remote(url):
    return os.path.isdir(url)
  fs, path = _filesystem(os.fspath(url))
  return fs.isdir(path)


def normalize(url) -> str:
  """One spelling of a URL, to tell whether two name the same object: `gcs://` as `gs://`,
  repeated slashes, `.` components and a trailing slash removed."""
  scheme, bucket, key = _split(os.fspath(url))
  scheme = {'gcs': 'gs'}.get(scheme, scheme)
  parts = [part for part in key.split('/') if part not in ('', '.')]
  return '/'.join([f'{scheme}://{bucket}', *parts])


def check_output(url) -> None:
  """For an output URL: StorageError now, before any work, if the storage cannot be reached or
  the bucket does not exist (`local_output` checks the same on entry). Nothing for a local path."""
  if is_remote(url):
    require_bucket(url)


def display_name(text: str) -> str:
  """`text` with each staged copy's path (`<stage root>/<scheme>/<bucket>/...`) written as the
  URL it was staged from, so that messages name what the user gave."""
  root = os.fspath(stage_root())
  if root not in text:
    return text
  return re.sub(re.escape(root) + r'/([^/\s]+)/([^/\s]+)', r'\1://\2', text)


@contextlib.contextmanager
def urls_in_errors() -> Iterator[None]:
  """User errors (MprnetError, OSError) raised in the block name URLs instead of the staged
  copies that the code inside read (see `display_name`); other exceptions pass untouched."""
  try:
    yield
  except (MprnetError, OSError) as exc:
    exc.args = tuple(display_name(a) if isinstance(a, str) else a for a in exc.args)
    if isinstance(exc, OSError):
      for attribute in ('filename', 'filename2'):
        if isinstance(getattr(exc, attribute), str):
          setattr(exc, attribute, display_name(getattr(exc, attribute)))
    raise


def read_text(url) -> str:
  if not is_remote(url):
    return Path(url).read_text()
  fs, path = _filesystem(os.fspath(url))
  try:
    return fs.cat_file(path).decode()
  except FileNotFoundError:
    raise _missing(os.fspath(url), fs) from None


def write_text(url, text: str) -> None:
  """Writes a small text file whole (an object is replaced in one request)."""
  if not is_remote(url):
    Path(url).write_text(text)
    return
  write_bytes(os.fspath(url), text.encode())


# --- staging: bucket -> this host ------------------------------------------------------------


def _stamp(info: dict) -> list:
  """What identifies one version of an object: its size and generation (or etag/mtime)."""
  version = info.get('generation') or info.get('etag') or info.get('ETag') or info.get('mtime')
  return [int(info.get('size') or 0), str(version)]


def stage_in(path, what: str = 'file') -> Path:
  """A local copy of `path`: the object, or every object under the folder URL, in the per-host
  staging cache; a local `path` comes back as it is. Objects already staged with the same size
  and generation are not downloaded again. Files land under their final name only complete."""
  if not is_remote(path):
    return Path(path)
  url = os.fspath(path).rstrip('/')
  fs, remote = _filesystem(url)
  scheme, bucket, key = _split(url)
  local = stage_root() / scheme / bucket / key
  try:
    info = fs.info(remote)
  except FileNotFoundError:
    raise _missing(url, fs) from None
  if info.get('type') == 'directory':
    found = fs.find(remote, detail=True)
    files = {name[len(remote):].lstrip('/'): meta for name, meta in found.items()}
    files = {rel: meta for rel, meta in files.items() if rel and meta.get('type') != 'directory'}
    if not files:
      raise StorageError(f'{url}: an empty folder, not a {what}')
  else:
    files = {'': info}
  manifest_path = stage_root() / '.manifests' / (hashlib.sha256(url.encode()).hexdigest() + '.json')
  try:
    manifest = json.loads(manifest_path.read_text())
  except (OSError, ValueError):
    manifest = {}
  todo = {
      rel: meta
      for rel, meta in files.items()
      if manifest.get(rel) != _stamp(meta) or not (local / rel if rel else local).is_file()
  }
  if todo:
    total = sum(int(meta.get('size') or 0) for meta in todo.values())
    with tqdm(total=total, unit='B', unit_scale=True, desc=f'staging {url}', disable=None,
              leave=False) as bar:
      for rel, meta in sorted(todo.items()):
        target = local / rel if rel else local
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f'.{target.name}.partial-{secrets.token_hex(4)}')
        source = f'{remote}/{rel}' if rel else remote
        try:
          fs.get_file(source, os.fspath(temp))
          os.replace(temp, target)
        except FileNotFoundError:
          raise _missing(f'{url}/{rel}' if rel else url, fs) from None
        finally:
          with contextlib.suppress(OSError):
            os.unlink(temp)
        manifest[rel] = _stamp(meta)
        bar.update(int(meta.get('size') or 0))
    manifest = {rel: stamp for rel, stamp in manifest.items() if rel in files}
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    partial = manifest_path.with_name(f'.{manifest_path.name}.{secrets.token_hex(4)}')
    partial.write_text(json.dumps(manifest))
    os.replace(partial, manifest_path)
  return local


# --- outputs: this host -> bucket ------------------------------------------------------------


def upload(local, url: str) -> None:
  """Copies the local file (or every file under the local folder) to `url`."""
  fs, remote = _filesystem(url)
  local = Path(local)
  files = [local] if local.is_file() else sorted(p for p in local.rglob('*') if p.is_file())
  with warnings.catch_warnings():
    # aiohttp's advice to gcsfs (which sends a small object as one bytes body) is no news to
    # the user; the command line shows ResourceWarnings, so it would print on every upload.
    warnings.filterwarnings('ignore', message='Sending a large body directly',
                            category=ResourceWarning)
    for file in files:
      target = remote if file == local else f'{remote}/{file.relative_to(local).as_posix()}'
      try:
        fs.put_file(os.fspath(file), target)
      except FileNotFoundError:
        raise _missing(url, fs) from None


@contextlib.contextmanager
def local_output(path) -> Iterator[Path]:
  """A local path to write `path` to: `path` itself when local; for a URL, a file in a fresh
  temporary folder (same name, so writers that go by the suffix work), uploaded when the block
  ends without an error. The bucket is checked before the work starts."""
  if not is_remote(path):
    yield Path(path)
    return
  url = os.fspath(path)
  require_bucket(url)
  with tempfile.TemporaryDirectory(prefix='mprnet-upload-') as folder:
    local = Path(folder) / (_split(url)[2].rsplit('/', 1)[-1] or 'output')
    yield local
    upload(local, url)


@contextlib.contextmanager
def local_output_dir(path) -> Iterator[Path]:
  """As `local_output`, for a folder of outputs: uploaded file by file when the block ends."""
  if not is_remote(path):
    yield Path(path)
    return
  url = os.fspath(path).rstrip('/')
  require_bucket(url)
  with tempfile.TemporaryDirectory(prefix='mprnet-upload-') as folder:
    yield Path(folder)
    upload(folder, url)


def remove_tree(url: str) -> None:
  """Removes every object under the folder URL (nothing if there is none)."""
  fs, remote = _filesystem(url)
  with contextlib.suppress(FileNotFoundError):
    fs.rm(remote, recursive=True)


def require_bucket(url: str) -> None:
  """StorageError (one line) unless the bucket of `url` exists and its service is reachable:
  checked before a run writes anything, so a typo in the bucket fails at once."""
  url = os.fspath(url)
  fs, _ = _filesystem(url)
  scheme, bucket, _ = _split(url)
  try:
    found = fs.exists(bucket)
  except Exception:  # noqa: BLE001 (a client error: the bucket may still be there)
    found = True
  if not found:
    raise StorageError(f'{url}: bucket {scheme}://{bucket} does not exist')


def create_exclusive(url: str, text: str) -> bool:
  """Writes `text` to `url` only if no object is there; False if one is. On GCS this is one
  request with `ifGenerationMatch=0`, so of two hosts racing for it exactly one wins."""
  fs, path = _filesystem(url)
  try:
    fs.pipe_file(path, text.encode(), mode='create')
  except FileExistsError:
    return False
  return True


def remove(url: str) -> None:
  """Removes one object; nothing if it is not there."""
  fs, path = _filesystem(url)
  with contextlib.suppress(FileNotFoundError):
    fs.rm_file(path)


def age_s(url: str) -> float | None:
  """Seconds since the object was last written; None if it is not there."""
  fs, path = _filesystem(url)
  try:
    info = fs.info(path)
  except FileNotFoundError:
    return None
  modified = info.get('mtime') or info.get('updated')
  if isinstance(modified, str):
    modified = datetime.datetime.fromisoformat(modified.replace('Z', '+00:00'))
  if isinstance(modified, datetime.datetime):
    return time.time() - modified.timestamp()
  return 0.0  # a store that does not say: as if just written (never taken for stale)


def list_names(url: str) -> list[str]:
  """The names of the objects and folders directly under the folder URL, freshly listed
  (another host may have written since this process last looked); [] if there are none."""
  fs, remote = _filesystem(url)
  fs.invalidate_cache()  # every cached listing: `exists` calls that follow ask afresh too
  try:
    return sorted(name.rstrip('/').rsplit('/', 1)[-1] for name in fs.ls(remote, detail=False))
  except FileNotFoundError:
    return []


def move_tree(url: str, target: str) -> None:
  """Moves every object under the folder URL to the folder URL `target`: a copy, then a delete
  (buckets cannot rename; gcsfs's move API does the same with noisier failures)."""
  fs, remote = _filesystem(url)
  _, destination = _filesystem(target)
  for name in fs.find(remote):
    fs.copy(name, f'{destination}/{name[len(remote):].lstrip("/")}')
  remove_tree(url)


def write_bytes(url: str, data: bytes) -> None:
  """Writes a small file whole (one request)."""
  fs, path = _filesystem(url)
  try:
    fs.pipe_file(path, data)
  except FileNotFoundError:
    raise _missing(url, fs) from None

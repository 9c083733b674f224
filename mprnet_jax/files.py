"""Guards for the files a command reads and writes.

Reading: a FIFO, device or socket given where a file is expected would block `open()` (or read
forever), so every input is checked with `stat()` first, which never blocks.

Writing: an output must never be one of the inputs, also through a hard link or a symlink (the
same inode), and is written under a temporary name in its folder and renamed into place, so an
interrupted write never leaves a truncated file under the final name. Files are created with
mode 0666 filtered by the umask, as any other tool would create them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from mprnet_jax import storage

__all__ = ['require_regular_file', 'refuse_overwriting_inputs', 'atomic_output']


def _kind(mode: int) -> str:
  for test, name in ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
                     (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
                     (stat.S_ISBLK, 'a block device')):
    if test(mode):
      return name
  return 'not a regular file'


def require_regular_file(path, error: type[Exception], what: str = 'file') -> Path:
  """`path` if it is a regular file (symlinks followed); else `error` in one line."""
  path = Path(path)
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise error(f'{path}: no such file') from None
  except OSError as exc:
    raise error(f'{path}: cannot read ({exc.strerror or exc})') from None
  if not stat.S_ISREG(mode):
    raise error(f'{path}: is {_kind(mode)}, not a regular {what}')
  return path


def refuse_overwriting_inputs(output, inputs: Iterable, error: type[Exception]) -> None:
  """Raise `error` if `output` exists and is the same file (same inode: hard link, symlink,
  another spelling of the path) as any of `inputs`; a folder input covers the files in it.
  A URL `output` is compared with the URL inputs by their normalised spelling (an object has
  no inode); local and URL paths never name the same file."""
  if storage.is_remote(output):
    _refuse_overwriting_remote(os.fspath(output), inputs, error)
    return
  inputs = [item for item in inputs if not storage.is_remote(item)]
  output = Path(output)
  if not output.exists():
    return
  for item in inputs:
    item = Path(item)
    candidates = [item]
    if item.is_dir():
      with contextlib.suppress(OSError):
        candidates = [p for p in item.rglob('*') if p.is_file()]
    for candidate in candidates:
      try:
        same = os.path.samefile(output, candidate)
      except OSError:  # vanished or unreadable: cannot be what we are about to write
        same = False
      if same:
        raise error(f'{output}: is the input {candidate} (same file); '
                    'refusing to write over an input')


def _refuse_overwriting_remote(output: str, inputs: Iterable, error: type[Exception]) -> None:
  target = storage.normalize(output)
  for item in inputs:
    if not storage.is_remote(item):
      continue
    source = storage.normalize(item)
    if target == source or target.startswith(source + '/'):
      # As for local files: only an object that is there is an input to protect.
      if storage.exists(output):
        candidate = os.fspath(item) if target == source else output
        raise error(f'{output}: is the input {candidate} (same file); '
                    'refusing to write over an input')


def _umask() -> int:
  try:  # Linux says it without changing it (os.umask can only read by setting)
    with open('/proc/self/status') as status:
      for line in status:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  old = os.umask(0o022)
  os.umask(old)
  return old


@contextlib.contextmanager
def atomic_output(path, error: type[Exception]) -> Iterator[Path]:
  """Yields a temporary path beside `path` (same suffix, so format-by-suffix writers work);
  on success gives it mode 0666 & ~umask (a writer may have replaced it with a private file)
  and renames it onto `path`; on failure removes it."""
  path = Path(path)
  temp = path.with_name(f'.{path.stem}.partial-{secrets.token_hex(4)}{path.suffix}')
  try:
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
  except OSError as exc:
    raise error(f'{path}: cannot write ({exc.strerror or exc})') from None
  try:
    yield temp
    os.chmod(temp, 0o666 & ~_umask())
    os.replace(temp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temp)
    raise

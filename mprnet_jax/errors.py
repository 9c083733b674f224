"""The errors a user can cause, as one small hierarchy.

The command line answers an `MprnetError` (or an `OSError`) with one line, `mprnet <command>:
error: <message>`, and exit status 2; anything else is a bug in our code and keeps its
traceback. So raise these for bad input only, with a message that names the thing (file, folder,
config field) and says what is wrong with it.

Each is also a `ValueError`, so code written against the earlier plain `ValueError`s still
catches them.
"""

from __future__ import annotations

__all__ = [
    'MprnetError', 'ConfigError', 'CheckpointError', 'ImageError', 'DataError', 'StorageError',
    'NonFiniteTraining'
]


class MprnetError(ValueError):
  """Bad input from the user; the message is one line naming the thing and the problem."""


class ConfigError(MprnetError):
  """A config file, field or override value that cannot be used."""


class CheckpointError(MprnetError):
  """A weight file or training checkpoint that cannot be read or written."""


class ImageError(MprnetError):
  """An image file that cannot be read or written."""


class DataError(MprnetError):
  """A dataset folder, shard or protocol file that cannot be used."""


class StorageError(MprnetError):
  """A bucket, object or storage service (gs://...) that cannot be reached or used."""


class NonFiniteTraining(MprnetError, FloatingPointError):
  """Training stopped because its steps had a non-finite loss or gradient (NaN/inf weights or
  data, or a learning rate that makes the updates diverge)."""

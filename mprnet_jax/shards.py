"""Decoded image pairs in array_record shards: written once, read without TensorFlow.

Decoding a 720p PNG costs ~43 ms and cropping raw uint8 ~15 us (measured, BENCHMARKS.md), so a
prepared set stores raw arrays. `write_shards` writes plain array_record files, one record per
pair:
  b'MPR1' + uint32 little-endian header length + JSON header
  {"name", "input": [H, W, C], "target": [H, W, C]} + input bytes + target bytes (uint8, C order).
`ShardSource` reads them back (array_record + grain only) as
{'input': uint8 (H, W, 3), 'target': uint8 (H, W, 3), 'name': str}.

The same pairs as a tensorflow-datasets dataset: `mprnet_jax.tfds_builder`.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from grain.sources import ArrayRecordDataSource
from tqdm.auto import tqdm

from mprnet_jax import storage
from mprnet_jax.errors import DataError

_MAGIC = b'MPR1'
# One record per group: a pair is megabytes, so grouping only slows random access.
# zstd level 1 decodes at >1 GB/s and shrinks photos little, so it is off by default.
DEFAULT_WRITER_OPTIONS = 'group_size:1,uncompressed'


def encode_pair(example: dict[str, Any]) -> bytes:
  """{'input', 'target': uint8 (H, W, C), 'name'} -> one record (layout in module doc)."""
  inp = np.ascontiguousarray(example['input'], dtype=np.uint8)
  tgt = np.ascontiguousarray(example['target'], dtype=np.uint8)
  header = json.dumps(
      {'name': str(example.get('name', '')), 'input': list(inp.shape),
       'target': list(tgt.shape)}).encode()
  return b''.join([_MAGIC, struct.pack('<I', len(header)), header, inp.tobytes(), tgt.tobytes()])


def decode_pair(record: bytes) -> dict[str, Any]:
  """Inverse of `encode_pair`; the arrays are read-only views on the record bytes."""
  if record[:4] != _MAGIC:
    raise DataError('not an mprnet_jax shard record (bad magic bytes)')
  (header_len,) = struct.unpack('<I', record[4:8])
  header = json.loads(record[8:8 + header_len])
  offset = 8 + header_len
  out = {'name': header['name']}
  for key in ('input', 'target'):
    shape = tuple(header[key])
    size = int(np.prod(shape))
    out[key] = np.frombuffer(record, np.uint8, size, offset).reshape(shape)
    offset += size
  return out


def shard_paths(directory: str, prefix: str, num_shards: int) -> list[str]:
  """The file names `write_shards` uses: <prefix>.array_record-0000k-of-0000n."""
  return [
      os.path.join(directory, f'{prefix}.array_record-{k:05d}-of-{num_shards:05d}')
      for k in range(num_shards)
  ]


def write_shards(
    source: Sequence[dict[str, Any]],
    directory: str,
    *,
    num_shards: int = 1,
    prefix: str = 'train',
    writer_options: str = DEFAULT_WRITER_OPTIONS,
    progress: bool = False,
) -> list[str]:
  """Writes every example of `source` to `num_shards` array_record files; returns paths.

  Shard k holds a contiguous block of examples, in source order, so that a host reading a
  contiguous slice (see `data.make_train_loader`) opens few files.

  `directory` may be a bucket URL (`gs://bucket/shards`): the shards are written to a local
  temporary folder (array_record writes local files only) and uploaded once all are complete;
  the URLs are returned.
  """
  n = len(source)
  if num_shards < 1 or num_shards > max(n, 1):
    raise DataError(f'num_shards must be in 1..{max(n, 1)} for {n} examples, got {num_shards}')
  if storage.is_remote(directory):
    url = os.fspath(directory).rstrip('/')
    with storage.local_output_dir(url) as local:
      written = write_shards(source, os.fspath(local), num_shards=num_shards, prefix=prefix,
                             writer_options=writer_options, progress=progress)
    return [storage.join(url, os.path.basename(path)) for path in written]
  os.makedirs(directory, exist_ok=True)
  paths = shard_paths(directory, prefix, num_shards)
  bounds = np.linspace(0, n, num_shards + 1).astype(int)
  bar = tqdm(total=n, desc='writing shards', unit='pair') if progress else None
  for path, start, stop in zip(paths, bounds[:-1], bounds[1:]):
    writer = ArrayRecordWriter(path, writer_options)
    try:
      for index in range(start, stop):
        writer.write(encode_pair(source[index]))
        if bar is not None:
          bar.update(1)
    finally:
      writer.close()
  if bar is not None:
    bar.close()
  return paths


class ShardSource:
  """Random access to the pairs in shards written by `write_shards`.

  Args:
    pattern: a glob (`dir/train.array_record-*`), a directory (all `*.array_record-*` in it),
      or a list of paths. Files are read in sorted order.
  """

  def __init__(self, pattern: str | Sequence[str]):
    if isinstance(pattern, str):
      if os.path.isdir(pattern):
        pattern = os.path.join(pattern, '*.array_record-*')
      paths = sorted(glob.glob(pattern))
    else:
      paths = sorted(str(p) for p in pattern)
    if not paths:
      raise DataError(f'no shard files match {pattern!r}')
    self.paths = paths
    self._records = ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_pair(self._records[index])

  def __repr__(self) -> str:
    return f'ShardSource({len(self.paths)} files, {len(self)} pairs)'

"""Measures training-loader throughput (crops/s) from a prepared set.

Two prepared sets of the same pairs: raw uint8 arrays in memory, and array_record shards
(`mprnet_jax.shards`). Images are 720x1280 (GoPro frames), crops 256x256, batch 16, the
'deblur' augmentation (crop, flips/rotations, saturation), with 0 and 2 worker processes.

  python convert/measure_loader.py [--images 64] [--batches 40] [--workers 0 2]
"""

import argparse
import tempfile
import time

import numpy as np

from mprnet_jax import data, shards


class MemorySource:
  """Decoded pairs in memory: what `PairedFolderSource(cache=True).preload()` holds."""

  def __init__(self, num_images, height, width, seed=0):
    rng = np.random.default_rng(seed)
    self.pairs = []
    for i in range(num_images):
      target = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      self.pairs.append({'input': target ^ 0x0F, 'target': target, 'name': f'{i:04d}.png'})

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, index):
    return self.pairs[index]


def crops_per_second(source, *, workers, batches, batch_size, patch_size):
  loader = data.make_train_loader(source, batch_size=batch_size, patch_size=patch_size, seed=0,
                                  num_workers=workers)
  iterator = iter(loader)
  for _ in range(3):  # start-up: worker processes, first reads
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  elapsed = time.perf_counter() - start
  assert batch['input'].shape == (batch_size, patch_size, patch_size, 3)
  if workers:
    iterator.close()
  return batches * batch_size / elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--patch-size', type=int, default=256)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  args = parser.parse_args()

  memory = MemorySource(args.images, 720, 1280)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    shards.write_shards(memory, tmp, num_shards=4)
    print(f'wrote {args.images} pairs to 4 shards in {time.perf_counter() - start:.1f} s')
    sources = {'memory': memory, 'shards': data.ShardSource(tmp)}
    for name, source in sources.items():
      for workers in args.workers:
        rate = crops_per_second(source, workers=workers, batches=args.batches,
                                batch_size=args.batch_size, patch_size=args.patch_size)
        print(f'{name:7s} workers={workers}: {rate:7.1f} crops/s '
              f'({args.patch_size}x{args.patch_size}, batch {args.batch_size})')


if __name__ == '__main__':
  main()

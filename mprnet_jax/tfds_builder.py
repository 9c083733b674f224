"""Paired folders as a tensorflow-datasets dataset, built and read without TensorFlow.

`PairedFolderBuilder` is a TFDS builder (`file_format='array_record'`) of `<root>/input` +
`<root>/target` folders, stored decoded (uint8); `TfdsSource` reads a split back as
{'input': uint8 (H, W, 3), 'target': uint8 (H, W, 3), 'name': str}. TFDS 4.9 needs no
TensorFlow for either. tensorflow-datasets is optional (`pip install 'mprnet-jax[tfds]'`), so it
is imported on first use.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mprnet_jax.data import PairedFolderSource
from mprnet_jax.errors import DataError

# PairedFolderBuilder is made on first use, by the module's __getattr__.
__all__ = ['PairedFolderBuilder', 'TfdsSource']  # noqa: F822


class TfdsSource:
  """Reads a split built by `PairedFolderBuilder` (TFDS array_record), without TensorFlow.

  TFDS stores examples in its own shuffled order; `name` tells which pair is which.
  """

  def __init__(self, name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds

    _paired_folder_builder()  # registers the builder class so TFDS can find it by name
    self._source = tfds.data_source(name, split=split, data_dir=data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    name = example['name']
    return {
        'input': example['input'], 'target': example['target'],
        'name': name.decode() if isinstance(name, bytes) else str(name)
    }


@functools.cache
def _paired_folder_builder() -> type:
  """Defines the TFDS builder class on first use: tensorflow-datasets stays optional."""
  import tensorflow_datasets as tfds

  class PairedFolderBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of paired folders (`<root>/input`, `<root>/target`), raw uint8 arrays.

    Usage (no TensorFlow needed):
      builder = PairedFolderBuilder(splits={'train': 'GoPro/train', 'test': 'GoPro/test'},
                                    data_dir='tfds_data', file_format='array_record')
      builder.download_and_prepare()
      source = TfdsSource('paired_folder_builder', 'train', 'tfds_data')
    """

    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, splits: dict[str, str] | None = None, **kwargs):
      self._split_roots = dict(splits or {})
      kwargs.setdefault('file_format', 'array_record')
      super().__init__(**kwargs)

    def _info(self):
      image = functools.partial(tfds.features.Tensor, shape=(None, None, 3), dtype=np.uint8,
                                encoding='bytes')
      return tfds.core.DatasetInfo(
          builder=self, description='Paired degraded/clean images, stored decoded (uint8 HxWx3).',
          features=tfds.features.FeaturesDict(
              {'input': image(), 'target': image(), 'name': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager  # local folders only
      if not self._split_roots:
        raise DataError('PairedFolderBuilder needs splits={split_name: folder}')
      return {split: self._generate_examples(root) for split, root in self._split_roots.items()}

    def _generate_examples(self, root):
      source = PairedFolderSource(root)
      for i in range(len(source)):
        example = source[i]
        yield example['name'], example

  return PairedFolderBuilder


def __getattr__(name: str):
  if name == 'PairedFolderBuilder':
    return _paired_folder_builder()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

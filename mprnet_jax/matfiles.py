"""MATLAB .mat files of the official benchmarks: SIDD block arrays and DND images and boxes.

Two container formats occur: MATLAB v5 (read and written by SciPy) and MATLAB v7.3, which is
HDF5 (read by h5py). MATLAB stores arrays column-major, so an HDF5 dataset holds the transpose
of the MATLAB array: every axis is reversed on reading, as the official DND script's `.T` does.
Every problem with a file is a one-line `DataError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from mprnet_jax.errors import DataError

__all__ = [
    'read_mat_variable', 'read_blocks', 'write_mat', 'read_dnd_boxes', 'dnd_image_shape',
    'read_dnd_image'
]


def _h5py():
  return h5py


def _is_hdf5(path: Path) -> bool:
  return _h5py().is_hdf5(str(path))


def read_mat_variable(path: str | os.PathLike, name: str) -> np.ndarray:
  """The variable `name` of a .mat file (v5 or v7.3) as a NumPy array in MATLAB's axis order."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f'{path}: no such file')
  if _is_hdf5(path):
    with _h5py().File(path, 'r') as handle:
      if name not in handle or not isinstance(handle[name], _h5py().Dataset):
        found = ', '.join(k for k in handle if not k.startswith('#')) or 'none'
        raise DataError(f'{path}: no variable {name!r} (variables: {found})')
      return np.asarray(handle[name][()]).transpose()
  try:
    variables = scipy.io.loadmat(path, variable_names=[name])
  except Exception as exc:  # noqa: BLE001 - SciPy raises many types on foreign files
    raise DataError(f'{path}: not a MATLAB .mat file ({type(exc).__name__}: {exc})') from None
  if name not in variables:
    found = ', '.join(entry[0] for entry in scipy.io.whosmat(path))
    raise DataError(f'{path}: no variable {name!r} (variables: {found or "none"})')
  return variables[name]


def read_blocks(path: str | os.PathLike, name: str) -> np.ndarray:
  """A SIDD block array: uint8 (N, M, H, W, 3) (the real files: (40, 32, 256, 256, 3))."""
  blocks = read_mat_variable(path, name)
  if blocks.ndim != 5 or blocks.shape[-1] != 3:
    raise DataError(f'{path}: {name} has shape {blocks.shape}; expected (N, M, H, W, 3) blocks')
  if blocks.dtype != np.uint8:
    raise DataError(f'{path}: {name} is {blocks.dtype}; the SIDD sRGB blocks are uint8')
  return blocks


def write_mat(path: str | os.PathLike, variables: dict) -> Path:
  """Writes a MATLAB v5 .mat file (what the official scripts write with `scipy.io.savemat`)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  scipy.io.savemat(path, variables, do_compression=False)
  return path


def read_dnd_boxes(path: str | os.PathLike) -> list[np.ndarray]:
  """The DND `info.mat` bounding boxes: per image an int (K, 4) array of 1-based inclusive
  [row_start, col_start, row_end, col_end] (the file holds one 4 x K reference per image)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f'{path}: no such file (the DND folder holds info.mat and images_srgb/)')
  if not _is_hdf5(path):
    raise DataError(f'{path}: not an HDF5 file; DND info.mat is MATLAB v7.3 (HDF5)')
  h5py = _h5py()
  with h5py.File(path, 'r') as handle:
    if 'info' not in handle or 'boundingboxes' not in handle['info']:
      raise DataError(f'{path}: no info/boundingboxes')
    references = np.asarray(handle['info']['boundingboxes']).reshape(-1)
    boxes = []
    for index, reference in enumerate(references):
      if not isinstance(reference, h5py.Reference) or not reference:
        raise DataError(f'{path}: info/boundingboxes entry {index} is not an object reference')
      array = np.asarray(handle[reference]).T  # stored 4 x K: transposed it is K rows
      if array.ndim != 2 or array.shape[1] != 4:
        raise DataError(f'{path}: bounding boxes of image {index + 1} have shape {array.shape}; '
                        'expected K x 4')
      if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise DataError(f'{path}: bounding boxes of image {index + 1} are not whole numbers')
      boxes.append(array.astype(np.int64))
  if not boxes:
    raise DataError(f'{path}: no images in info/boundingboxes')
  return boxes


def _dnd_dataset(handle, path: Path):
  if 'InoisySRGB' not in handle:
    raise DataError(f'{path}: no variable InoisySRGB')
  dataset = handle['InoisySRGB']
  if dataset.ndim != 3 or dataset.shape[0] != 3:
    raise DataError(f'{path}: InoisySRGB has stored shape {dataset.shape}; expected '
                    '3 x W x H (an H x W x 3 sRGB image, transposed by MATLAB v7.3)')
  return dataset


def dnd_image_shape(path: str | os.PathLike) -> tuple[int, int, int]:
  """(H, W, 3) of a DND `images_srgb/NNNN.mat`, read from its header only."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f'{path}: no such file')
  if not _is_hdf5(path):
    raise DataError(f'{path}: not an HDF5 file; DND images are MATLAB v7.3 (HDF5)')
  with _h5py().File(path, 'r') as handle:
    return tuple(reversed(_dnd_dataset(handle, path).shape))


def read_dnd_image(path: str | os.PathLike) -> np.ndarray:
  """A DND `images_srgb/NNNN.mat`: float32 (H, W, 3) in [0, 1]."""
  path = Path(path)
  dnd_image_shape(path)
  with _h5py().File(path, 'r') as handle:
    return np.ascontiguousarray(np.asarray(_dnd_dataset(handle, path), np.float32).T)

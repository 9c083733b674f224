"""The official evaluation protocols behind the MPRNet paper's tables, for `mprnet evaluate`.

A protocol says how restorations are scored (see `metrics.py` for each definition):

- `rgb`: our default since the first release: PSNR (clamped to [0, 1]) and scikit-image's
  Gaussian SSIM per channel, on [0, 1] RGB.
- `gopro`: `Deblurring/evaluate_GOPRO_HIDE.m` (GoPro, HIDE): MATLAB `psnr` and default `ssim`
  (3-D volume SSIM) on the 8-bit RGB images.
- `realblur`: `Deblurring/evaluate_RealBlur.py`: ECC alignment, masked PSNR and SSIM.
- `rain`: `Deraining/evaluate_PSNR_SSIM.m` (Rain100L/H, Test100/1200/2800): Y channel of
  MATLAB's `rgb2ycbcr`, Wang's SSIM.
- `sidd`: `Denoising/test_SIDD.py` + `evaluate_SIDD.m`: the validation block arrays of the two
  official .mat files, restored in batches, saved as `Idenoised.mat`, scored with MATLAB's
  `psnr`/`ssim` on single [0, 1] blocks.
- `dnd`: `Denoising/test_DND.py`: the boxes of `info.mat` cut from `images_srgb/NNNN.mat`,
  restored and written as one `NNNN.mat` per image for the benchmark's server (DND publishes
  no ground truth, so nothing is scored here).

The folder protocols score either a model's restorations of `DATA/input/*` (weights mode) or a
folder of restorations made elsewhere (results mode) against `DATA/target/*`, pairing files by
name (without the suffix, as the official test scripts save PNGs named like their inputs).
Every result is a dict: `dataset`, `protocol`, `images`, `psnr`, `ssim` (means) and
`per_image` (`name`, `psnr`, `ssim`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from mprnet_jax import matfiles, metrics
from mprnet_jax.errors import DataError
from mprnet_jax.files import atomic_output, require_regular_file
from mprnet_jax.image_io import IMAGE_SUFFIXES, ImageInfo, read_image, write_image

__all__ = [
    'PROTOCOLS', 'FOLDER_PROTOCOLS', 'check_protocol', 'check_dataset', 'evaluate_dataset',
    'evaluate_pairs', 'evaluate_sidd', 'restore_dnd', 'restore_batches', 'mean_row', 'write_csv',
    'write_json', 'SIDD_NOISY', 'SIDD_GT', 'SIDD_RESULT'
]

PROTOCOLS = {
    'rgb': 'RGB PSNR and per-channel Gaussian SSIM on [0, 1]',
    'gopro': "MATLAB psnr and 3-D ssim on 8-bit RGB, as evaluate_GOPRO_HIDE.m",
    'realblur': 'ECC-aligned masked PSNR and SSIM, as evaluate_RealBlur.py',
    'rain': "Y channel of rgb2ycbcr, Wang's SSIM, as evaluate_PSNR_SSIM.m",
    'sidd': 'MATLAB psnr and 3-D ssim on single [0, 1] blocks, as evaluate_SIDD.m',
    'dnd': 'patches for the DND server (no public ground truth)',
}
FOLDER_PROTOCOLS = ('rgb', 'gopro', 'realblur', 'rain')

# The official SIDD file and variable names (each file holds the variable of its own name).
SIDD_NOISY = 'ValidationNoisyBlocksSrgb'
SIDD_GT = 'ValidationGtBlocksSrgb'
SIDD_RESULT = 'Idenoised'


def check_protocol(protocol: str) -> str:
  if protocol not in PROTOCOLS:
    raise DataError(f'unknown protocol {protocol!r}; choose one of {", ".join(PROTOCOLS)}')
  return protocol


# --- scoring: one jitted function per protocol (compiled once per image size) ---


@jax.jit
def _score_rgb(restored, target):
  return metrics.psnr(restored, target), metrics.ssim(restored, target)


@jax.jit
def _score_matlab(restored, target):
  # MATLAB's psnr and ssim are unchanged when data and L scale together: uint8 at L = 255 is
  # the same as the /255 values at L = 1.
  return metrics.psnr_matlab(restored, target, 1.0), metrics.ssim_matlab(restored, target, 1.0)


@jax.jit
def _score_rain(restored, target):
  restored, target = restored * 255.0, target * 255.0  # the 8-bit values rgb2ycbcr reads
  return metrics.psnr_y(restored, target), metrics.ssim_y(restored, target)


def _score_realblur(restored, target):
  cv2 = metrics.require_opencv()
  try:
    return metrics.realblur_psnr_ssim(restored, target)
  except cv2.error as exc:  # ECC finds no warp, e.g. on a flat image
    raise DataError(f'ECC alignment failed ({str(exc).strip().splitlines()[-1]})') from None


_SCORERS = {
    'rgb': _score_rgb, 'gopro': _score_matlab, 'rain': _score_rain, 'realblur': _score_realblur
}


def _summary(dataset, protocol: str, per_image: list[dict]) -> dict:
  return {
      'dataset': str(dataset), 'protocol': protocol, 'images': len(per_image),
      'psnr': float(np.mean([r['psnr'] for r in per_image])),
      'ssim': float(np.mean([r['ssim'] for r in per_image])), 'per_image': per_image
  }


# --- folder protocols ---


def _images_by_stem(folder: Path) -> dict[str, Path]:
  if not folder.is_dir():
    raise DataError(f'{folder}: no such folder')
  found: dict[str, Path] = {}
  for path in sorted(folder.iterdir()):
    if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
      continue
    # An image name on a FIFO, device or socket would hang or fail the read: refuse it now.
    require_regular_file(path, DataError, 'image file')
    if path.stem in found:
      raise DataError(f'{folder}: {found[path.stem].name} and {path.name} share a name; '
                      'keep one image per name')
    found[path.stem] = path
  if not found:
    raise DataError(f'{folder}: no images ({", ".join(IMAGE_SUFFIXES)})')
  return found


def _first_names(stems: list[str], paths: dict[str, Path], count: int = 5) -> str:
  names = [paths[stem].name for stem in stems[:count]]
  return ', '.join(names) + (', ...' if len(stems) > count else '')


def _pair_files(data_dir, results_dir=None) -> list[tuple[Path, Path]]:
  """(source, target) pairs: `data_dir/input` (or `results_dir`) against `data_dir/target`.

  Weights mode wants the same names on both sides; results mode wants a result for every
  target and ignores extra results (a method's folder may hold a whole test set).
  """
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise DataError(f'dataset folder {data_dir} does not exist')
  if results_dir is None:
    for sub in ('input', 'target'):
      if not (data_dir / sub).is_dir():
        raise DataError(f'dataset folder {data_dir} has no {sub}/ subfolder')
    sources = _images_by_stem(data_dir / 'input')
  else:
    if not (data_dir / 'target').is_dir():
      raise DataError(f'dataset folder {data_dir} has no target/ subfolder')
    sources = _images_by_stem(Path(results_dir))
  targets = _images_by_stem(data_dir / 'target')
  missing = sorted(set(targets) - set(sources))
  if results_dir is not None and missing:
    raise DataError(f'{results_dir}: no result for {len(missing)} of the {len(targets)} images '
                    f'of {data_dir}/target ({_first_names(missing, targets)})')
  extra = sorted(set(sources) - set(targets)) if results_dir is None else []
  if missing or extra:
    shown = [f'target/{targets[n].name}' for n in missing
            ] + [f'input/{sources[n].name}' for n in extra]
    raise DataError(f'{len(shown)} images in {data_dir} have no partner of the same name: '
                    f'{", ".join(shown[:5])}{", ..." if len(shown) > 5 else ""}')
  return [(sources[stem], targets[stem]) for stem in sorted(targets)]


def _save_dir_is_safe(save_dir: Path, data_dir: Path, results_dir) -> None:
  protected = {(data_dir / 'input').resolve(), (data_dir / 'target').resolve()}
  if results_dir is not None:
    protected.add(Path(results_dir).resolve())
  if save_dir.resolve() in protected:
    raise DataError(f'{save_dir}: would overwrite the dataset; choose another --save-images')


def evaluate_pairs(protocol: str, data_dir, *, restorer=None, results_dir=None, save_dir=None,
                   progress: bool = True) -> dict:
  """Scores a folder protocol on `data_dir` (`target/`, and `input/` in weights mode).

  With a `restorer`, each input is restored with the official padding, rounded to 8 bits (the
  PNG the official test scripts save and their evaluation reads; 16 bits for 16-bit targets)
  and scored; `save_dir` gets
  those PNGs, named like the inputs, so results mode scores them identically later. With
  `results_dir`, its images are scored as they are (8- or 16-bit).
  """
  check_protocol(protocol)
  if protocol not in FOLDER_PROTOCOLS:
    raise DataError(f'protocol {protocol!r} does not score image folders')
  if (restorer is None) == (results_dir is None):
    raise ValueError('evaluate_pairs needs exactly one of restorer and results_dir')
  data_dir = Path(data_dir)
  pairs = _pair_files(data_dir, results_dir)
  if save_dir is not None:
    save_dir = Path(save_dir)
    _save_dir_is_safe(save_dir, data_dir, results_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
  if protocol == 'realblur':
    metrics.require_opencv()  # fail before any restoring when OpenCV is missing
  score = _SCORERS[protocol]
  per_image = []
  for source, target_path in tqdm(pairs, desc=f'evaluate {data_dir.name}', unit='img',
                                  disable=not progress):
    image, _ = read_image(source)
    target, target_info = read_image(target_path)
    if image.shape != target.shape:
      raise DataError(f'{source} is {image.shape[0]}x{image.shape[1]} but {target_path} is '
                      f'{target.shape[0]}x{target.shape[1]} (HxW)')
    if restorer is not None:
      image = restorer.restore_float(image)
      # Rounded to the target's depth, as the saved PNG holds it: 8 bits for the official
      # datasets, 16 bits kept for 16-bit targets.
      levels = 65535.0 if target_info.bit_depth == 16 else 255.0
      image = np.round(np.clip(image, 0.0, 1.0) * levels) / levels
      if save_dir is not None:
        depth = ImageInfo(bit_depth=16 if levels > 255 else 8, mode='rgb', alpha=None, shape=())
        write_image(save_dir / f'{source.stem}.png', image, depth)
    try:
      psnr_value, ssim_value = score(np.float32(image), np.float32(target))
    except DataError as exc:
      raise DataError(f'{source}: {exc}') from None
    per_image.append(
        {'name': target_path.name, 'psnr': float(psnr_value), 'ssim': float(ssim_value)})
  return _summary(data_dir, protocol, per_image)


# --- batched restoration (SIDD blocks, DND patches) ---


def restore_batches(restorer, images: np.ndarray, batch_size: int = 8, *, progress: bool = True,
                    desc: str = 'restore') -> np.ndarray:
  """Restores float32 (N, H, W, 3) images of one size in batches -> float32, clamped to [0, 1].

  The batches are padded to `batch_size` by repeating the last image, so one shape compiles;
  sizes are reflect-padded to the restorer's bucket (8: the official padding) and cropped back.
  A restorer with tiles restores image by image.
  """
  from mprnet_jax import tiling

  images = np.asarray(images, np.float32)
  if batch_size < 1:
    raise DataError(f'batch size must be at least 1, got {batch_size}')
  if restorer.tile:
    return np.stack([
        restorer.restore_float(image)
        for image in tqdm(images, desc=desc, unit='img', disable=not progress)
    ])
  height, width = images.shape[1:3]
  restored = np.empty_like(images)
  starts = range(0, len(images), batch_size)
  for start in tqdm(starts, desc=desc, unit='batch', disable=not progress):
    chunk = images[start:start + batch_size]
    count = len(chunk)
    if count < batch_size and len(images) > batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - count, axis=0)])
    padded, _ = tiling.pad_to_multiple(chunk, restorer.bucket)
    out = restorer.apply_batch(padded)
    restored[start:start + count] = np.asarray(out[:count, :height, :width], np.float32)
  return restored


# --- SIDD ---


def _sidd_paths(data_dir) -> tuple[Path, Path]:
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise DataError(f'SIDD folder {data_dir} does not exist')
  return data_dir / f'{SIDD_NOISY}.mat', data_dir / f'{SIDD_GT}.mat'


def _sidd_result_path(results) -> Path:
  results = Path(results)
  return results / f'{SIDD_RESULT}.mat' if results.is_dir() else results


@jax.jit
def _score_blocks(denoised, target):
  return metrics.psnr_matlab(denoised, target, 1.0), metrics.ssim_matlab(denoised, target, 1.0)


def evaluate_sidd(data_dir, *, restorer=None, results=None, output_dir=None, batch_size: int = 8,
                  progress: bool = True) -> dict:
  """The SIDD validation protocol on `data_dir` (the two official .mat files).

  Weights mode: each uint8 block / 255 (float32) is restored, clamped to [0, 1] and, with
  `output_dir`, saved as `output_dir/Idenoised.mat` (float32, the blocks' shape, variable
  `Idenoised`), as `test_SIDD.py` does. Results mode: `results` is an `Idenoised.mat` (or a
  folder holding one). Either way each block is scored against im2single(GT) with MATLAB's
  `psnr` and `ssim` (L = 1); `per_image` names are 'i_k' (0-based block indices).
  """
  if (restorer is None) == (results is None):
    raise ValueError('evaluate_sidd needs exactly one of restorer and results')
  noisy_path, gt_path = _sidd_paths(data_dir)
  target = matfiles.read_blocks(gt_path, SIDD_GT)
  if restorer is not None:
    noisy = matfiles.read_blocks(noisy_path, SIDD_NOISY)
    if noisy.shape != target.shape:
      raise DataError(f'{noisy_path}: blocks of shape {noisy.shape}, but {gt_path} has '
                      f'{target.shape}')
    flat = noisy.reshape(-1, *noisy.shape[2:]).astype(np.float32) / np.float32(255.0)
    denoised = restore_batches(restorer, flat, batch_size, progress=progress,
                               desc='restore SIDD blocks').reshape(noisy.shape)
    if output_dir is not None:
      matfiles.write_mat(Path(output_dir) / f'{SIDD_RESULT}.mat', {SIDD_RESULT: denoised})
  else:
    result_path = _sidd_result_path(results)
    denoised = matfiles.read_mat_variable(result_path, SIDD_RESULT)
    if denoised.shape != target.shape:
      raise DataError(f'{result_path}: {SIDD_RESULT} has shape {denoised.shape}; expected the '
                      f'ground truth blocks\' {target.shape}')
    if not np.issubdtype(denoised.dtype, np.floating):
      raise DataError(f'{result_path}: {SIDD_RESULT} is {denoised.dtype}; expected single '
                      'values in [0, 1]')
    denoised = denoised.astype(np.float32)
  rows, cols = target.shape[:2]
  flat_target = target.reshape(-1, *target.shape[2:]).astype(np.float32) / np.float32(255.0)
  flat_denoised = denoised.reshape(flat_target.shape)
  per_image = []
  # Score a row of blocks per call: one compiled shape, memory bounded by one row.
  for row in tqdm(range(rows), desc='score SIDD blocks', unit='row', disable=not progress):
    chunk = slice(row * cols, (row + 1) * cols)
    psnrs, ssims = _score_blocks(flat_denoised[chunk], flat_target[chunk])
    per_image += [{'name': f'{row}_{col}', 'psnr': float(p), 'ssim': float(s)}
                  for col, p, s in zip(range(cols), np.asarray(psnrs), np.asarray(ssims))]
  return _summary(data_dir, 'sidd', per_image)


# --- DND ---


def _dnd_plan(data_dir) -> list[tuple[Path, np.ndarray]]:
  """(image file, (K, 4) boxes) per image, every box checked against its image's size."""
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise DataError(f'DND folder {data_dir} does not exist')
  boxes_per_image = matfiles.read_dnd_boxes(data_dir / 'info.mat')
  plan = []
  for number, boxes in enumerate(boxes_per_image, start=1):
    path = data_dir / 'images_srgb' / f'{number:04d}.mat'
    height, width, _ = matfiles.dnd_image_shape(path)
    for k, (row0, col0, row1, col1) in enumerate(boxes):
      if not (1 <= row0 <= row1 <= height and 1 <= col0 <= col1 <= width):
        raise DataError(f'{data_dir / "info.mat"}: box {k + 1} of image {number} '
                        f'[{row0}, {col0}, {row1}, {col1}] lies outside its {height}x{width} '
                        'image (1-based, inclusive)')
    plan.append((path, boxes))
  return plan


def check_dataset(protocol: str, data_dir, *, weights_mode: bool = True) -> None:
  """Checks a dataset's files cheaply (no decoding), before any weights are loaded."""
  check_protocol(protocol)
  if protocol == 'dnd':
    _dnd_plan(data_dir)
  elif protocol == 'sidd':
    noisy_path, gt_path = _sidd_paths(data_dir)
    for path in ([noisy_path, gt_path] if weights_mode else [gt_path]):
      if not path.is_file():
        raise DataError(f'{path}: no such file (the official SIDD validation file)')
  else:
    if protocol == 'realblur':
      metrics.require_opencv()
    if weights_mode:
      _pair_files(data_dir)


def restore_dnd(data_dir, restorer, output_dir, *, batch_size: int = 8,
                progress: bool = True) -> dict:
  """Restores every DND box and writes `output_dir/NNNN.mat` per image, as `test_DND.py`.

  Each file holds `Idenoised` (a 1-D cell array of the K restored float32 (h, w, 3) patches,
  clamped to [0, 1]), `israw` (false) and `eval_version` ('1.0'): what the benchmark's upload
  takes. Patches of one size are restored in batches. Returns a dict with `images`, `patches`
  and `written` (the paths); there is no score (DND's ground truth is not public).
  """
  plan = _dnd_plan(data_dir)
  output_dir = Path(output_dir)
  if output_dir.resolve() == (Path(data_dir) / 'images_srgb').resolve():
    raise DataError(f'{output_dir}: would overwrite the DND images; choose another --output')
  output_dir.mkdir(parents=True, exist_ok=True)
  written, patch_count = [], 0
  for path, boxes in tqdm(plan, desc='restore DND', unit='img', disable=not progress):
    image = matfiles.read_dnd_image(path)
    patches = [image[r0 - 1:r1, c0 - 1:c1] for r0, c0, r1, c1 in boxes]
    restored: list[np.ndarray | None] = [None] * len(patches)
    for size in sorted({p.shape for p in patches}):
      indices = [i for i, p in enumerate(patches) if p.shape == size]
      out = restore_batches(restorer, np.stack([patches[i] for i in indices]), batch_size,
                            progress=False)
      for i, patch in zip(indices, out):
        restored[i] = patch
    cell = np.empty((len(restored),), dtype=object)
    for i, patch in enumerate(restored):
      cell[i] = patch
    written.append(
        matfiles.write_mat(output_dir / path.name,
                           {'Idenoised': cell, 'israw': False, 'eval_version': '1.0'}))
    patch_count += len(patches)
  return {
      'dataset': str(data_dir), 'protocol': 'dnd', 'images': len(plan), 'patches': patch_count,
      'written': [str(p) for p in written]
  }


# --- one entry point, and the reports ---


def evaluate_dataset(protocol: str, data_dir, *, restorer=None, results=None, output_dir=None,
                     save_dir=None, batch_size: int = 8, progress: bool = True) -> dict:
  """Runs `protocol` on one dataset (see the module docstring); returns its result dict."""
  check_protocol(protocol)
  if protocol == 'dnd':
    if results is not None:
      raise DataError('DND publishes no ground truth, so results cannot be scored here; '
                      'upload the NNNN.mat files to the DND benchmark')
    if restorer is None or output_dir is None:
      raise DataError('the dnd protocol needs --weights and --output (where NNNN.mat go)')
    return restore_dnd(data_dir, restorer, output_dir, batch_size=batch_size, progress=progress)
  if protocol == 'sidd':
    return evaluate_sidd(data_dir, restorer=restorer, results=results, output_dir=output_dir,
                         batch_size=batch_size, progress=progress)
  return evaluate_pairs(protocol, data_dir, restorer=restorer, results_dir=results,
                        save_dir=save_dir, progress=progress)


def mean_row(results: list[dict]) -> dict:
  """The paper tables' average column: the mean of the datasets' mean PSNR and SSIM, and the
  number of images in all."""
  return {
      'images': sum(r['images'] for r in results),
      'psnr': float(np.mean([r['psnr'] for r in results])),
      'ssim': float(np.mean([r['ssim'] for r in results]))
  }


def write_csv(path, results: list[dict]) -> Path:
  """One row per image (`name`, `psnr`, `ssim`), then `mean`; with several datasets, a leading
  `dataset` column and a last row with the mean over datasets."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  several = len(results) > 1
  fields = (['dataset'] if several else []) + ['name', 'psnr', 'ssim']
  with atomic_output(path, DataError) as partial, open(partial, 'w', newline='') as handle:
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    for result in results:
      lead = {'dataset': result['dataset']} if several else {}
      for row in result['per_image']:
        writer.writerow({
            **lead, 'name': row['name'], 'psnr': f'{row["psnr"]:.6f}', 'ssim': f'{row["ssim"]:.6f}'
        })
      writer.writerow({
          **lead, 'name': 'mean', 'psnr': f'{result["psnr"]:.6f}', 'ssim': f'{result["ssim"]:.6f}'
      })
    if several:
      mean = mean_row(results)
      writer.writerow({
          'dataset': 'all', 'name': 'mean', 'psnr': f'{mean["psnr"]:.6f}',
          'ssim': f'{mean["ssim"]:.6f}'
      })
  return path


def _finite(value):
  """JSON has no infinity (identical images have infinite PSNR): written as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_finite(v) for v in value]
  return value


def write_json(path, protocol: str, results: list[dict]) -> Path:
  """One dataset: its result object. Several: `protocol`, `datasets` (one object each) and the
  mean over datasets (`psnr`, `ssim`, `images` in total), as a paper's table row."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if len(results) == 1:
    document = results[0]
  else:
    document = {'protocol': protocol}
    if protocol != 'dnd':
      document.update(mean_row(results))
    document['datasets'] = results
  with atomic_output(path, DataError) as partial:
    partial.write_text(json.dumps(_finite(document), indent=1) + '\n')
  return path

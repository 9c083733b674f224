"""What a training run leaves in its workdir for people to read: metrics, curves, images.

- `metrics.jsonl`: one JSON object per line, {'step', 'split': 'train'|'val', ...numbers}.
- `tensorboard/`: event files (tensorboardX, no TensorFlow): scalars, and the validation grid.
- `curves.png`: training loss and validation PSNR against step, redrawn at each validation.
- `images/val_<step>.png`: a grid with one column per validation image and three rows,
  degraded | restored | clean.

Only the main process writes (`MetricsLogger(..., enabled=jax.process_index() == 0)`); on the
others every method does nothing, so callers need no `if`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['MetricsLogger', 'image_grid', 'plot_curves', 'read_metrics']


def _scalar(value) -> float | int:
  value = np.asarray(value)
  return value.item() if value.size == 1 else float(value.mean())


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a `metrics.jsonl` (a torn last line, from a killed run, is skipped)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def image_grid(degraded: np.ndarray, restored: np.ndarray, clean: np.ndarray,
               max_images: int = 4) -> np.ndarray:
  """uint8 (3h + 2s, n w + (n-1) s, 3): rows degraded | restored | clean of the first
  `max_images` of (N, h, w, 3) float images in [0, 1], separated by s = 2 white pixels."""
  rows = []
  for images in (degraded, restored, clean):
    images = np.clip(np.asarray(images, np.float32)[:max_images], 0.0, 1.0)
    tiles = [np.rint(im * 255).astype(np.uint8) for im in images]
    n, h, w, c = len(tiles), *tiles[0].shape
    row = np.full((h, n * w + (n - 1) * 2, c), 255, np.uint8)
    for i, tile in enumerate(tiles):
      row[:, i * (w + 2):i * (w + 2) + w] = tile
    rows.append(row)
  h, width, c = rows[0].shape
  grid = np.full((3 * h + 4, width, c), 255, np.uint8)
  for i, row in enumerate(rows):
    grid[i * (h + 2):i * (h + 2) + h] = row
  return grid


def _series(records: Sequence[Mapping], split: str, key: str) -> tuple[list, list]:
  points = [(r['step'], r[key])
            for r in records
            if r.get('split') == split and key in r and math.isfinite(r[key])]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(records: Sequence[Mapping], path: str | os.PathLike, *,
                use_matplotlib: bool | None = None) -> None:
  """Draws training loss and validation PSNR (restored, and degraded for reference) against
  step into a PNG. Uses matplotlib when installed (or when `use_matplotlib`), else Pillow."""
  panels = [('training loss', [('loss', *_series(records, 'train', 'loss'))]),
            ('validation PSNR (dB)', [('restored', *_series(records, 'val', 'psnr')),
                                      ('degraded', *_series(records, 'val', 'psnr_degraded'))])]
  if use_matplotlib is None:
    try:
      import matplotlib  # noqa: F401
      use_matplotlib = True
    except ImportError:
      use_matplotlib = False
  partial = f'{path}.partial.png'
  try:
    if use_matplotlib:
      _plot_matplotlib(panels, partial)
    else:
      _plot_pillow(panels, partial)
    os.replace(partial, path)  # readers never see a half-written image
  except BaseException:
    # A full disk or an interrupt: no half-written picture left beside the last good one.
    with contextlib.suppress(OSError):
      os.remove(partial)
    raise


def _plot_matplotlib(panels, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg', force=False)
  from matplotlib.figure import Figure  # a Figure, not pyplot: no global state, no GUI

  fig = Figure(figsize=(10, 4), dpi=100)
  for i, (title, series) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for label, xs, ys in series:
      if xs:
        ax.plot(xs, ys, label=label, marker='o' if len(xs) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if len(series) > 1 and any(xs for _, xs, _ in series):
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, format='png')


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]


def _plot_pillow(panels, path: str) -> None:
  width, height, margin = 500, 400, 50
  image = Image.new('RGB', (width * len(panels), height), 'white')
  draw = ImageDraw.Draw(image)
  for p, (title, series) in enumerate(panels):
    x0, x1 = p * width + margin, (p + 1) * width - 20
    y0, y1 = 30, height - margin
    draw.text((x0, 10), title, fill='black')
    draw.rectangle([x0, y0, x1, y1], outline='black')
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys)]
    if not points:
      continue
    xmin, xmax = min(x for x, _ in points), max(x for x, _ in points)
    ymin, ymax = min(y for _, y in points), max(y for _, y in points)
    xspan, yspan = (xmax - xmin) or 1, (ymax - ymin) or 1
    draw.text((x0, y1 + 5), f'{xmin}', fill='black')
    draw.text((x1 - 40, y1 + 5), f'step {xmax}', fill='black')
    draw.text((x0 - 45, y0), f'{ymax:.3g}', fill='black')
    draw.text((x0 - 45, y1 - 10), f'{ymin:.3g}', fill='black')
    for s, (label, xs, ys) in enumerate(series):
      colour = _COLOURS[s % len(_COLOURS)]
      pixels = [(x0 + (x - xmin) / xspan * (x1 - x0), y1 - (y - ymin) / yspan * (y1 - y0))
                for x, y in zip(xs, ys)]
      if len(pixels) > 1:
        draw.line(pixels, fill=colour, width=2)
      for px, py in pixels if len(pixels) < 30 else ():
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
      if len(series) > 1:
        draw.text((x1 - 90, y0 + 5 + 12 * s), label, fill=colour)
  image.save(path, format='PNG')


class MetricsLogger:
  """Writes the run's metrics and pictures under `workdir` (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._writer = None
    self._records: list[dict] = []
    if not enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self.metrics_path = os.path.join(self.workdir, 'metrics.jsonl')
    if os.path.exists(self.metrics_path):  # a resumed run: keep the earlier curve
      self._records = read_metrics(self.metrics_path)
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(os.path.join(self.workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (written after the checkpoint a resumed run restarts from),
    so the resumed run's records do not appear twice."""
    if not self.enabled:
      return
    kept = [r for r in self._records if r.get('step', 0) <= step]
    if len(kept) != len(self._records):
      self._records = kept
      with open(self.metrics_path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)

  def write(self, step: int, split: str, metrics: Mapping[str, object]) -> None:
    """Appends one record and the matching TensorBoard scalars (`<split>/<name>`)."""
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    self._records.append(record)
    with open(self.metrics_path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      # metrics.jsonl keeps a NaN loss; TensorBoard would only warn about it, once per value.
      if key not in ('step', 'split') and math.isfinite(value):
        self._writer.add_scalar(f'{split}/{key}', value, int(step))

  def write_images(self, step: int, degraded: np.ndarray, restored: np.ndarray,
                   clean: np.ndarray) -> str | None:
    """Saves the validation grid as `images/val_<step>.png` and in TensorBoard; returns the
    PNG's path. Also redraws `curves.png`."""
    if not self.enabled:
      return None
    grid = image_grid(degraded, restored, clean)
    folder = os.path.join(self.workdir, 'images')
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'val_{int(step):07d}.png')
    Image.fromarray(grid).save(path)
    self._writer.add_image('val/degraded_restored_clean', grid, int(step), dataformats='HWC')
    self.plot()
    return path

  def plot(self) -> None:
    if self.enabled:
      plot_curves(self._records, os.path.join(self.workdir, 'curves.png'))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self.plot()
      self._writer.close()
      self._writer = None

"""What a training run leaves in its workdir for people to read: metrics, curves, images.

- `metrics.jsonl`: one JSON object per line, {'step', 'split': 'train'|'val', ...numbers}.
- `tensorboard/`: event files (tensorboardX, no TensorFlow): scalars, and the validation grid.
- `curves.png`: training loss and validation PSNR against step, redrawn at each validation.
- `images/val_<step>.png`: a grid with one column per validation image and three rows,
  degraded | restored | clean.

A workdir in a bucket (`gs://...`) gets the same files. Objects there cannot be appended to,
so they are written to a local mirror (a temporary folder) and each changed file is uploaded
whole by a background thread (the training loop never waits on the network), and once more at
`close`; a resumed run first brings the earlier `metrics.jsonl` down.

Only the main process writes (`MetricsLogger(..., enabled=jax.process_index() == 0)`); on the
others every method does nothing, so callers need no `if`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mprnet_jax import storage

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


class _BucketMirror:
  """A local folder whose changed files are uploaded, whole, to a folder URL.

  `changed(name)` queues a file (a path relative to the folder); a background thread uploads
  the queued files, each once however often it changed meanwhile. Files are read under `lock`,
  which writers that append hold, so no upload carries a torn line. `close()` drains the queue,
  uploads whatever is still unsent, and removes the local folder unless an upload failed (then
  one warning line says where the files are)."""

  def __init__(self, url: str):
    self.url = url.rstrip('/')
    storage.require_bucket(self.url)
    self.local = tempfile.mkdtemp(prefix='mprnet-logs-')
    self.lock = threading.Lock()
    self._queued: set[str] = set()
    self._unsent: set[str] = set()
    self._error: BaseException | None = None
    self._closing = False
    self._wake = threading.Condition()
    self._thread = threading.Thread(target=self._run, name='mprnet-log-upload', daemon=True)
    self._thread.start()

  def fetch(self, name: str) -> None:
    """Brings `url/name` down into the mirror, if the bucket has it."""
    url = storage.join(self.url, name)
    if storage.exists(url):
      target = os.path.join(self.local, name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, 'w') as f:
        f.write(storage.read_text(url))

  def changed(self, *names: str) -> None:
    with self._wake:
      self._queued.update(names)
      self._unsent.update(names)
      self._wake.notify()

  def _send(self, name: str) -> None:
    with self.lock:
      with open(os.path.join(self.local, name), 'rb') as f:
        data = f.read()
    storage.write_bytes(storage.join(self.url, name), data)

  def _run(self) -> None:
    while True:
      with self._wake:
        while not self._queued and not self._closing:
          self._wake.wait()
        if not self._queued:
          return
        names, self._queued = sorted(self._queued), set()
      for name in names:
        try:
          self._send(name)
          with self._wake:
            if name not in self._queued:
              self._unsent.discard(name)
        except Exception as error:  # noqa: BLE001 (retried at close, reported there)
          self._error = error

  def close(self) -> None:
    with self._wake:
      self._closing = True
      self._wake.notify()
    self._thread.join()
    try:
      for name in sorted(self._unsent):
        self._send(name)
      self._unsent.clear()
    except Exception as error:  # noqa: BLE001 (the run itself is done and checkpointed)
      reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      print(
          f'warning: could not upload the training logs to {self.url} ({reason}); they are in '
          f'{self.local}', file=sys.stderr, flush=True)
      return
    shutil.rmtree(self.local, ignore_errors=True)


class MetricsLogger:
  """Writes the run's metrics and pictures under `workdir` (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._writer = None
    self._mirror: _BucketMirror | None = None
    self._records: list[dict] = []
    if not enabled:
      return
    if storage.is_remote(self.workdir):
      self._mirror = _BucketMirror(self.workdir)
      self._mirror.fetch('metrics.jsonl')  # a resumed run: the earlier curve is in the bucket
      self.workdir = self._mirror.local  # everything below writes there
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
      with self._mirror.lock if self._mirror else contextlib.nullcontext():
        with open(self.metrics_path, 'w') as f:
          f.writelines(json.dumps(r) + '\n' for r in kept)
      self._changed('metrics.jsonl')

  def _changed(self, *names: str) -> None:
    """For a bucket workdir: queues the files just written (and TensorBoard's) for upload."""
    if self._mirror is None:
      return
    self._writer.flush()
    self._mirror.changed(*names, *self._tensorboard_files())

  def _tensorboard_files(self) -> list[str]:
    """The event files, relative to the workdir (TensorBoard appends to them as it writes)."""
    events = os.path.join(self.workdir, 'tensorboard')
    return [
        os.path.relpath(os.path.join(folder, f), self.workdir)
        for folder, _, files in os.walk(events)
        for f in files
    ]

  def write(self, step: int, split: str, metrics: Mapping[str, object]) -> None:
    """Appends one record and the matching TensorBoard scalars (`<split>/<name>`)."""
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    self._records.append(record)
    with self._mirror.lock if self._mirror else contextlib.nullcontext():
      with open(self.metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      # metrics.jsonl keeps a NaN loss; TensorBoard would only warn about it, once per value.
      if key not in ('step', 'split') and math.isfinite(value):
        self._writer.add_scalar(f'{split}/{key}', value, int(step))
    self._changed('metrics.jsonl')

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
    self._changed(os.path.relpath(path, self.workdir))
    if self._mirror is not None:
      return storage.join(self._mirror.url, os.path.relpath(path, self.workdir))
    return path

  def plot(self) -> None:
    if self.enabled:
      plot_curves(self._records, os.path.join(self.workdir, 'curves.png'))
      if self._mirror is not None:
        self._changed('curves.png')

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self.plot()
      self._writer.close()
      self._writer = None
    if self._mirror is not None:
      mirror, self._mirror = self._mirror, None
      mirror.changed(*self._tensorboard_files())
      mirror.close()

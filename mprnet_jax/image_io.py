"""Reading and writing images for restoration: float32 (H, W, 3) in [0, 1] in, the same out.

The network sees RGB only, so grayscale is replicated to three channels and an alpha channel is
set aside; `ImageInfo` remembers both, and `write_image` writes the result back in the input's
bit depth and mode. Backends: tifffile for TIFF, Pillow for everything else, except 16-bit
colour PNG, which Pillow silently reads as 8-bit: that is decoded here (by imagecodecs when it
is installed, else by a small NumPy PNG decoder) and encoded here (zlib).

Every decoder is asked for the image's size first, and an image of more than `max_pixels()`
pixels (default 100 million; `MPRNET_MAX_PIXELS` or `--max-pixels` raises it) is refused before
any pixel is decoded: a few kilobytes of compressed PNG can claim gigabytes of pixels. EXIF
orientation (JPEG, PNG, WebP, TIFF tag 274) is applied on read, so images come out as photo
viewers show them, and are written upright without an orientation tag.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from mprnet_jax.errors import ImageError
from mprnet_jax.files import atomic_output, require_regular_file

try:  # optional: a fast 16-bit PNG decoder; the NumPy fallback below is exact but slow
  import imagecodecs
except ImportError:  # pragma: no cover - depends on the environment
  imagecodecs = None

__all__ = [
    'ImageError', 'ImageInfo', 'read_image', 'read_size', 'write_image', 'list_images',
    'IMAGE_SUFFIXES', 'max_pixels', 'MAX_PIXELS_ENV', 'DEFAULT_MAX_PIXELS'
]

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
_WRITE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

# 100 megapixels: above any common camera (a 61 MP frame decodes to 0.7 GiB as float32 RGB).
DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = 'MPRNET_MAX_PIXELS'
_ORIENTATION_TAG = 0x0112  # EXIF/TIFF tag 274


def max_pixels() -> int:
  """The largest image (height x width) read: $MPRNET_MAX_PIXELS, else DEFAULT_MAX_PIXELS.
  Read at each call, so the command line's --max-pixels (which sets the variable) and worker
  processes see the same limit."""
  value = os.environ.get(MAX_PIXELS_ENV)
  if value is None or value == '':
    return DEFAULT_MAX_PIXELS
  try:
    limit = int(value)
  except ValueError:
    limit = 0
  if limit < 1:
    raise ImageError(f'{MAX_PIXELS_ENV}={value!r}: expected a positive whole number of pixels')
  return limit


def _check_pixels(path, height: int, width: int) -> None:
  """Refuses an image whose header claims more pixels than max_pixels(), before decoding."""
  limit = max_pixels()
  if height * width > limit:
    raise ImageError(f'{path}: {height}x{width} image has {height * width:,} pixels, more than '
                     f'the limit of {limit:,} (raise it with --max-pixels or {MAX_PIXELS_ENV})')


def _orient(array: np.ndarray, orientation) -> np.ndarray:
  """Applies an EXIF orientation (1-8) to (H, W[, C]): the image as a viewer shows it."""
  if orientation in (2, 4, 5, 7):  # the mirrored ones
    array = array[:, ::-1] if orientation in (2, 5) else array[::-1]
  if orientation in (3, 4):
    array = array[::-1, ::-1]
  elif orientation in (5, 6):
    array = np.rot90(array, -1)  # 90 degrees clockwise
  elif orientation in (7, 8):
    array = np.rot90(array, 1)  # 90 degrees counter-clockwise
  return np.ascontiguousarray(array)


def _pillow_open(path: Path) -> Image.Image:
  """Image.open with our pixel limit in place of Pillow's (which would warn above 89 MP and
  refuse above 179 MP whatever --max-pixels says)."""
  limit = max_pixels()
  if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
    Image.MAX_IMAGE_PIXELS = limit
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    try:
      image = Image.open(path)
    except Image.DecompressionBombError:
      raise ImageError(f'{path}: more pixels than the limit of {limit:,} (raise it with '
                       f'--max-pixels or {MAX_PIXELS_ENV})') from None
  return image


def _pillow_orientation(image: Image.Image) -> int:
  try:
    return int(image.getexif().get(_ORIENTATION_TAG, 1))
  except Exception:  # noqa: BLE001 - a broken EXIF block: show the pixels as stored
    return 1


@dataclasses.dataclass(eq=False)
class ImageInfo:
  """What `read_image` changed, so `write_image` can undo it.

  bit_depth: 8 or 16 (integer samples), or 32 for a float TIFF (values in [0, 1]).
  mode: 'rgb', 'gray' (replicated to 3 channels on read) or 'rgba' (alpha set aside).
  alpha: (H, W) float32 in [0, 1] for 'rgba', else None.
  shape: the array shape as stored in the file, e.g. (H, W) or (H, W, 4).
  """

  bit_depth: int
  mode: str
  alpha: np.ndarray | None
  shape: tuple[int, ...]


def _png_header(path: Path) -> tuple[int, int, int, int] | None:
  """(bit depth, colour type, height, width) from a PNG's IHDR, or None if not a PNG."""
  with open(path, 'rb') as handle:
    head = handle.read(26)
  if len(head) < 26 or not head.startswith(_PNG_SIGNATURE):
    return None
  width, height = struct.unpack('>II', head[16:24])
  return head[24], head[25], height, width


def _unfilter_rows(raw: bytes, height: int, row_bytes: int, bpp: int) -> np.ndarray:
  """Undo PNG's per-row filters (RFC 2083, section 6): -> (height, row_bytes) uint8."""
  out = np.zeros((height, row_bytes), np.uint8)
  previous = np.zeros(row_bytes, np.uint8)
  stride = row_bytes + 1
  for row in range(height):
    kind = raw[row * stride]
    line = np.frombuffer(raw, np.uint8, row_bytes, row * stride + 1).copy()
    if kind == 1:  # Sub: a running sum per byte lane, which uint8 cumsum does modulo 256
      line = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    elif kind == 2:  # Up
      line = line + previous
    elif kind in (3, 4):  # Average and Paeth depend on the decoded left byte: sequential
      cur, up = line.tolist(), previous.tolist()
      for i in range(row_bytes):
        left = cur[i - bpp] if i >= bpp else 0
        if kind == 3:
          cur[i] = (cur[i] + ((left + up[i]) >> 1)) & 0xFF
        else:
          up_left = up[i - bpp] if i >= bpp else 0
          p = left + up[i] - up_left
          pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - up_left)
          pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else up_left)
          cur[i] = (cur[i] + pred) & 0xFF
      line = np.array(cur, np.uint8)
    elif kind != 0:
      raise ValueError(f'bad PNG filter type {kind}')
    out[row] = previous = line
  return out


def _decode_png(data: bytes) -> np.ndarray:
  """Decode a non-interlaced 8/16-bit gray/RGB/gray-alpha/RGBA PNG -> (H, W[, C]) array."""
  if not data.startswith(_PNG_SIGNATURE):
    raise ValueError('not a PNG')
  offset, idat, header = 8, [], None
  while offset + 8 <= len(data):
    (length,), kind = struct.unpack('>I', data[offset:offset + 4]), data[offset + 4:offset + 8]
    body = data[offset + 8:offset + 8 + length]
    if kind == b'IHDR':
      header = struct.unpack('>IIBBBBB', body)
    elif kind == b'IDAT':
      idat.append(body)
    elif kind == b'IEND':
      break
    offset += 12 + length
  if header is None:
    raise ValueError('PNG without IHDR')
  width, height, depth, colour, _, _, interlace = header
  channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
  if channels is None or depth not in (8, 16) or interlace:
    raise ValueError(
        f'unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace})')
  bpp = channels * depth // 8
  expected = height * (width * bpp + 1)
  # Inflate no more than the header's size needs: IDAT may be a zlib bomb.
  raw = zlib.decompressobj().decompress(b''.join(idat), expected)
  if len(raw) < expected:
    raise ValueError(f'PNG data truncated ({len(raw)} of {expected} bytes)')
  rows = _unfilter_rows(raw, height, width * bpp, bpp)
  pixels = rows.view('>u2').astype(np.uint16) if depth == 16 else rows
  return pixels.reshape((height, width, channels) if channels > 1 else (height, width))


def _encode_png16(array: np.ndarray) -> bytes:
  """Encode (H, W, 3|4) uint16 as PNG, 'Up' filter on every row (vectorised; compresses)."""
  height, width, channels = array.shape
  rows = array.astype('>u2').view(np.uint8).reshape(height, width * channels * 2)
  filtered = rows - np.vstack([np.zeros_like(rows[:1]), rows[:-1]])  # uint8 wraps mod 256
  raw = np.hstack([np.full((height, 1), 2, np.uint8), filtered]).tobytes()

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

  header = struct.pack('>IIBBBBB', width, height, 16, 2 if channels == 3 else 6, 0, 0, 0)
  return (_PNG_SIGNATURE + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw, 6)) +
          chunk(b'IEND', b''))


def _tiff_size(tif, path: Path) -> tuple[int, int, int]:
  """(height, width, orientation) of a single-page TIFF, from its tags (nothing decoded)."""
  if not tif.series or not len(tif.pages):
    raise ImageError(f'{path}: not a readable image (a TIFF without image data)')
  if len(tif.series) != 1 or len(tif.pages) != 1:
    raise ImageError(f'{path}: multi-page TIFF is not supported')
  series = tif.series[0]
  if 'Y' in series.axes and 'X' in series.axes:
    sizes = dict(zip(series.axes, series.shape))
    height, width = sizes['Y'], sizes['X']
  else:  # an unusual layout, refused after decoding; bound its size by all non-sample axes
    dims = [n for n, a in zip(series.shape, series.axes) if a != 'S'] + [1, 1]
    height, width = dims[0], int(np.prod(dims[1:]))
  tag = tif.pages[0].tags.get(274)
  orientation = int(tag.value) if tag is not None else 1
  return height, width, orientation


def _displayed(height: int, width: int, orientation: int) -> tuple[int, int]:
  return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _read_tiff(path: Path) -> np.ndarray:
  with tifffile.TiffFile(path) as tif:
    height, width, orientation = _tiff_size(tif, path)
    _check_pixels(path, height, width)
    series = tif.series[0]
    array = series.asarray()
    if series.axes.startswith('S'):  # planar storage: channels first
      array = np.moveaxis(array, 0, -1)
  return _orient(array, orientation)


def _read_pillow(path: Path) -> np.ndarray:
  header = _png_header(path)
  if header is not None and header[0] == 16 and header[1] in (2, 4, 6):
    _check_pixels(path, header[2], header[3])
    with _pillow_open(path) as image:  # the header only, for an eXIf orientation
      orientation = _pillow_orientation(image)
    data = path.read_bytes()  # Pillow would drop the low byte of these
    array = imagecodecs.png_decode(data) if imagecodecs is not None else _decode_png(data)
    return _orient(array, orientation)
  with _pillow_open(path) as image:
    _check_pixels(path, image.height, image.width)
    orientation = _pillow_orientation(image)
    return _orient(_pillow_pixels(image, path), orientation)


def _pillow_pixels(image: Image.Image, path: Path) -> np.ndarray:
  if image.mode == 'P':
    image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
  elif image.mode in ('1', 'LA', 'PA'):
    image = image.convert({'1': 'L', 'LA': 'RGBA', 'PA': 'RGBA'}[image.mode])
  elif image.mode == 'I' and image.format == 'PNG':
    return np.asarray(image).astype(np.uint16)
  if image.mode not in ('L', 'RGB', 'RGBA', 'I;16', 'I;16B'):
    raise ImageError(f'{path}: unsupported image mode {image.mode}')
  return np.asarray(image)


def read_size(path) -> tuple[int, int]:
  """(height, width) of an image file as `read_image` would return it (EXIF orientation
  applied), from its header only; ImageError for a non-regular, unreadable or too large file."""
  path = require_regular_file(path, ImageError, 'image file')
  try:
    if path.suffix.lower() in ('.tif', '.tiff'):
      with tifffile.TiffFile(path) as tif:
        height, width, orientation = _tiff_size(tif, path)
    else:
      with _pillow_open(path) as image:
        height, width, orientation = image.height, image.width, _pillow_orientation(image)
  except ImageError:
    raise
  except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt files
    raise ImageError(f'{path}: not a readable image ({type(exc).__name__}: {exc})') from None
  _check_pixels(path, height, width)
  return _displayed(height, width, orientation)


def read_image(path, *, warn: bool = True) -> tuple[np.ndarray, ImageInfo]:
  """Read an image file -> (float32 (H, W, 3) in [0, 1], ImageInfo).

  8-bit and 16-bit PNG / TIFF, JPEG, BMP; grayscale is replicated to 3 channels and the alpha
  of RGBA is set aside (each with a warning naming the file); palette images become RGB(A).
  A float TIFF is accepted if its values lie in [0, 1] (bit_depth 32). EXIF orientation is
  applied (the image as viewers show it). Raises ImageError for a missing, non-regular (FIFO,
  device), unreadable, empty or too large file (see `max_pixels`), or an unsupported layout
  (CMYK, multi-page, other channel counts). `warn=False` silences the notes on grayscale and
  alpha (for training data, read once per epoch).
  """
  path = require_regular_file(path, ImageError, 'image file')
  try:
    if path.suffix.lower() in ('.tif', '.tiff'):
      array = _read_tiff(path)
    else:
      array = _read_pillow(path)
  except ImageError:
    raise
  except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt files
    raise ImageError(f'{path}: not a readable image ({type(exc).__name__}: {exc})') from None
  shape = tuple(array.shape)
  if array.size == 0:
    raise ImageError(f'{path}: empty image, shape {shape}')
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  elif array.ndim == 3 and array.shape[-1] == 2:  # gray + alpha: handled as RGBA
    array = np.concatenate([np.repeat(array[..., :1], 3, axis=-1), array[..., 1:]], axis=-1)
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ImageError(f'{path}: unsupported layout, shape {shape} (need H x W [x 1|3|4])')

  if array.dtype == np.uint8:
    bit_depth, pixels = 8, array.astype(np.float32) / 255.0
  elif array.dtype == np.uint16:
    bit_depth, pixels = 16, array.astype(np.float32) / 65535.0
  elif array.dtype in (np.float32, np.float64):
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
      raise ImageError(f'{path}: float image with values outside [0, 1]')
    bit_depth, pixels = 32, array.astype(np.float32)
  else:
    raise ImageError(f'{path}: unsupported sample type {array.dtype}')

  alpha = None
  if pixels.ndim == 2:
    mode = 'gray'
    if warn:
      warnings.warn(f'{path}: grayscale image, replicated to 3 channels', stacklevel=2)
    pixels = np.repeat(pixels[..., None], 3, axis=-1)
  elif pixels.shape[-1] == 4:
    mode = 'rgba'
    if warn:
      warnings.warn(f'{path}: alpha channel set aside and re-attached on write', stacklevel=2)
    pixels, alpha = np.ascontiguousarray(pixels[..., :3]), np.ascontiguousarray(pixels[..., 3])
  else:
    mode = 'rgb'
  return pixels, ImageInfo(bit_depth=bit_depth, mode=mode, alpha=alpha, shape=shape)


def write_image(path, image, info: ImageInfo | None = None) -> None:
  """Write float (H, W, 3) in [0, 1] in the bit depth and mode of `info` (default 8-bit RGB).

  Values are clipped to [0, 1] and rounded to the nearest level. Format from the suffix
  (.png, .jpg/.jpeg at quality 95, .tif/.tiff). A 'gray' image is written as the mean of the
  three channels (the network saw the same value in each, so each is an estimate of it); an
  'rgba' one gets its alpha back. JPEG holds only 8 bits and no alpha; PNG no floats: such a
  request warns and writes what the format can hold.
  """
  path = Path(path)
  info = info or ImageInfo(bit_depth=8, mode='rgb', alpha=None, shape=())
  suffix = path.suffix.lower()
  if suffix not in _WRITE_SUFFIXES:
    allowed = ', '.join(_WRITE_SUFFIXES)
    raise ImageError(f'{path}: cannot write suffix {path.suffix!r} (use {allowed})')
  image = np.asarray(image, np.float32)
  if image.ndim != 3 or image.shape[-1] != 3 or image.size == 0:
    raise ImageError(f'{path}: expected a float (H, W, 3) image, got shape {image.shape}')
  if np.isnan(image).any():
    raise ImageError(f'{path}: image contains NaN')
  pixels = np.clip(image, 0.0, 1.0)
  if info.mode == 'gray':
    pixels = pixels.mean(axis=-1)
  elif info.mode == 'rgba':
    if info.alpha is None or info.alpha.shape != pixels.shape[:2]:
      raise ImageError(f'{path}: alpha channel missing or not of size {pixels.shape[:2]}')
    if suffix in ('.jpg', '.jpeg'):
      warnings.warn(f'{path}: JPEG has no alpha channel; alpha dropped', stacklevel=2)
    else:
      pixels = np.concatenate([pixels, np.clip(info.alpha, 0, 1)[..., None]], axis=-1)

  bit_depth = info.bit_depth
  if suffix in ('.jpg', '.jpeg') and bit_depth != 8:
    warnings.warn(f'{path}: JPEG holds 8 bits only; writing 8-bit', stacklevel=2)
    bit_depth = 8
  if suffix == '.png' and bit_depth == 32:
    warnings.warn(f'{path}: PNG holds no floats; writing 16-bit', stacklevel=2)
    bit_depth = 16

  if bit_depth == 32:
    samples = pixels.astype(np.float32)
  else:
    dtype, top = (np.uint8, 255.0) if bit_depth == 8 else (np.uint16, 65535.0)
    samples = np.rint(pixels * top).astype(dtype)
  try:
    # Under a temporary name, renamed when complete: never a truncated file under `path`.
    with atomic_output(path, ImageError) as temp:
      if suffix in ('.tif', '.tiff'):
        photometric = 'minisblack' if samples.ndim == 2 else 'rgb'
        extrasamples = ('unassalpha',) if samples.ndim == 3 and samples.shape[-1] == 4 else None
        tifffile.imwrite(temp, samples, photometric=photometric, extrasamples=extrasamples)
      elif samples.dtype == np.uint16 and samples.ndim == 3:
        temp.write_bytes(_encode_png16(samples))
      else:
        kwargs = {'quality': 95} if suffix in ('.jpg', '.jpeg') else {}
        Image.fromarray(samples).save(temp, **kwargs)
  except OSError as exc:
    raise ImageError(f'{path}: cannot write ({exc})') from None


def list_images(folder) -> list[Path]:
  """Image files directly in `folder` (known suffixes, any case), sorted by name."""
  folder = Path(folder)
  if not folder.is_dir():
    raise ImageError(f'{folder}: no such folder')
  found = sorted(
      p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
  if not found:
    raise ImageError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
  return found

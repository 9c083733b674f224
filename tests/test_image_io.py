"""Round trips through every supported format, and clear errors for bad files."""

import io
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import data as skdata

from mprnet_jax import image_io
from mprnet_jax.image_io import ImageError, ImageInfo, list_images, read_image, write_image


@pytest.fixture(scope='module')
def photo():
  """A real photograph at an odd size: (61, 83, 3) float32 on the 8-bit grid."""
  return (skdata.chelsea()[100:161, 150:233] / 255.0).astype(np.float32)


def _read_quiet(path):
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # an RGB file must not warn
    return read_image(path)


@pytest.mark.parametrize('suffix', ['.png', '.tif', '.TIFF'])
def test_8bit_rgb_round_trip_is_exact(tmp_path, photo, suffix):
  path = tmp_path / f'photo{suffix}'
  write_image(path, photo, ImageInfo(8, 'rgb', None, photo.shape))
  image, info = _read_quiet(path)
  assert image.dtype == np.float32 and image.shape == photo.shape
  assert (info.bit_depth, info.mode, info.shape) == (8, 'rgb', photo.shape)
  np.testing.assert_array_equal(np.rint(image * 255), np.rint(photo * 255))


@pytest.mark.parametrize('suffix', ['.png', '.tif'])
def test_16bit_rgb_round_trip_keeps_16_bits(tmp_path, suffix):
  levels = np.random.default_rng(0).integers(0, 65536, (13, 17, 3), dtype=np.uint16)
  path = tmp_path / f'deep{suffix}'
  write_image(path, levels / 65535.0, ImageInfo(16, 'rgb', None, levels.shape))
  image, info = _read_quiet(path)
  assert info.bit_depth == 16 and info.mode == 'rgb'
  np.testing.assert_array_equal(np.rint(image.astype(np.float64) * 65535).astype(np.uint16), levels)
  if suffix == '.png':  # and both 16-bit PNG decoders agree on it
    np.testing.assert_array_equal(image_io._decode_png(path.read_bytes()), levels)


def test_numpy_png_decoder_handles_every_filter(tmp_path, photo):
  # Pillow's encoder picks a filter per row adaptively; a photograph gets several kinds.
  path = tmp_path / 'filters.png'
  Image.fromarray(np.rint(photo * 255).astype(np.uint8)).save(path)
  data = path.read_bytes()
  np.testing.assert_array_equal(image_io._decode_png(data), np.asarray(Image.open(path)))
  start = data.index(b'IDAT') + 4
  raw = zlib.decompress(data[start:start + int.from_bytes(data[start - 8:start - 4], 'big')])
  row_bytes = photo.shape[1] * 3 + 1
  assert len({raw[i] for i in range(0, len(raw), row_bytes)}) >= 3


def test_jpeg_round_trip_within_tolerance_and_16bit_warns(tmp_path, photo):
  path = tmp_path / 'photo.jpg'
  with pytest.warns(UserWarning, match='8 bits'):
    write_image(path, photo, ImageInfo(16, 'rgb', None, photo.shape))
  image, info = _read_quiet(path)
  assert info.bit_depth == 8 and image.shape == photo.shape
  assert np.abs(image - photo).mean() < 0.02


@pytest.mark.parametrize('bits, suffix', [(8, '.png'), (16, '.png'), (8, '.tif'), (16, '.tiff')])
def test_gray_is_replicated_and_written_back_gray(tmp_path, bits, suffix):
  dtype, top = (np.uint8, 255) if bits == 8 else (np.uint16, 65535)
  gray = np.random.default_rng(1).integers(0, top + 1, (9, 14), dtype=dtype)
  path = tmp_path / f'gray{suffix}'
  if suffix == '.png':
    Image.fromarray(gray).save(path)
  else:
    tifffile.imwrite(path, gray)
  with pytest.warns(UserWarning, match=f'{path.name}.*grayscale'):
    image, info = read_image(path)
  assert image.shape == (9, 14, 3) and (info.mode, info.bit_depth) == ('gray', bits)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  out = tmp_path / f'out{suffix}'
  write_image(out, image, info)
  stored = np.asarray(Image.open(out)) if suffix == '.png' else tifffile.imread(out)
  np.testing.assert_array_equal(stored, gray)


@pytest.mark.parametrize('bits, suffix', [(8, '.png'), (16, '.png'), (8, '.tif')])
def test_rgba_alpha_is_set_aside_and_reattached(tmp_path, bits, suffix):
  dtype, top = (np.uint8, 255) if bits == 8 else (np.uint16, 65535)
  rgba = np.random.default_rng(2).integers(0, top + 1, (11, 7, 4), dtype=dtype)
  path = tmp_path / f'rgba{suffix}'
  if bits == 16:
    path.write_bytes(image_io._encode_png16(rgba))
  elif suffix == '.png':
    Image.fromarray(rgba).save(path)
  else:
    tifffile.imwrite(path, rgba, photometric='rgb', extrasamples=('unassalpha',))
  with pytest.warns(UserWarning, match=f'{path.name}.*alpha'):
    image, info = read_image(path)
  assert image.shape == (11, 7, 3) and info.mode == 'rgba' and info.alpha.shape == (11, 7)
  out = tmp_path / f'out{suffix}'
  write_image(out, image, info)
  with pytest.warns(UserWarning, match='alpha'):
    again, _ = read_image(out)
  np.testing.assert_array_equal(np.rint(again * top), rgba[..., :3])
  stored = tifffile.imread(out) if suffix == '.tif' else image_io._decode_png(out.read_bytes())
  np.testing.assert_array_equal(stored, rgba)


def test_write_rounds_and_clips(tmp_path):
  image = np.array([[[0.4 / 255, 0.6 / 255, 1.7], [-0.2, 254.5001 / 255, 0.5]]], np.float32)
  path = tmp_path / 'round.png'
  write_image(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), [[[0, 1, 255], [0, 255, 128]]])


def test_float_tiff_in_unit_range_is_accepted(tmp_path):
  values = np.random.default_rng(3).random((8, 9, 3)).astype(np.float32)
  tifffile.imwrite(tmp_path / 'f.tif', values, photometric='rgb')
  image, info = _read_quiet(tmp_path / 'f.tif')
  assert info.bit_depth == 32
  np.testing.assert_array_equal(image, values)
  write_image(tmp_path / 'g.tif', image, info)
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'g.tif'), values)
  tifffile.imwrite(tmp_path / 'hot.tif', values * 3, photometric='rgb')
  with pytest.raises(ImageError, match=r'hot\.tif.*outside \[0, 1\]'):
    read_image(tmp_path / 'hot.tif')


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(ImageError, match=r'missing\.png: no such file'):
    read_image(tmp_path / 'missing.png')
  (tmp_path / 'text.png').write_text('not an image')
  with pytest.raises(ImageError, match=r'text\.png: not a readable image'):
    read_image(tmp_path / 'text.png')
  (tmp_path / 'broken.tif').write_bytes(b'II*\x00garbage')
  with pytest.raises(ImageError, match=r'broken\.tif: not a readable image'):
    read_image(tmp_path / 'broken.tif')
  Image.new('CMYK', (4, 4)).save(tmp_path / 'cmyk.jpg')
  with pytest.raises(ImageError, match=r'cmyk\.jpg: unsupported image mode CMYK'):
    read_image(tmp_path / 'cmyk.jpg')
  with pytest.warns(UserWarning, match='zero-size'):
    tifffile.imwrite(tmp_path / 'empty.tif', np.zeros((0, 5, 3), np.uint8))
  with pytest.raises(ImageError, match=r'empty\.tif: empty image'):
    read_image(tmp_path / 'empty.tif')
  tifffile.imwrite(tmp_path / 'five.tif', np.zeros((4, 5, 5), np.uint8), photometric='minisblack',
                   planarconfig='contig')
  with pytest.raises(ImageError, match=r'five\.tif: unsupported layout'):
    read_image(tmp_path / 'five.tif')
  with pytest.raises(ImageError, match=r'out\.gif: cannot write'):
    write_image(tmp_path / 'out.gif', np.zeros((4, 4, 3)))
  with pytest.raises(ImageError, match=r'out\.png: expected a float \(H, W, 3\)'):
    write_image(tmp_path / 'out.png', np.zeros((4, 4)))


def test_truncated_png_is_an_image_error(tmp_path, photo):
  path = tmp_path / 'full.png'
  write_image(path, photo)
  (tmp_path / 'cut.png').write_bytes(path.read_bytes()[:300])
  with pytest.raises(ImageError, match=r'cut\.png: not a readable image'):
    read_image(tmp_path / 'cut.png')


def test_16bit_png_without_imagecodecs(tmp_path, monkeypatch):
  levels = np.random.default_rng(4).integers(0, 65536, (5, 6, 3), dtype=np.uint16)
  (tmp_path / 'deep.png').write_bytes(image_io._encode_png16(levels))
  monkeypatch.setattr(image_io, 'imagecodecs', None)
  image, info = _read_quiet(tmp_path / 'deep.png')
  assert info.bit_depth == 16
  np.testing.assert_array_equal(np.rint(image.astype(np.float64) * 65535), levels)


def test_palette_png_becomes_rgb(tmp_path):
  Image.new('P', (6, 5), color=3).save(tmp_path / 'pal.png')
  image, info = _read_quiet(tmp_path / 'pal.png')
  assert image.shape == (5, 6, 3) and info.mode == 'rgb'


def test_list_images_sorted_by_known_suffix(tmp_path):
  for name in ['b.PNG', 'a.jpg', 'c.TIF', 'notes.txt', 'd.jpeg']:
    (tmp_path / name).write_bytes(b'')
  (tmp_path / 'sub.png').mkdir()
  assert [p.name for p in list_images(tmp_path)] == ['a.jpg', 'b.PNG', 'c.TIF', 'd.jpeg']
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ImageError, match='empty: no images'):
    list_images(tmp_path / 'empty')
  with pytest.raises(ImageError, match='nowhere: no such folder'):
    list_images(tmp_path / 'nowhere')


def test_jpeg_bytes_are_not_mistaken_for_png(tmp_path, photo):
  buffer = io.BytesIO()
  Image.fromarray(np.rint(photo * 255).astype(np.uint8)).save(buffer, format='JPEG')
  (tmp_path / 'misnamed.png').write_bytes(buffer.getvalue())
  image, info = _read_quiet(tmp_path / 'misnamed.png')
  assert image.shape == photo.shape and info.bit_depth == 8


# ---- pixel limit, EXIF orientation, one reader -------------------------------------------
_DECODERS = {  # (suffix, writer of a 20 x 30 image): every decoder and bit depth
    'png8': ('.png', lambda p, a: Image.fromarray(a).save(p)),
    'png16_rgb': ('.png', lambda p, a: write_image(p, a / 255.0, ImageInfo(16, 'rgb', None, ()))),
    'png16_gray': ('.png', lambda p, a: Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(p)),
    'jpeg': ('.jpg', lambda p, a: Image.fromarray(a).save(p)),
    'bmp': ('.bmp', lambda p, a: Image.fromarray(a).save(p)),
    'tiff8': ('.tif', lambda p, a: tifffile.imwrite(p, a)),
    'tiff16': ('.tif', lambda p, a: tifffile.imwrite(p, a.astype(np.uint16) * 257)),
    'tiff_float': ('.tif', lambda p, a: tifffile.imwrite(p, a.astype(np.float32) / 255,
                                                      photometric='rgb')),
}


@pytest.mark.parametrize('kind', list(_DECODERS))
def test_pixel_limit_is_checked_from_the_header_for_every_decoder(tmp_path, monkeypatch, kind):
  suffix, write = _DECODERS[kind]
  path = tmp_path / f'{kind}{suffix}'
  write(path, np.full((20, 30, 3), 100, np.uint8))
  monkeypatch.setenv(image_io.MAX_PIXELS_ENV, '599')  # one pixel fewer than 20 x 30
  decoded = []
  monkeypatch.setattr(image_io, '_decode_png', lambda data: decoded.append(1))
  for reader in (read_image, image_io.read_size):
    with pytest.raises(ImageError) as error:
      reader(path)
    message = str(error.value)
    assert str(path) in message and 'limit of 599' in message and image_io.MAX_PIXELS_ENV in message
    assert '\n' not in message
  assert not decoded  # refused before decoding
  monkeypatch.undo()  # the real PNG decoder back
  monkeypatch.setenv(image_io.MAX_PIXELS_ENV, '600')
  assert read_image(path, warn=False)[0].shape == (20, 30, 3)
  assert image_io.read_size(path) == (20, 30)


def test_pixel_limit_default_and_bad_values(monkeypatch):
  monkeypatch.delenv(image_io.MAX_PIXELS_ENV, raising=False)
  assert image_io.max_pixels() == image_io.DEFAULT_MAX_PIXELS == 100_000_000
  for bad in ('0', '-5', 'lots'):
    monkeypatch.setenv(image_io.MAX_PIXELS_ENV, bad)
    with pytest.raises(ImageError, match=image_io.MAX_PIXELS_ENV):
      image_io.max_pixels()


def test_a_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
  """Pillow refuses above 2 x Image.MAX_IMAGE_PIXELS whatever we say; --max-pixels wins."""
  path = tmp_path / 'wide.png'
  Image.fromarray(np.zeros((4, 500), np.uint8)).save(path)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)
  monkeypatch.setenv(image_io.MAX_PIXELS_ENV, '2000')
  assert read_image(path, warn=False)[0].shape == (4, 500, 3)


# EXIF orientation -> what a viewer shows, stated per the EXIF standard for a stored image s:
# 3: rotate 180; 6: rotate 90 degrees clockwise; 8: 90 counter-clockwise; 2: mirror left-right.
_VIEWED = {
    1: lambda s: s, 2: lambda s: s[:, ::-1], 3: lambda s: s[::-1, ::-1],
    6: lambda s: np.rot90(s, -1), 8: lambda s: np.rot90(s, 1)
}


@pytest.mark.parametrize('orientation', list(_VIEWED))
@pytest.mark.parametrize('suffix', ['.png', '.jpg', '.tif'])
def test_exif_orientation_is_applied_on_read(tmp_path, photo, orientation, suffix):
  stored = np.rint(photo[:40, :56] * 255).astype(np.uint8)  # not square: rotation shows
  path = tmp_path / f'o{orientation}{suffix}'
  if suffix == '.tif':
    tifffile.imwrite(path, stored, extratags=[(274, 'H', 1, orientation, True)])
  else:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, **({'quality': 100} if suffix == '.jpg' else {}))
  with Image.open(path) as raw:  # the pixels as stored, decoded by the same library
    as_stored = np.asarray(raw.convert('RGB')) if suffix != '.tif' else tifffile.imread(path)
  pixels, _ = read_image(path)
  expected = _VIEWED[orientation](as_stored).astype(np.float32) / 255
  np.testing.assert_array_equal(pixels, expected)
  assert image_io.read_size(path) == expected.shape[:2]


def test_exif_orientation_applies_to_16bit_png(tmp_path):
  stored = (np.arange(6 * 10 * 3, dtype=np.uint16) * 211).reshape(6, 10, 3)
  path = tmp_path / 'o6.png'
  write_image(path, stored / 65535.0, ImageInfo(16, 'rgb', None, ()))
  exif = Image.Exif()  # the same 16-bit data, with an eXIf chunk inserted
  exif[0x0112] = 6
  data = path.read_bytes()
  body = exif.tobytes()
  chunk = (len(body).to_bytes(4, 'big') + b'eXIf' + body +
           zlib.crc32(b'eXIf' + body).to_bytes(4, 'big'))
  path.write_bytes(data[:33] + chunk + data[33:])  # after the 33-byte signature + IHDR
  pixels, info = read_image(path)
  assert info.bit_depth == 16
  np.testing.assert_array_equal(np.rint(pixels * 65535).astype(np.uint16), np.rot90(stored, -1))


def test_training_reader_is_the_same_reader(tmp_path):
  """data.load_rgb goes through read_image: the same extensions, EXIF orientation, and a
  16-bit file rounded to the nearest 8-bit level (Pillow alone truncates it)."""
  from mprnet_jax import data
  assert data.IMAGE_EXTENSIONS is image_io.IMAGE_SUFFIXES
  levels = np.array([[[0, 128, 383], [65535, 32895, 200]]], np.uint16)  # 383/257 = 1.49
  path = tmp_path / 'deep.png'
  write_image(path, levels / 65535.0, ImageInfo(16, 'rgb', None, ()))
  np.testing.assert_array_equal(data.load_rgb(str(path)), np.rint(levels / 257).astype(np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 8
  Image.fromarray(np.arange(2 * 3 * 3,
                            dtype=np.uint8).reshape(2, 3, 3)).save(tmp_path / 'turned.png',
                                                                   exif=exif)
  assert data.load_rgb(str(tmp_path / 'turned.png')).shape == (3, 2, 3)


def test_interrupted_write_leaves_the_old_file_whole(tmp_path, photo, monkeypatch):
  path = tmp_path / 'keep.tif'
  write_image(path, photo)
  before = path.read_bytes()

  def half_write(target, data, **_):
    with open(target, 'wb') as f:
      f.write(b'II*\x00 half')
    raise OSError('disk full')

  monkeypatch.setattr(tifffile, 'imwrite', half_write)
  with pytest.raises(ImageError, match='keep.tif: cannot write'):
    write_image(path, photo[::-1])
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.tif']


def test_non_regular_file_is_refused_without_blocking(tmp_path):
  import os
  fifo = tmp_path / 'pipe.png'
  os.mkfifo(fifo)
  for reader in (read_image, image_io.read_size):
    with pytest.raises(ImageError, match=r'pipe\.png: is a FIFO'):
      reader(fifo)

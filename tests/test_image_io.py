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
  raw = zlib.decompress(data[start : start + int.from_bytes(data[start - 8 : start - 4], 'big')])
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

"""Hostile and broken files (issue #10): each is built here, and each command line case runs in
one child process under a memory cap (RLIMIT_AS) with a per-case alarm, so a file that would
exhaust memory or block forever fails the test instead of taking the machine down. Every case
must end with exit status 2 and one line `mprnet <command>: error: ...` naming the file.

Cases where memory is not the point (shapes, NaN weights, outputs over inputs) run in-process.
"""

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from mprnet_jax.cli import main
from mprnet_jax.conversion import from_pytorch, unwrap_state_dict
from mprnet_jax.errors import CheckpointError
from mprnet_jax.torch_format import load_pth

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity

TINY = FIXTURES / 'tiny.pth'
ROOT = Path(__file__).resolve().parents[1]
CAP_GIB = 3  # JAX's CPU client and the tiny model's conversion fit in far less


# ---- building hostile files --------------------------------------------------------------
def _op_str(s):
  b = s.encode()
  return b'X' + struct.pack('<I', len(b)) + b


def _op_int(n):
  return b'J' + struct.pack('<i', n)


def _op_tuple(*parts):
  return b'(' + b''.join(parts) + b't'


def _op_global(module, name):
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _zip_pth(path, pkl, storages=(), compress=False):
  mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  with zipfile.ZipFile(path, 'w', mode, compresslevel=1 if compress else None) as zf:
    zf.writestr('ckpt/data.pkl', pkl)
    for key, data in storages:
      zf.writestr(f'ckpt/data/{key}', data)
  return path


def zip_bomb_pth(path, inflated=1 << 30):
  """A ~5 MB archive whose data.pkl (a valid pickle: one huge string) inflates to 1 GiB (zlib's
  fastest level: about 1 s to write instead of 4 s at level 9, for a 1 MB archive)."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
    with zf.open('ckpt/data.pkl', 'w', force_zip64=True) as entry:
      entry.write(b'\x80\x02X' + struct.pack('<I', inflated - 4))
      chunk = b'a' * (1 << 24)
      for _ in range((inflated - 4) // len(chunk)):
        entry.write(chunk)
      entry.write(b'.')
  return path


def _op_long(n):
  b = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(b)]) + b


def expanded_pth(path, side=16384, tensors=8):
  """`tensors` side x side complex128 tensors (4 GiB each by default) of stride 0 on one
  16-byte storage."""
  storage = (_op_str('storage') + _op_global('torch', 'ComplexDoubleStorage') + _op_str('0') +
             _op_str('cpu') + _op_int(1))
  tensor = (_op_global('torch._utils', '_rebuild_tensor_v2') + b'((' + storage + b'tQ' +
            _op_int(0) + _op_tuple(_op_long(side), _op_long(side)) +
            _op_tuple(_op_int(0), _op_int(0)) + b'\x89' + _op_global('collections', 'OrderedDict') +
            b')RtR')
  pkl = b'\x80\x02}(' + b''.join(_op_str(f'w{i}') + tensor for i in range(tensors)) + b'u.'
  return _zip_pth(path, pkl, [('0', b'\0' * 16)])


# A 139-byte-class pickle: an empty list memoised under index 0x20000000.
MEMO_PICKLE = b'\x80\x02]r' + struct.pack('<I', 0x20000000) + b'.'


def legacy_memo_pth(path):
  magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
  head = magic + pickle.dumps(1001, protocol=2) + pickle.dumps({'little_endian': True}, protocol=2)
  path.write_bytes(head + MEMO_PICKLE + pickle.dumps([], protocol=2))
  return path


def _png_chunk(kind, body):
  return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


def png_claiming(path, height, width, depth, colour, rows=None):
  """A PNG whose header claims height x width; IDAT holds `rows` rows (all of them if None)."""
  channels = {0: 1, 2: 3, 6: 4}[colour]
  row = b'\0' * (1 + width * channels * depth // 8)
  squeeze = zlib.compressobj(9)
  data = b''.join(squeeze.compress(row) for _ in range(height if rows is None else rows))
  data += squeeze.flush()
  header = struct.pack('>IIBBBBB', width, height, depth, colour, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header) + _png_chunk(b'IDAT', data) +
                   _png_chunk(b'IEND', b''))
  return path


# ---- the capped child -----------------------------------------------------------------
CHILD = textwrap.dedent('''
  import contextlib, io, json, resource, signal, sys
  import numpy as np
  cap = int(sys.argv[1]) << 30
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  try:
    np.ones(cap + (1 << 30), np.uint8)
    capped = False
  except MemoryError:
    capped = True
  from mprnet_jax.cli import main

  class Hung(Exception):
    pass

  def on_alarm(*_):
    raise Hung()

  signal.signal(signal.SIGALRM, on_alarm)
  results = {'capped': capped}
  for name, argv in json.loads(sys.argv[2]).items():
    err = io.StringIO()
    signal.alarm(int(sys.argv[3]))
    try:
      with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    except Hung:
      rc = 'hung'
    except BaseException as e:  # a traceback in real use
      rc = 'raised ' + type(e).__name__ + ': ' + str(e)[:200]
    finally:
      signal.alarm(0)
    results[name] = {'rc': rc, 'stderr': err.getvalue()}
  print(json.dumps(results))
''')


@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
  """Builds every hostile file, runs every command line case in one capped child."""
  d = tmp_path_factory.mktemp('hostile')
  weights = d / 'tiny.safetensors'
  assert main(['convert', str(TINY), str(weights)]) == 0
  good = d / 'good.png'
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
  fifo = d / 'pipe.pth'
  os.mkfifo(fifo)
  fifo_png = d / 'pipe.png'
  os.mkfifo(fifo_png)
  fifo_weights = d / 'pipe.safetensors'
  os.mkfifo(fifo_weights)
  for sub in ('huge', 'fifo'):
    for part in ('input', 'target'):
      (d / sub / part).mkdir(parents=True)
  png_claiming(d / 'huge' / 'input' / 'x.png', 50000, 50000, 8, 2, rows=1)
  png_claiming(d / 'huge' / 'target' / 'x.png', 50000, 50000, 8, 2, rows=1)
  os.mkfifo(d / 'fifo' / 'input' / 'x.png')
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / 'fifo' / 'target' / 'x.png')
  png16 = png_claiming(d / 'big16.png', 17895, 20000, 16, 2, rows=64)
  png8 = png_claiming(d / 'big8.png', 12000, 12000, 8, 0)
  assert png8.stat().st_size < 200_000  # a few kilobytes claiming 144 megapixels
  out = str(d / 'out')
  cases = {
      'zip_bomb': (['convert', str(zip_bomb_pth(d / 'bomb.pth')),
                    out + '.safetensors'], 'bomb.pth', 'past its own size'),
      'expanded': (['convert',
                    str(expanded_pth(d / 'expanded.pth')),
                    out + '.safetensors'], 'expanded.pth', 'limit of'),
      'memo_zip': (['convert',
                    str(_zip_pth(d / 'memo.pth', MEMO_PICKLE)),
                    out + '.safetensors'], 'memo.pth', 'memo index'),
      'memo_legacy':
          (['convert', str(legacy_memo_pth(d / 'memo_legacy.pth')),
            out + '.safetensors'], 'memo_legacy.pth', 'memo index'),
      'png16_huge': (['restore', str(png16), '--output', out, '--weights',
                      str(weights)], 'big16.png', 'limit of 100,000,000'),
      'png8_huge': (['restore', str(png8), '--output', out, '--weights',
                     str(weights)], 'big8.png', 'limit of 100,000,000'),
      'evaluate_huge': (['evaluate', '--data',
                         str(d / 'huge'), '--weights',
                         str(weights)], 'x.png', 'limit of'),
      'convert_fifo': (['convert', str(fifo), out + '.safetensors'], 'pipe.pth', 'FIFO'),
      'restore_fifo': (['restore',
                        str(fifo_png), '--output', out, '--weights',
                        str(weights)], 'pipe.png', 'FIFO'),
      'restore_fifo_weights':
          (['restore', str(good), '--output', out, '--weights',
            str(fifo_weights)], 'pipe.safetensors', 'FIFO'),
      'export_fifo': (['export', str(fifo), out + '.pth'], 'pipe.pth', 'FIFO'),
      'evaluate_fifo': (['evaluate', '--data',
                         str(d / 'fifo'), '--weights',
                         str(weights)], 'x.png', 'FIFO'),
      # Last, as before main() gave the limit back when it returns.
      'png8_max_pixels': ([
          'restore',
          str(good),
          str(png8), '--output', out, '--weights',
          str(weights), '--max-pixels', '200'
      ], 'good.png', 'limit of 200'),
  }
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
  env.pop('MPRNET_MAX_PIXELS', None)
  argv = json.dumps({name: case[0] for name, case in cases.items()})
  proc = subprocess.run(
      [sys.executable, '-c', CHILD, str(CAP_GIB), argv, '20'], env=env, capture_output=True,
      text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return cases, json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_memory_cap_holds_in_the_child(hostile):
  _, results = hostile
  assert results['capped'], 'RLIMIT_AS did not stop a large allocation: the cap tests nothing'


@pytest.mark.parametrize('name', [
    'zip_bomb', 'expanded', 'memo_zip', 'memo_legacy', 'png16_huge', 'png8_huge', 'png8_max_pixels',
    'evaluate_huge', 'convert_fifo', 'restore_fifo', 'restore_fifo_weights', 'export_fifo',
    'evaluate_fifo'
])
def test_hostile_file_gives_one_line_and_status_2(hostile, name):
  cases, results = hostile
  argv, file_name, words = cases[name]
  result = results[name]
  assert result['rc'] == 2, result
  errors = [line for line in result['stderr'].splitlines() if line.startswith('mprnet ')]
  assert len(errors) == 1 and 'Traceback' not in result['stderr'], result['stderr']
  line = errors[0]
  assert line.startswith(f'mprnet {argv[0]}: error: '), line
  assert file_name in line and words in line, line


# ---- in-process: shapes, values and outputs ----------------------------------------------
def test_element_count_of_hostile_sizes_cannot_wrap(tmp_path):
  """2**32 x 2**32 elements: an int64 product wraps to 0, which must not pass for empty."""
  with pytest.raises(CheckpointError, match=r'wrap\.pth: tensor of size .* limit of'):
    load_pth(expanded_pth(tmp_path / 'wrap.pth', side=1 << 32, tensors=1))


@pytest.fixture(scope='module')
def tiny_state():
  return unwrap_state_dict(load_pth(TINY))


@pytest.mark.parametrize('shape', [(), (16,), (16, 3, 0, 3), (0, 3, 3, 3), (16, 3, 3, 5),
                                   (100_000, 3, 3, 3)])
def test_impossible_first_conv_is_one_checkpoint_error(tiny_state, shape):
  state = dict(tiny_state, **{'shallow_feat1.0.weight': np.zeros(shape, np.float32)})
  with pytest.raises(CheckpointError) as error:
    from_pytorch(state, source='odd.pth')
  message = str(error.value)
  assert message.startswith('odd.pth: ') and '\n' not in message
  assert 'shallow_feat1.0.weight' in message or 'n_feat=' in message or 'kernel' in message


def test_zero_sized_attention_conv_is_one_checkpoint_error(tiny_state):
  key = 'shallow_feat1.1.CA.conv_du.0.weight'
  state = dict(tiny_state, **{key: np.zeros((0,) + tiny_state[key].shape[1:], np.float32)})
  with pytest.raises(CheckpointError, match=r'conv_du\.0\.weight has shape \(0,'):
    from_pytorch(state, source='zero.pth')


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_weights_are_refused_with_the_tensor_name(tiny_state, bad):
  key = 'stage2_decoder.decoder_level1.0.body.2.weight'
  assert key in tiny_state
  value = tiny_state[key].copy()
  value.flat[3] = bad
  with pytest.raises(CheckpointError, match=rf'nan\.pth: tensor {key} holds 1 NaN or infinite'):
    from_pytorch(dict(tiny_state, **{key: value}), source='nan.pth')


def _one_error_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_export_never_replaces_its_own_input(tmp_path, capsys, suffix):
  source = tmp_path / f'w{suffix}'
  if suffix == '.pth':
    source.write_bytes(TINY.read_bytes())
  else:
    assert main(['convert', str(TINY), str(source)]) == 0
  before = source.read_bytes()
  capsys.readouterr()
  assert main(['export', str(source), str(source), '--overwrite']) == 2
  assert 'same file' in _one_error_line(capsys)
  link = tmp_path / f'link{suffix}'
  os.link(source, link)  # a hard link: another name, the same inode
  assert main(['export', str(source), str(link), '--overwrite']) == 2
  assert 'same file' in _one_error_line(capsys)
  assert source.read_bytes() == before


def test_export_refuses_a_task_whose_sizes_differ(tmp_path, capsys):
  assert main(['export', str(TINY), str(tmp_path / 'o.safetensors'), '--task', 'deblurring']) == 2
  line = _one_error_line(capsys)
  assert "sizes do not match task 'deblurring'" in line and 'n_feat=' in line
  assert not (tmp_path / 'o.safetensors').exists()


def test_restore_refuses_an_output_hard_linked_to_an_input(tmp_path):
  from mprnet_jax.inference import restore_files
  source = tmp_path / 'in' / 'photo.png'
  source.parent.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(source)
  (tmp_path / 'out').mkdir()
  os.link(source, tmp_path / 'out' / 'photo.png')
  with pytest.raises(FileExistsError, match='same file'):
    restore_files(None, [source], tmp_path / 'out', progress=False)  # refused before restoring


def test_max_pixels_does_not_outlive_the_command(tmp_path, monkeypatch):
  from mprnet_jax.cli import main
  from mprnet_jax.image_io import MAX_PIXELS_ENV
  monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
  assert main([
      'restore',
      str(tmp_path / 'missing.png'), '--output',
      str(tmp_path / 'out'), '--weights',
      str(tmp_path / 'w.safetensors'), '--max-pixels', '200'
  ]) == 2
  assert MAX_PIXELS_ENV not in os.environ

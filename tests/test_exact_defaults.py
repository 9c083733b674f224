"""Defaults give the official answer: `mprnet restore` pads as the official code does (to a
multiple of 8), and `Restorer` computes in exactly the dtype it is asked for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from flax import nnx

from conftest import FIXTURES
from mprnet_jax.cli import main
from mprnet_jax.image_io import read_image, write_image
from mprnet_jax.inference import Restorer
from mprnet_jax.model import MPRNet
from mprnet_jax.weights import load_weights

pytestmark = pytest.mark.usefixtures('fast_compile')  # plumbing, not parity

DEMO = FIXTURES / 'demo_denoise.safetensors'


@pytest.fixture(scope='module')
def odd_photo():
  # A real photograph whose sides are multiples of neither 8 nor 64, so a 64-pixel bucket
  # would move every split line of the network.
  return skimage.data.chelsea()[:203, :317]


def test_restore_command_defaults_equal_restorer_bit_for_bit(tmp_path, odd_photo):
  source = tmp_path / 'in' / 'cat.png'
  source.parent.mkdir()
  write_image(source, odd_photo / 255.0)  # float in [0, 1], written as 8 bits
  assert main(['restore', '--weights',
               str(DEMO),
               str(source), '--output',
               str(tmp_path / 'out')]) == 0
  written, info = read_image(tmp_path / 'out' / 'cat.png')  # float in [0, 1] + what it was
  assert info.bit_depth == 8
  from_command = np.round(written * 255).astype(np.uint8)
  from_library = Restorer(DEMO)(odd_photo)
  assert from_command.shape == odd_photo.shape
  assert np.array_equal(from_command, from_library)
  # The check can fail: a 64-pixel bucket gives other pixels on this photo.
  bucketed = Restorer(DEMO, bucket=64)(odd_photo)
  assert not np.array_equal(bucketed, from_library)


def _compute_dtypes(model):
  return {jnp.dtype(m.dtype) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)}


@pytest.mark.parametrize('built, asked', [('bfloat16', 'float32'), ('float32', 'bfloat16')])
def test_restorer_computes_in_the_dtype_asked_for(built, asked):
  float32 = load_weights(DEMO)
  # Built abstractly, then given the demo's parameters (every array it holds): random ones
  # would only be overwritten, and initialising them cost seconds.
  model = nnx.eval_shape(
      lambda: MPRNet(**float32.config.to_dict(), dtype=jnp.dtype(built), rngs=nnx.Rngs(0)))
  nnx.update(model, nnx.state(float32, nnx.Param))
  assert all(isinstance(x, jnp.ndarray) for x in jax.tree.leaves(nnx.state(model)))
  assert _compute_dtypes(model) == {jnp.dtype(built)}
  restorer = Restorer(model, dtype=asked)
  assert _compute_dtypes(restorer.model) == {jnp.dtype(asked)}
  image = skimage.data.coffee()[:64, :96].astype(np.float32) / 255
  reference = Restorer(float32 if asked == 'float32' else model, dtype=asked)
  assert np.array_equal(restorer.restore_float(image), reference.restore_float(image))

"""The proof of faithfulness: official checkpoints convert, and the converted network, its loss
and its gradients reproduce the official PyTorch model's (../shared/fixtures)."""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES, shared_fixture
from mprnet_jax import CheckpointError, MPRNet, from_pytorch, losses, to_pytorch_state_dict
from mprnet_jax.conversion import unwrap_state_dict
from mprnet_jax.torch_format import load_pth, save_pth
from mprnet_jax.weights import load_model, load_weights, save_weights

# name -> (checkpoint, reference outputs)
OUTPUT_CASES = {
    'tiny': (FIXTURES / 'tiny.pth', FIXTURES / 'tiny_outputs.npz'),
    'tiny_denoise': (FIXTURES / 'tiny_denoise.pth', FIXTURES / 'tiny_denoise_outputs.npz'),
    'tiny_legacy': (FIXTURES / 'tiny_legacy.pth', FIXTURES / 'tiny_legacy_outputs.npz'),
    'deraining': (None, None),  # large: read from ../shared/fixtures
}


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return jnp.asarray(x).transpose(0, 2, 3, 1)


def test_every_shared_output_fixture_is_covered():
  names = {p.name[:-len('_outputs.npz')] for p in shared_fixture('.').glob('*_outputs.npz')}
  assert names == set(OUTPUT_CASES)


@pytest.mark.parametrize('name', sorted(OUTPUT_CASES))
def test_forward_matches_official_float64(name):
  ckpt, ref_path = OUTPUT_CASES[name]
  if ckpt is None:
    ckpt, ref_path = shared_fixture(f'{name}.pth'), shared_fixture(f'{name}_outputs.npz')
  ref = np.load(ref_path)
  model = from_pytorch(ckpt)
  outputs = jax.jit(lambda m, x: m(x))(model, nhwc(ref['input']))
  for out, stage in zip(outputs, ['stage3', 'stage2', 'stage1']):
    expected = ref[f'{stage}_f64']
    tolerance = 1e-4 * max(1.0, np.abs(expected).max())
    assert np.abs(nchw(out) - expected).max() <= tolerance, (name, stage)


@pytest.mark.parametrize('case', [0, 1, 2])
def test_losses_match_official(case):
  ref = np.load(FIXTURES / 'losses.npz')
  x, y = nhwc(ref[f'case{case}/x']), nhwc(ref[f'case{case}/y'])
  np.testing.assert_allclose(
      jax.jit(losses.charbonnier)(x, y), ref[f'case{case}/charbonnier'], rtol=1e-5)
  np.testing.assert_allclose(jax.jit(losses.edge_loss)(x, y), ref[f'case{case}/edge'], rtol=1e-5)
  lap = nchw(jax.jit(losses.laplacian)(x))
  expected = ref[f'case{case}/laplacian_x']
  assert np.abs(lap - expected).max() <= 1e-5 * np.abs(expected).max()


def test_loss_shape_mismatch_raises():
  with pytest.raises(ValueError, match='shapes differ'):
    losses.charbonnier(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 9, 3)))


@pytest.mark.parametrize('name,task', [('tiny', 'deblurring'), ('tiny_denoise', 'denoising')])
def test_loss_and_gradients_match_official(name, task):
  ref = np.load(FIXTURES / f'{name}_train.npz')
  graphdef, params = nnx.split(from_pytorch(FIXTURES / f'{name}.pth'), nnx.Param)
  x, y = nhwc(ref['input']), nhwc(ref['target'])

  def loss_fn(p):
    terms = losses.mprnet_loss_terms(nnx.merge(graphdef, p)(x), y, task)
    return terms['loss'], terms

  (loss, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  np.testing.assert_allclose(loss, ref['loss'], rtol=1e-5)
  for part in ('charbonnier_sum', 'edge_sum'):
    if part in ref:
      np.testing.assert_allclose(terms[part], ref[part], rtol=1e-5)
  grads_official = to_pytorch_state_dict(nnx.merge(graphdef, grads))
  keys = [k[len('grad/'):] for k in ref if k.startswith('grad/')]
  assert len(keys) == sum(1 for _ in jax.tree.leaves(params))
  for key in keys:
    expected = ref[f'grad/{key}']
    assert np.abs(grads_official[key] - expected).max() <= 2e-3 * np.abs(expected).max(), key


@pytest.mark.parametrize('name', ['tiny.pth', 'tiny_denoise.pth', 'tiny_legacy.pth'])
def test_round_trip_is_bit_exact(name):
  original = unwrap_state_dict(load_pth(FIXTURES / name))
  back = to_pytorch_state_dict(from_pytorch(FIXTURES / name))
  assert set(back) == set(original)
  for key, value in original.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


@pytest.fixture(scope='module')
def tiny_state():
  return unwrap_state_dict(load_pth(FIXTURES / 'tiny.pth'))


@pytest.mark.parametrize('wrap', ['bare', 'bare_prefixed', 'wrapped'])
def test_accepts_every_official_form(tiny_state, wrap):
  state = {('module.' + k if wrap == 'bare_prefixed' else k): v for k, v in tiny_state.items()}
  model = from_pytorch({'state_dict': state} if wrap == 'wrapped' else state)
  assert model.config.n_feat == 16 and model.config.num_cab == 2


def test_sizes_are_inferred_and_checked_against_task(tiny_state):
  model = from_pytorch(shared_fixture('deraining.pth'), task='deraining')
  assert (model.config.n_feat, model.config.scale_unetfeats, model.config.num_cab) == (40, 20, 8)
  with pytest.raises(CheckpointError, match=r"n_feat=16 \(task 'deblurring': 96\)"):
    from_pytorch(tiny_state, task='deblurring')


def test_mismatches_are_listed_in_one_error(tiny_state):
  state = dict(tiny_state)
  state['tail.weight'] = np.zeros((3, 24, 5, 5), np.float32)  # wrong shape
  del state['sam12.conv1.weight']  # missing
  state['extra.weight'] = np.zeros(3, np.float32)  # unexpected
  with pytest.raises(CheckpointError) as error:
    from_pytorch(state)
  message = str(error.value)
  assert '\n' not in message
  assert '1 missing (sam12.conv1.weight)' in message
  assert '1 unexpected (extra.weight)' in message
  assert 'tail.weight: (3, 24, 5, 5), model wants (3, 24, 3, 3)' in message


def test_shared_prelu_copies_must_agree(tiny_state):
  state = dict(tiny_state)
  state['stage3_orsnet.orb2.body.0.body.1.weight'] = np.array([0.5], np.float32)
  with pytest.raises(CheckpointError, match='shared-PReLU copies that differ'):
    from_pytorch(state)


def test_foreign_and_broken_files_give_clear_errors(tmp_path):
  png = tmp_path / 'photo.pth'
  png.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 64)
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes((FIXTURES / 'tiny.pth').read_bytes()[:5000])
  foreign = tmp_path / 'foreign.pth'
  save_pth({'state_dict': {'fc.weight': np.zeros((2, 2), np.float32)}}, foreign)
  for path, pattern in [(png, 'photo.pth'), (truncated, 'truncated.pth'),
                        (foreign, 'foreign.pth: not an MPRNet state dict'),
                        (tmp_path / 'absent.pth', 'absent.pth')]:
    with pytest.raises(CheckpointError, match=pattern) as error:
      from_pytorch(path)
    assert '\n' not in str(error.value)


def test_code_in_a_checkpoint_never_runs(tmp_path):
  marker = tmp_path / 'pwned'

  class Payload:

    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('evil/data.pkl', pickle.dumps({'state_dict': Payload()}, protocol=2))
    archive.writestr('evil/byteorder', 'little')
  with pytest.raises(CheckpointError, match='evil.pth'):
    from_pytorch(path)
  assert not marker.exists()


def test_weight_file_round_trip_and_load_model(tmp_path):
  model = from_pytorch(FIXTURES / 'tiny.pth')
  with pytest.raises(CheckpointError, match="sizes do not match task 'deblurring'"):
    save_weights(model, tmp_path / 'tiny.safetensors', task='deblurring')  # n_feat=16 is not it
  path = save_weights(model, tmp_path / 'tiny.safetensors')
  with pytest.raises(FileExistsError):
    save_weights(model, path)
  for loaded in (load_weights(path), load_model(path), load_model(FIXTURES / 'tiny.pth')):
    a, b = to_pytorch_state_dict(model), to_pytorch_state_dict(loaded)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  broken = tmp_path / 'broken.safetensors'
  broken.write_bytes(b'not safetensors')
  with pytest.raises(CheckpointError, match='broken.safetensors'):
    load_weights(broken)


def _as_save_model_writes_it(state):
  """What `safetensors.torch.save_model` stores for an MPRNet: of tensors sharing storage (the
  PReLU shared by every CAB), only the alphabetically first name, the others recorded in the
  metadata as `removed -> kept` (safetensors' `_remove_duplicate_names`)."""
  from mprnet_jax.conversion import iter_torch_params
  model = nnx.eval_shape(lambda: MPRNet(**from_pytorch(state).config.to_dict()))
  groups = {}
  for key, param in iter_torch_params(model):
    groups.setdefault(id(param), []).append(key)
  kept, metadata = dict(state), {}
  for keys in groups.values():
    keep = sorted(keys)[0]
    for key in keys:
      if key != keep:
        del kept[key]
        metadata[key] = keep
  return kept, metadata


def test_reads_safetensors_written_by_torch_save_model(tmp_path, tiny_state):
  from safetensors.numpy import save_file
  stored, metadata = _as_save_model_writes_it(tiny_state)
  assert len(tiny_state) - len(stored) == len(metadata) > 0
  path = tmp_path / 'from_torch.safetensors'
  save_file({k: np.ascontiguousarray(v) for k, v in stored.items()}, str(path), metadata=metadata)
  loaded = to_pytorch_state_dict(load_weights(path))
  assert set(loaded) == set(tiny_state)  # every PReLU position restored from its one copy
  for key, value in tiny_state.items():
    assert np.array_equal(loaded[key], value), key


def test_official_sizes_store_262_keys_with_save_model():
  """The figure in the README: the official model's 316 state-dict keys are 262 once the
  PReLU shared under 55 keys is stored once."""
  from mprnet_jax.conversion import iter_torch_params
  model = nnx.eval_shape(lambda: MPRNet())
  keys = [key for key, _ in iter_torch_params(model)]
  unique = {id(param) for _, param in iter_torch_params(model)}
  assert (len(keys), len(unique)) == (316, 262)


def test_export_keeps_the_recorded_task(tmp_path, capsys):
  from safetensors import safe_open
  from safetensors.numpy import save_file

  from mprnet_jax.cli import main
  from mprnet_jax.conversion import iter_torch_params
  from mprnet_jax.model import PRESETS
  model = nnx.eval_shape(lambda: MPRNet(**PRESETS['denoising'].to_dict()))
  # Constant weights of the denoising sizes: the task is what is under test, not the values.
  state = {
      key: np.full(param.get_value().shape, 0.01, np.float32)
      for key, param in iter_torch_params(model)
  }
  state = {key: (v.transpose(3, 2, 0, 1).copy() if v.ndim == 4 else v) for key, v in state.items()}
  source = tmp_path / 'denoise.safetensors'
  save_file(state, str(source), metadata={'format': 'mprnet-jax/1', 'task': 'denoising'})
  for out in ('copy.safetensors', 'copy.pth'):
    assert main(['export', str(source), str(tmp_path / out)]) == 0
  with safe_open(str(tmp_path / 'copy.safetensors'), framework='numpy') as f:
    assert f.metadata()['task'] == 'denoising'


def test_written_weight_files_follow_the_umask(tmp_path):
  model = from_pytorch(FIXTURES / 'tiny.pth')
  old = os.umask(0o027)
  try:
    save_weights(model, tmp_path / 'w.safetensors')
    save_pth({'a': np.zeros(2, np.float32)}, tmp_path / 'w.pth')
  finally:
    os.umask(old)
  for name in ('w.safetensors', 'w.pth'):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name

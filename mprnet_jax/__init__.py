"""mprnet-jax: MPRNet (Multi-Stage Progressive Image Restoration) in JAX / Flax NNX.

The network, its losses and a converter for the official PyTorch checkpoints, faithful to the
official code; training, restoration and evaluation around them.
"""

from mprnet_jax import losses
from mprnet_jax.conversion import from_pytorch, to_pytorch_state_dict
from mprnet_jax.inference import Restorer
from mprnet_jax.model import PRESETS, MPRNet, MPRNetConfig, count_params
from mprnet_jax.torch_format import CheckpointError
from mprnet_jax.weights import load_model, load_weights, save_weights

__all__ = [
    'CheckpointError',
    'MPRNet',
    'MPRNetConfig',
    'PRESETS',
    'count_params',
    'from_pytorch',
    'Restorer',
    'load_model',
    'load_weights',
    'losses',
    'save_weights',
    'to_pytorch_state_dict',
]

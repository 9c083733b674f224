"""Official MPRNet deraining recipe on Rain13K (the paper's training settings).

    mprnet train --config experiments/derain_rain13k.py --workdir runs/derain_rain13k \
        --config.data.train_dir=datasets/Rain13K/train --config.data.val_dir=datasets/Rain13K/test

Adam 2e-4, 3 warm-up epochs then cosine to 1e-6, batch 16, 256x256 crops, 250 epochs, loss
sum over stages of Charbonnier + 0.05 * edge, flips/rotations only.
"""

from mprnet_jax.configs import base


def get_config():
  config = base.get_config()
  config.task = 'deraining'  # Charbonnier + 0.05 * edge, summed over the three stages
  config.model.task_preset = 'deraining'  # n_feat 40, scale_unetfeats 20, orsnet 16
  config.num_epochs = 250  # official Rain13K length
  config.data.kind = 'paired'  # official layout: <dir>/input, <dir>/target
  config.data.train_dir = 'datasets/Rain13K/train'  # placeholder: override with your path
  config.data.val_dir = 'datasets/Rain13K/test'  # placeholder: override with your path
  config.data.patch_size = 256  # official training crop
  config.data.val_patch_size = 256  # official validation: central 256 crops
  config.data.augment = 'plain'  # flips/rotations, no saturation (official deraining)
  return config

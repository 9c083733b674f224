"""Official MPRNet deblurring recipe on GoPro (the paper's training settings).

    mprnet train --config experiments/deblur_gopro.py --workdir runs/deblur_gopro \
        --config.data.train_dir=datasets/GoPro/train --config.data.val_dir=datasets/GoPro/test

Adam 2e-4, 3 warm-up epochs then cosine to 1e-6, batch 16, 256x256 crops, 3000 epochs, loss
sum over stages of Charbonnier + 0.05 * edge, random-saturation augmentation. On one 80 GB GPU
batch 16 float32 needs `--config.model.remat=convs` (or `--config.model.dtype=bfloat16`).
"""

from mprnet_jax.configs import base


def get_config():
  config = base.get_config()  # the base is this recipe; only the data is named here
  config.task = 'deblurring'  # Charbonnier + 0.05 * edge, summed over the three stages
  config.model.task_preset = 'deblurring'  # n_feat 96, scale_unetfeats 48, orsnet 32
  config.num_epochs = 3000  # official GoPro length
  config.data.kind = 'paired'  # official layout: <dir>/input, <dir>/target
  config.data.train_dir = 'datasets/GoPro/train'  # placeholder: override with your path
  config.data.val_dir = 'datasets/GoPro/test'  # placeholder: override with your path
  config.data.patch_size = 256  # official training crop
  config.data.val_patch_size = 256  # official validation: central 256 crops
  config.data.augment = 'deblur'  # flips/rotations + random saturation (official deblurring)
  return config

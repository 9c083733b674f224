"""Official MPRNet denoising recipe on SIDD (the paper's training settings).

    mprnet train --config experiments/denoise_sidd.py --workdir runs/denoise_sidd \
        --config.data.train_dir=datasets/SIDD/train --config.data.val_dir=datasets/SIDD/val

Adam 2e-4 with weight decay 1e-8 (L2 on the gradient), 3 warm-up epochs then cosine to 1e-6
over epochs - 3 + 40, batch 16, 128x128 crops, 80 epochs, Charbonnier on the clamped final
output only, MixUp from epoch 5.
"""

from mprnet_jax.configs import base


def get_config():
  config = base.get_config()
  config.task = 'denoising'  # Charbonnier of the clamped final output only
  config.model.task_preset = 'denoising'  # n_feat 80, scale_unetfeats 48, orsnet 32
  config.num_epochs = 80  # official SIDD length
  config.optim.weight_decay = 1e-8  # torch Adam's L2, as the official denoising optimiser
  config.optim.cosine_extra_epochs = 40  # official: cosine over num_epochs - 3 + 40 epochs
  config.mixup_start_epoch = 5  # official: MixUp (Beta(0.6, 0.6)) after epoch 5
  config.data.kind = 'paired'  # official layout: <dir>/input, <dir>/target
  config.data.train_dir = 'datasets/SIDD/train'  # placeholder: override with your path
  config.data.val_dir = 'datasets/SIDD/val'  # placeholder: override with your path
  config.data.patch_size = 128  # official denoising training crop
  config.data.val_patch_size = 128  # official denoising validation crop
  config.data.augment = 'plain'  # flips/rotations, no saturation (official denoising)
  return config

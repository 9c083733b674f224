"""The demo: a small MPRNet learns to denoise the photos bundled with scikit-image, on CPU.

    mprnet train --workdir runs/demo

(`experiments/default.py` is the same config, for `--config`.)

Four photos train (astronaut, chelsea, rocket, hubble_deep_field), two validate (coffee,
motorcycle: central 256x256 crops), all degraded on the fly with Gaussian noise; no download.
About 3 minutes on a 2-core CPU (compile included); the validation line shows the PSNR of the
restorations against that of the noisy inputs. Everything else follows the official recipe
(Adam, warm-up + cosine, the denoising loss), scaled down.
"""

from mprnet_jax.configs import base


def get_config():
  config = base.get_config()
  config.task = 'denoising'  # Charbonnier of the clamped final output only
  config.model.task_preset = ''  # explicit sizes below, not an official preset
  config.model.n_feat = 16  # official denoising: 80
  config.model.scale_unetfeats = 8  # official: 48
  config.model.scale_orsnetfeats = 8  # official: 32
  config.model.num_cab = 1  # official: 8

  config.optim.lr = 2e-3  # 10x the official rate: a few hundred steps must suffice
  config.optim.min_lr = 1e-5  # end of the cosine
  config.optim.warmup_epochs = 1  # short warm-up (8 steps), counted in epochs
  config.optim.schedule_unit = 'step'  # a smooth schedule for a short run

  config.batch_size = 8  # global batch
  config.num_epochs = 50  # 50 epochs x 8 steps = 400 steps
  config.mixup_start_epoch = None  # MixUp off: too few steps to profit from it

  config.data.kind = 'synthetic'  # clean photos degraded on the fly
  config.data.train_dir = ''  # '' = the photos bundled with scikit-image
  config.data.val_dir = ''  # '' = the bundled validation photos (coffee, motorcycle)
  config.data.degradation = 'noise'  # additive Gaussian noise
  config.data.noise_sigma = (15.0, 35.0)  # sigma range on the 0-255 scale
  config.data.variants = 16  # 4 photos x 16 noisy copies = 64 examples = 8 steps per epoch
  config.data.patch_size = 64  # training crops
  config.data.val_patch_size = 256  # central crops of the validation photos
  config.data.val_batch_size = 2  # both validation photos in one forward pass
  config.data.num_workers = 0  # the model needs both cores; noise is cheap in-process
  config.data.cache = False  # nothing to decode
  config.data.augment = 'plain'  # flips/rotations, no saturation change

  config.parallel = 'none'  # one CPU device
  config.log_every = 10  # steps between training-metric records
  config.eval_every = 100  # steps between validations
  config.checkpoint_every = 100  # steps between checkpoints
  config.keep_checkpoints = 2  # newest checkpoints kept, besides the best
  return config

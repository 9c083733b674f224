"""Shared base of every experiment: the official deblurring recipe, with a comment on every
field.

Not run by itself; each experiment imports `get_config()` from here and overrides fields:

    mprnet train --config experiments/deblur_gopro.py --workdir runs/gopro

`mprnet_jax.config_loading.validate_config` checks every field named here.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The fields every experiment has, at the official deblurring values."""
  config = ml_collections.ConfigDict()
  # Which loss and which MixUp rule apply: 'deblurring' | 'deraining' | 'denoising'.
  config.task = 'deblurring'

  config.model = ml_collections.ConfigDict()
  # Official widths of this task ('deblurring' | 'denoising' | 'deraining'); '' = explicit sizes.
  config.model.task_preset = 'deblurring'
  # Explicit sizes; None keeps the preset's value (all four must be set when task_preset is '').
  config.model.n_feat = config_dict.placeholder(int)  # channels of the U-Nets' top level
  config.model.scale_unetfeats = config_dict.placeholder(int)  # channels added per U-Net level
  config.model.scale_orsnetfeats = config_dict.placeholder(int)  # extra channels of ORSNet
  config.model.num_cab = config_dict.placeholder(int)  # CABs per ORB in stage 3 (official 8)
  # Compute dtype: 'float32' or 'bfloat16' (parameters, loss and metrics stay float32).
  config.model.dtype = 'float32'
  # Rematerialisation in the CABs' backward pass: 'none'; 'convs' (each CAB keeps its input and
  # conv outputs and recomputes the elementwise work: batch 16 float32 at 256x256 in 66 GiB,
  # bf16 in 33 GiB, on an H200); 'runs' (a run of CABs keeps only its conv outputs: one
  # activation fewer per CAB, no extra convolution; not yet measured on a GPU); 'full' (keep
  # block inputs only: float32 in 29 GiB, about 15% slower). See BENCHMARKS.md.
  config.model.remat = 'none'

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'adam'  # torch.optim.Adam semantics (weight decay as L2 on the gradient)
  config.optim.lr = 2e-4  # peak learning rate, reached after the warm-up
  config.optim.b1 = 0.9  # Adam beta1
  config.optim.b2 = 0.999  # Adam beta2
  config.optim.eps = 1e-8  # Adam epsilon
  config.optim.weight_decay = 0.0  # L2 added to the gradient (official denoising: 1e-8)
  config.optim.min_lr = 1e-6  # end of the cosine decay
  config.optim.warmup_epochs = 3  # linear warm-up length, in `schedule_unit`s
  # Cosine length = num_epochs - warmup_epochs + this (official denoising: 40).
  config.optim.cosine_extra_epochs = 0
  # 'epoch': the learning rate changes once per epoch, as the official scheduler steps;
  # 'step': warm-up and cosine counted in steps (num_epochs, warmup_epochs read as steps).
  config.optim.schedule_unit = 'epoch'

  config.batch_size = 16  # GLOBAL batch (split evenly over processes and devices)
  config.num_epochs = 3000  # official GoPro length
  # Stop after this many steps instead of num_epochs * steps_per_epoch (None: use epochs).
  config.num_steps = config_dict.placeholder(int)
  # MixUp of each batch with a shuffled partner from this epoch on (official: denoising
  # only, from epoch 5); None turns it off.
  config.mixup_start_epoch = config_dict.placeholder(int)
  # Stop with FloatingPointError after this many steps with a non-finite loss or gradient
  # (such steps are skipped: parameters and optimiser state are left unchanged).
  config.max_nonfinite = 10

  config.data = ml_collections.ConfigDict()
  # 'paired' (official input/ + target/ folders), 'synthetic' (clean photos degraded on
  # the fly) or 'shards' (array_record files written by mprnet_jax.shards.write_shards).
  config.data.kind = 'paired'
  # Training data: a folder with input/ and target/ ('paired'), a shard glob or folder
  # ('shards'), or clean images for 'synthetic' ('' = the photos bundled with scikit-image).
  config.data.train_dir = 'datasets/GoPro/train'
  config.data.val_dir = 'datasets/GoPro/test'  # validation data, same forms as train_dir
  # Synthetic degradation: 'noise' | 'gaussian_blur' | 'motion_blur' | 'mixed'.
  config.data.degradation = 'motion_blur'
  config.data.noise_sigma = (5.0, 50.0)  # synthetic noise sigma range, on the 0-255 scale
  config.data.variants = 1  # synthetic: degraded copies of each clean image per epoch
  config.data.patch_size = 256  # training crop size (images smaller are reflect-padded)
  # Validation: the central crop of this size of each image (0 = whole images, one at a time).
  config.data.val_patch_size = 256
  config.data.val_batch_size = 4  # validation images per forward pass (with val_patch_size)
  config.data.max_val_images = 0  # validate on the first this many images (0 = all)
  config.data.num_workers = 2  # grain worker processes per host (0 = in the main process)
  config.data.cache = True  # keep decoded pairs in memory ('paired'): decode each PNG once
  # 'deblur' = crop + flips/rotations + random saturation; 'plain' = without saturation.
  config.data.augment = 'deblur'

  config.seed = 0  # parameters, data order, augmentation and dropout of the whole run
  config.parallel = 'auto'  # 'auto' | 'none' | 'pmap' | 'mesh' (data parallelism)
  config.log_every = 50  # steps between training-metric records
  config.eval_every = 5000  # steps between validations (and a validation at the end)
  config.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
  config.keep_checkpoints = 2  # most recent checkpoints kept, besides the best by PSNR
  return config

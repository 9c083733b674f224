"""A tiny run for the tests: seconds per step on a CPU, every part of the loop exercised.

    mprnet train --config experiments/smoke.py --workdir /tmp/mprnet_smoke
"""

from mprnet_jax.configs import base


def get_config():
  config = base.get_config()
  config.task = 'deblurring'  # the loss with the edge term: the most code
  config.model.task_preset = ''  # explicit sizes below
  config.model.n_feat = 8  # the smallest widths that keep every block
  config.model.scale_unetfeats = 4  # channels added per U-Net level
  config.model.scale_orsnetfeats = 4  # extra channels of ORSNet
  config.model.num_cab = 1  # one CAB per ORB

  config.optim.lr = 1e-3  # large enough that losses move visibly in a few steps
  config.optim.warmup_epochs = 1  # warm-up of one epoch
  config.optim.schedule_unit = 'step'  # the lr changes every step (exercised by resume)

  config.batch_size = 2  # global batch
  config.num_epochs = 4  # 4 photos / batch 2 = 2 steps per epoch: 8 steps
  config.num_steps = 6  # stop after 6 steps (tests override it)
  config.mixup_start_epoch = None  # no MixUp (the deblurring recipe has none)

  config.data.kind = 'synthetic'  # clean bundled photos degraded on the fly
  config.data.train_dir = ''  # '' = the bundled training photos
  config.data.val_dir = ''  # '' = the bundled validation photos
  config.data.degradation = 'noise'  # the cheapest degradation
  config.data.variants = 1  # one degraded copy of each photo per epoch
  config.data.patch_size = 32  # training crops
  config.data.val_patch_size = 32  # central validation crops
  config.data.val_batch_size = 2  # both validation photos in one pass
  config.data.num_workers = 0  # in-process: no worker start-up cost
  config.data.cache = False  # nothing to decode
  config.data.augment = 'deblur'  # with the saturation change: the most code

  config.parallel = 'none'  # one device
  config.log_every = 1  # every step's loss (the resume test compares them)
  config.eval_every = 3  # validations at steps 3 and 6
  config.checkpoint_every = 2  # checkpoints at 2, 4, 6 (and 3, 6 with validations)
  config.keep_checkpoints = 3  # newest checkpoints kept, besides the best
  return config

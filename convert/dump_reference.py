"""Dump reference outputs of an official PyTorch MPRNet checkpoint, to check a conversion.

Run this next to the official code (it needs torch and the official `MPRNet.py` of your task),
then compare with `mprnet convert CKPT OUT.safetensors --reference ref.npz`:

    python convert/dump_reference.py --mprnet-py MPRNet/Deblurring/MPRNet.py \
        --checkpoint model_deblurring.pth --out ref.npz [--size 128x128 --batch 1 --seed 0]

The .npz has the layout of the project's fixtures: `input` (N, 3, H, W) in [0, 1], and the
official outputs `stage3` (final), `stage2`, `stage1`, each also as `*_f64` from the same model
run in float64 (the most exact reference to compare against).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np


def load_official_module(path: Path):
  """Imports the official MPRNet.py from its path (its folder also goes on sys.path, since the
  official files import their neighbours)."""
  spec = importlib.util.spec_from_file_location('official_mprnet', path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(path.resolve().parent))
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mprnet-py', required=True, type=Path, help="the official MPRNet.py")
  parser.add_argument('--checkpoint', required=True, type=Path, help='official .pth')
  parser.add_argument('--out', required=True, type=Path, help='output .npz')
  parser.add_argument('--size', default='128x128', help='HxW, multiples of 8')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  import torch  # only this script needs torch, and only on the user's PyTorch side

  height, width = (int(v) for v in args.size.lower().split('x'))
  if height % 8 or width % 8:
    parser.error(f'--size must be multiples of 8, got {args.size}')
  official = load_official_module(args.mprnet_py)
  model = official.MPRNet()
  checkpoint = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
  state = checkpoint.get('state_dict', checkpoint)
  state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
  model.load_state_dict(state)
  model.eval()

  generator = torch.Generator().manual_seed(args.seed)
  inputs = torch.rand(args.batch, 3, height, width, generator=generator)
  result = {'input': inputs.numpy()}
  with torch.no_grad():
    for suffix, dtype in (('', torch.float32), ('_f64', torch.float64)):
      outputs = model.to(dtype)(inputs.to(dtype))
      for name, out in zip(('stage3', 'stage2', 'stage1'), outputs):
        result[f'{name}{suffix}'] = out.numpy()
  np.savez(args.out, **result)
  print(f'wrote {args.out}: input {tuple(inputs.shape)}, outputs stage3/stage2/stage1 (+ _f64)')
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""The `mprnet` command line: convert, train, restore, evaluate, export, benchmark.

Each subcommand parses its arguments and calls the library; no math here. Bad input (an
`MprnetError` from the library, or an `OSError` such as a missing file) ends with a one-line
`mprnet <command>: error: ...` on stderr and exit status 2; anything else is a bug in our code
and keeps its traceback.

The paths of convert, restore, evaluate and export may be URLs (`gs://...`): inputs are staged
into the local cache and outputs uploaded when complete (`storage.py`); a local path takes the
same code as before, and error messages name the URL, never its staged copy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

from mprnet_jax import protocols, storage
from mprnet_jax.benchmark import run_benchmark, run_suite
from mprnet_jax.config_loading import load_config
from mprnet_jax.conversion import from_pytorch
from mprnet_jax.errors import DataError, MprnetError
from mprnet_jax.files import refuse_overwriting_inputs, require_regular_file
from mprnet_jax.image_io import MAX_PIXELS_ENV, read_size
from mprnet_jax.inference import Restorer, collect_inputs, restore_files
from mprnet_jax.model import PRESETS, count_params
from mprnet_jax.trainer import quiet_xla_logs, train
from mprnet_jax.weights import export_weights, load_model, recorded_task, save_weights

# Errors that mean "the user's input is wrong", reported in one line. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (MprnetError, OSError)


def _output_path(path):
  """A local output as a Path (as it has always been); a URL kept as the string given."""
  return path if storage.is_remote(path) else Path(path)


def _convert(args) -> None:
  out = _output_path(args.out)
  if storage.exists(out) and not args.overwrite:
    raise FileExistsError(f'{out}: already exists (use --overwrite to replace it)')
  refuse_overwriting_inputs(out, [args.checkpoint] + ([args.reference] if args.reference else []),
                            FileExistsError)
  storage.check_output(out)  # before converting, not after
  reference = args.reference
  if storage.is_remote(reference):  # downloaded (or found missing) before converting
    reference = storage.stage_in(reference, 'reference file')
  model = from_pytorch(args.checkpoint, task=args.task)
  sizes = ', '.join(f'{k}={v}' for k, v in model.config.to_dict().items())
  print(f'{args.checkpoint}: MPRNet({sizes}), {count_params(model):,} parameters')
  if args.reference:
    with storage.urls_in_errors():
      ref = np.load(require_regular_file(reference, FileNotFoundError, 'reference file'))
    inputs = np.asarray(ref['input']).transpose(0, 2, 3, 1)
    outputs = jax.jit(lambda m, x: m(x))(model, inputs)
    for out_array, stage in zip(outputs, ['stage3', 'stage2', 'stage1']):
      key = f'{stage}_f64' if f'{stage}_f64' in ref else stage
      expected = ref[key]
      diff = np.abs(np.asarray(out_array).transpose(0, 3, 1, 2) - expected).max()
      print(f'  {stage}: largest |difference| {diff:.3g} against {key} '
            f'(reference values up to {np.abs(expected).max():.3g})')
  save_weights(model, out, task=args.task, overwrite=args.overwrite)
  print(f'wrote {out}')


def _train(args, overrides: list[str]) -> None:
  config = load_config(args.config, overrides)  # no --config: the demo in mprnet_jax/configs
  if _has_cuda_plugin():
    # Only GPUs autotune and print hundreds of "Delay kernel timed out" lines; the filter makes
    # stderr a pipe, which costs the progress bar its terminal width, so elsewhere it stays off.
    quiet_xla_logs()
  result = train(config, args.workdir)
  summary = {
      k: v
      for k, v in result.items()
      if isinstance(v, (int, str)) or (isinstance(v, float) and np.isfinite(v))
  }
  print(json.dumps(summary))


def _has_cuda_plugin() -> bool:
  return any(
      importlib.util.find_spec(name) is not None
      for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


def _restorer(args):
  return Restorer(args.weights, dtype=args.dtype, tile=args.tile, overlap=args.overlap,
                  bucket=args.bucket, ensemble=args.ensemble)


def _restore(args) -> None:
  # Fail on a missing, non-regular, unreadable or too large input, or an output bucket that is
  # not there, before loading any weights (headers only: nothing is decoded here). URL inputs
  # are staged once, here.
  inputs = [
      storage.stage_in(item, 'image or folder of images') if storage.is_remote(item) else item
      for item in args.inputs
  ]
  for path in collect_inputs(inputs):
    read_size(path)
  storage.check_output(args.output)
  written = restore_files(_restorer(args), inputs, args.output,
                          suffix=f'.{args.format}' if args.format else None)
  print(f'restored {len(written)} image(s) into {args.output}')


def _evaluate(args) -> None:
  protocol = protocols.check_protocol(args.protocol)
  if (args.weights is None) == (args.results is None):
    raise MprnetError('give either --weights (restore DATA/input and score) or --results '
                      '(score restorations made elsewhere)')
  if args.results is not None and len(args.results) != len(args.data):
    raise MprnetError(f'{len(args.results)} --results for {len(args.data)} --data; give one '
                      'results folder (or Idenoised.mat) per dataset, in the same order')
  if protocol == 'dnd' and args.results is None and not args.output:
    raise MprnetError('--protocol dnd writes NNNN.mat files for the DND server: give --output DIR')
  if args.output and protocol in protocols.FOLDER_PROTOCOLS:
    raise MprnetError(f'--output is for sidd and dnd; --protocol {protocol} saves its '
                      'restorations with --save-images DIR')
  if args.save_images and (protocol not in protocols.FOLDER_PROTOCOLS or args.weights is None):
    raise MprnetError('--save-images saves the restorations of --weights on image folders '
                      '(sidd and dnd write theirs with --output)')
  names = [_dataset_name(d) for d in args.data]
  if len(args.data) > 1 and (args.output or args.save_images) and len(set(names)) < len(names):
    raise MprnetError('two --data folders share a name, so their --output/--save-images '
                      'subfolders would collide; evaluate them in separate calls')
  inputs = [*args.data, *(args.results or []), *([args.weights] if args.weights else [])]
  for output_file in (args.csv, args.json):  # a report never replaces an input
    if output_file:
      refuse_overwriting_inputs(output_file, inputs, MprnetError)
  for output in (args.output, args.save_images, args.csv, args.json):
    if output:
      storage.check_output(output)  # before any download or restoration
  # URL datasets and results are staged into the local cache; the protocols read local files.
  data_dirs = [_staged(d, 'dataset folder') for d in args.data]
  staged_results = [_staged(r, 'results folder or file') for r in args.results or []]
  several = len(args.data) > 1

  def per_dataset(folder, name):  # with several datasets, a subfolder each
    return folder and (_subfolder(folder, name) if several else folder)

  outputs = [(per_dataset(args.output, n), per_dataset(args.save_images, n)) for n in names]
  for index, (data_arg, data_dir) in enumerate(zip(args.data, data_dirs)):
    # every dataset is checked before any weights are loaded
    protocols.check_dataset(protocol, data_dir, weights_mode=args.results is None)
    _refuse_remote_overwrites(protocol, data_arg, args.results[index] if args.results else None,
                              *outputs[index])
  restorer = _restorer(args) if args.weights is not None else None
  results = []
  for index, (data_arg, data_dir) in enumerate(zip(args.data, data_dirs)):
    output, save_dir = outputs[index]
    with _local_dir(output) as local_output, _local_dir(save_dir) as local_save:
      result = protocols.evaluate_dataset(protocol, data_dir, restorer=restorer,
                                          output_dir=local_output, save_dir=local_save,
                                          results=staged_results[index] if args.results else None,
                                          batch_size=args.batch)
    if storage.is_remote(data_arg):  # the reports name the dataset as given, not its copy
      result['dataset'] = data_arg
    if 'written' in result and storage.is_remote(output):
      result['written'] = [storage.join(output, Path(p).name) for p in result['written']]
    results.append(result)
    if protocol == 'dnd':
      print(f'{data_arg}: restored {result["images"]} images ({result["patches"]} patches) '
            f'into {output}/NNNN.mat. DND has no public ground truth, so no score is printed: '
            'upload these files to the DND benchmark for one')
    else:
      print(f'{data_arg}: {result["images"]} images: PSNR {result["psnr"]:.4f} dB, '
            f'SSIM {result["ssim"]:.4f} ({protocol}: {protocols.PROTOCOLS[protocol]})')
  if several and protocol != 'dnd':
    mean = protocols.mean_row(results)
    print(f'mean of {len(results)} datasets ({mean["images"]} images): PSNR {mean["psnr"]:.4f} '
          f'dB, SSIM {mean["ssim"]:.4f}')
  csv_path = args.csv
  if csv_path is None and protocol == 'rgb' and args.weights is not None and not several:
    # where it has always been written
    csv_path = _subfolder(args.data[0], 'mprnet_metrics.csv')
  if csv_path is not None and protocol != 'dnd':
    with storage.local_output(csv_path) as local:
      written = protocols.write_csv(local, results)
    print(f'per image: {csv_path if storage.is_remote(csv_path) else written}')
  if args.json:
    with storage.local_output(args.json) as local:
      written = protocols.write_json(local, protocol, results)
    print(f'JSON: {args.json if storage.is_remote(args.json) else written}')


def _dataset_name(path) -> str:
  """A dataset's name (its folder's): the last component of a URL, or of the resolved path."""
  if storage.is_remote(path):
    return storage.normalize(path).rsplit('/', 1)[-1]
  return Path(path).resolve().name


def _subfolder(base, name: str):
  return storage.join(base, name) if storage.is_remote(base) else Path(base) / name


def _staged(path, what: str):
  return storage.stage_in(path, what) if storage.is_remote(path) else path


def _local_dir(path):
  """Where to write an output folder (None: no folder asked for): the folder, or for a URL a
  local one uploaded when the block ends without an error."""
  return storage.local_output_dir(path) if path else contextlib.nullcontext(path)


def _refuse_remote_overwrites(protocol: str, data, results, output, save_dir) -> None:
  """The protocols' never-over-the-dataset checks, for output URLs: they only see the local
  copies, so the URLs are compared here (normalised: an object has no inode)."""
  if storage.is_remote(save_dir):
    protected = [storage.join(data, 'input'), storage.join(data, 'target'), results]
    if any(
        storage.is_remote(p) and storage.normalize(p) == storage.normalize(save_dir)
        for p in protected):
      raise DataError(f'{save_dir}: would overwrite the dataset; choose another '
                      '--save-images')
  if protocol == 'dnd' and storage.is_remote(output) and storage.is_remote(data):
    if storage.normalize(output) == storage.normalize(storage.join(data, 'images_srgb')):
      raise DataError(f'{output}: would overwrite the DND images; choose another '
                      '--output')


def _export(args) -> None:
  out = _output_path(args.out)
  if storage.exists(out) and not args.overwrite:
    raise FileExistsError(f'{out}: already exists (use --overwrite to replace it)')
  refuse_overwriting_inputs(out, [args.weights], FileExistsError)  # also through a hard link
  storage.check_output(out)
  model = load_model(args.weights)
  task = args.task
  if task is None:  # keep what the source records; a task that does not fit is dropped
    task = recorded_task(args.weights)
    if task is not None and PRESETS.get(task) != model.config:
      warnings.warn(
          f'{args.weights}: recorded task {task!r} does not match its sizes; '
          'not carried over', stacklevel=1)
      task = None
  path = export_weights(model, out, task=task, overwrite=args.overwrite)
  print(f'wrote {path}')


def _benchmark(args) -> None:
  if args.suite:
    import tempfile
    run_suite(args.suite, cache_dir=args.cache_dir or tempfile.mkdtemp(prefix='mprnet-cache-'),
              steps=args.steps, warmup=args.warmup, smoke=args.smoke, suite=args.suite_rows)
    return
  result = run_benchmark(mode=args.mode, task=args.task, dtype=args.dtype, batch=args.batch,
                         size=args.size, remat=args.remat, steps=args.steps, warmup=args.warmup,
                         smoke=args.smoke, cache_dir=args.cache_dir, compile_only=args.compile_only)
  print(json.dumps(result) if args.json else result['summary'])


class _MaxPixels(argparse.Action):
  """--max-pixels N: sets MPRNET_MAX_PIXELS for the whole process (and worker processes), so
  every image reader, header checks included, applies the same limit."""

  def __call__(self, parser, namespace, value, option_string=None):
    if value < 1:
      parser.error(f'{option_string} must be at least 1, got {value}')
    os.environ[MAX_PIXELS_ENV] = str(value)
    setattr(namespace, self.dest, value)


def _add_inference_options(parser, *, weights_required: bool = True) -> None:
  parser.add_argument(
      '--weights', required=weights_required,
      help='our .safetensors, an official .pth, or a training workdir' +
      ('' if weights_required else ' (or --results)'))
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument(
      '--tile', type=_positive_int, default=None,
      help='restore in tiles of this size (multiple of 8); default: whole '
      'image, tiling automatically when it does not fit in device memory')
  parser.add_argument('--overlap', type=_non_negative_int, default=64,
                      help='tile overlap in pixels')
  parser.add_argument(
      '--bucket', type=_positive_int, default=8,
      help='pad sizes to a multiple of this (8 = the official padding; larger '
      'values compile fewer shapes for folders of mixed sizes)')
  parser.add_argument('--ensemble', action='store_true',
                      help='average the 8 flips/rotations (geometric self-ensemble)')
  parser.add_argument(
      '--max-pixels', type=int, action=_MaxPixels, default=None,
      help='refuse images of more pixels than this, from their headers '
      '(default 100000000, or $MPRNET_MAX_PIXELS)')


def _int_at_least(low: int):
  """An argparse type: a whole number >= `low`, with a one-line message otherwise."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
    if value < low:
      raise argparse.ArgumentTypeError(f'must be at least {low}, got {value}')
    return value

  return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='mprnet', description=__doc__.splitlines()[0],
      epilog='convert, restore, evaluate and export take gs:// URLs wherever they take a path: '
      'inputs are downloaded once into $MPRNET_STAGE_DIR (default ~/.cache/mprnet_jax/staged), '
      'outputs are uploaded when complete')
  commands = parser.add_subparsers(dest='command', required=True)

  p = commands.add_parser('convert', help='convert an official PyTorch checkpoint')
  p.add_argument('checkpoint', help='official .pth (zip or legacy format; read without torch)')
  p.add_argument('out', help='output weights, .safetensors')
  p.add_argument('--task', choices=['deblurring', 'denoising', 'deraining'],
                 help='check the sizes against this task and record it')
  p.add_argument(
      '--reference', help='reference outputs .npz (fixtures format, e.g. from '
      'convert/dump_reference.py) to compare against')
  p.add_argument('--overwrite', action='store_true')

  p = commands.add_parser('train', help='train (no --config: the built-in demo)')
  p.add_argument('--config', help='experiment file, e.g. experiments/deblur_gopro.py')
  p.add_argument('--workdir', required=True, help='checkpoints and logs; resumes if present')

  p = commands.add_parser('restore', help='restore image files or folders')
  p.add_argument('inputs', nargs='+', help='image files and/or folders')
  p.add_argument('--output', required=True, help='output folder (never an input)')
  p.add_argument('--format', choices=['png', 'jpg', 'tif'], help='output format (default: same)')
  _add_inference_options(p)

  p = commands.add_parser('evaluate',
                          help="score restorations under an official protocol (the paper's tables)")
  p.add_argument(
      '--protocol', default='rgb', metavar='P',
      help='rgb (default: RGB PSNR, per-channel SSIM), gopro (also HIDE), realblur, '
      'rain, sidd, dnd; see README "Reproducing the paper\'s numbers"')
  p.add_argument(
      '--data', required=True, nargs='+', metavar='DIR',
      help='dataset folder(s): input/ and target/ (sidd: the two official .mat '
      'files; dnd: info.mat and images_srgb/); several give one row each and '
      'their mean')
  p.add_argument(
      '--results', nargs='+', metavar='RES',
      help='instead of --weights: restorations made elsewhere, one per --data '
      '(a folder named like target/; sidd: Idenoised.mat or its folder)')
  p.add_argument(
      '--output', metavar='DIR',
      help='sidd: write DIR/Idenoised.mat; dnd (required): DIR/NNNN.mat per image '
      '(with several datasets, DIR/<dataset name>/)')
  p.add_argument(
      '--save-images', metavar='DIR',
      help='write the restorations as 8-bit PNGs named like the inputs, for '
      '--results later (with several datasets, DIR/<dataset name>/)')
  p.add_argument(
      '--csv', help='per-image CSV (default for --protocol rgb with --weights: '
      'DATA/mprnet_metrics.csv)')
  p.add_argument('--json', metavar='OUT.json', help='write the results, per image, as JSON')
  p.add_argument('--batch', type=_positive_int, default=8,
                 help='sidd/dnd: blocks or patches restored per call')
  _add_inference_options(p, weights_required=False)  # evaluate takes --weights or --results

  p = commands.add_parser('export', help='write weights for PyTorch (.pth) or .safetensors')
  p.add_argument('weights', help='our .safetensors, an official .pth, or a training workdir')
  p.add_argument('out', help='OUT.pth (official {"state_dict": ...}) or OUT.safetensors')
  p.add_argument('--task', choices=['deblurring', 'denoising', 'deraining'])
  p.add_argument('--overwrite', action='store_true')

  p = commands.add_parser('benchmark', help='time a training step or inference')
  p.add_argument('--mode', choices=['train', 'inference'], default='train')
  p.add_argument('--task', default='deblurring', choices=['deblurring', 'denoising', 'deraining'])
  p.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
  p.add_argument('--batch', type=_positive_int, default=16)
  p.add_argument('--size', default='256', help='crop size: N or HxW (inference e.g. 720x1280)')
  p.add_argument(
      '--remat', default='none', choices=['none', 'convs', 'runs', 'full'],
      help="recompute in the CABs' backward pass: nothing, the elementwise work "
      "around the convs (per block, or per run of blocks: 'runs'), or "
      "everything but each block's input")
  p.add_argument('--suite', metavar='OUT.jsonl',
                 help='run every row of a suite, each in its own process, into OUT.jsonl')
  p.add_argument(
      '--suite-rows', choices=['table', 'levers'], default='table',
      help="the suite: 'table' (the rows of BENCHMARKS.md) or 'levers' (options "
      'still to be measured on a GPU)')
  p.add_argument('--steps', type=_positive_int, default=20, help='timed steps')
  p.add_argument('--warmup', type=_non_negative_int, default=3,
                 help='untimed steps after compiling')
  p.add_argument('--smoke', action='store_true', help='tiny model, CPU-sized: checks the harness')
  p.add_argument(
      '--compile-only', action='store_true',
      help="compile without running; report compile time and XLA's buffer sizes "
      '(memory of a configuration, on any machine)')
  p.add_argument('--cache-dir', help='persistent compilation cache folder')
  p.add_argument('--json', action='store_true', help='print the result as JSON')
  return parser


def main(argv: list[str] | None = None) -> int:
  # --max-pixels works through the environment (so grain's worker processes see it too); a
  # call of main() from Python gives the limit back when it returns.
  pixel_limit = os.environ.get(MAX_PIXELS_ENV)
  try:
    return _main(argv)
  finally:
    if pixel_limit is None:
      os.environ.pop(MAX_PIXELS_ENV, None)
    else:
      os.environ[MAX_PIXELS_ENV] = pixel_limit


def _main(argv: list[str] | None) -> int:
  parser = build_parser()
  argv = sys.argv[1:] if argv is None else argv
  args, extra = parser.parse_known_args(argv)
  overrides = [a[len('--config.'):] for a in extra if a.startswith('--config.')]
  unknown = [a for a in extra if not a.startswith('--config.')]
  if unknown or (overrides and args.command != 'train'):
    parser.error(f'unrecognised arguments: {" ".join(unknown or extra)}')
  handlers = {
      'convert': _convert, 'restore': _restore, 'evaluate': _evaluate, 'export': _export,
      'benchmark': _benchmark
  }
  warnings.simplefilter('default')
  try:
    if args.command == 'train':
      _train(args, overrides)
    else:
      handlers[args.command](args)
  except USER_ERRORS as error:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    message = storage.display_name(message)  # a staged copy is named by its URL
    print(f'mprnet {args.command}: error: {message}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'mprnet {args.command}: interrupted', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Experiment configs: load `experiments/<name>.py` by path and apply `a.b=value` overrides.

    config = load_config('experiments/default.py', ['batch_size=4', 'optim.lr=1e-3'])

Values are parsed as Python literals (`4`, `1e-3`, `'x'`, `True`, `None`, `(1, 2)`); anything
that is not a literal is taken as a plain string (`data.kind=paired`). Each override must name
an existing field and match its type (an int may widen to a float); a bad one raises a one-line
ValueError naming the field.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from collections.abc import Sequence

import ml_collections

__all__ = ['load_config', 'apply_override', 'config_to_dict']


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The `get_config()` of the Python file at `path`, with `overrides` applied in order."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise ValueError(f'config file {path} does not exist')
  # Variants import their base as `experiments.base` or as a sibling module: make both work.
  folder = os.path.dirname(path)
  for entry in (folder, os.path.dirname(folder)):
    if entry not in sys.path:
      sys.path.insert(0, entry)
  name = f'_mprnet_experiment_{os.path.splitext(os.path.basename(path))[0]}'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:
    raise ValueError(f'config file {path} failed to load: {type(error).__name__}: {error}') from error
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path} has no get_config()')
  config = module.get_config()
  for override in overrides:
    apply_override(config, override)
  return config


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Sets one `a.b.c=value` in place; ValueError for an unknown field or a mistyped value."""
  key, sep, text = override.partition('=')
  key = key.strip().removeprefix('--').removeprefix('config.')
  if not sep or not key:
    raise ValueError(f'override {override!r} is not of the form field.name=value')
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ValueError(f'unknown config field {".".join(parents[:i + 1])!r} (in override {override!r})')
    node = node[part]
  if leaf not in node:
    known = ', '.join(sorted(node.keys()))
    raise ValueError(f'unknown config field {key!r}; fields here: {known}')
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ValueError(f'config field {key!r} is a group; set one of its fields ({key}.<name>=...)')
  value = _parse_value(text)
  current = node[leaf]
  if isinstance(current, bool) and not isinstance(value, bool):
    lowered = text.strip().lower()
    if lowered in ('true', 'false', 'yes', 'no', '1', '0'):
      value = lowered in ('true', 'yes', '1')
  if isinstance(current, str) and not isinstance(value, str):
    value = text  # `data.train_dir=2024` means the folder named 2024
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as error:
    expected = type(current).__name__ if current is not None else 'the field type'
    raise ValueError(f'bad value {text!r} for config field {key!r}: expected {expected} '
                     f'({str(error).splitlines()[0]})') from None


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A plain JSON-serialisable dict of a config (tuples become lists)."""
  return ml_collections.ConfigDict(config).to_dict()

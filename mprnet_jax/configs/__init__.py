"""Configs that ship with the package: `base` (every field, at the official deblurring values)
and `default` (the demo that `mprnet train` runs without `--config`).

The experiments of a checkout (`experiments/*.py`) import `base` from here and override a few
fields, so they also work from an installed wheel.
"""

"""The demo (the config `mprnet train` runs without `--config`); it lives in the package, in
`mprnet_jax/configs/default.py`, so an installed wheel has it too.

    mprnet train --config experiments/default.py --workdir runs/demo
"""

from mprnet_jax.configs.default import get_config  # noqa: F401  (the experiment's entry point)

"""Sweeps: a sweep file's runs expanded, run here or launched on a cluster, collected, reported.

    expand.py   Sweep (what a sweep file returns), the runs' names and configs, sweep.json
    run.py      `sweep run`: the runs one after another, each a `train` (+ `eval`) subprocess
    launch.py   `sweep launch slurm|xpk|tpu`: through launch/*.sh (one array / one per run)
    collect.py  `sweep collect`: final and best eval metrics, mean ± std over seeds
    report.py   `sweep report`: ROOT/sweep.html
    command.py  the CLI subcommands

A sweep file: `from tfx_jax.sweep import Sweep` and `def get_sweep(arg=None) -> Sweep`.
"""

from tfx_jax.sweep.expand import Sweep

__all__ = ["Sweep"]

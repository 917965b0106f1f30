"""Two learning rates x two seeds of the tiny config, 40 steps each, on CPU (4.5 minutes on 2
busy cores, 52-77 s a run, most of it compiling; lr 3e-3 ends at eval/lm_loss 5.15 ± 0.04).

python -m tfx_jax sweep experiments/sweeps/tiny_lr.py --workdir runs/sweeps/tiny_lr
python -m tfx_jax sweep collect --workdir runs/sweeps/tiny_lr     # table: mean ± std over seeds
python -m tfx_jax sweep report --workdir runs/sweeps/tiny_lr      # runs/sweeps/tiny_lr/sweep.html

The format, for ablations: `runs` lists variants (each a dict of overrides), `grid` is crossed
with every variant (cartesian), `seeds` with everything; run names come from what varies
(`patch_encoder=unet__loss_weight=5__noise_limit_image_first=true__seed=1`), and `overrides`
go to every run without entering the names:

    Sweep(
        config="experiments/transfusion.py:0.16b",
        runs=[{"model.patch_encoder": "linear"}, {"model.patch_encoder": "unet"}],
        grid={"diffusion.loss_weight": [1, 5, 20],
              "diffusion.noise_limit_image_first": [False, True]},
        seeds=[0, 1, 2],
        overrides={"train.steps": 20_000, "train.eval_every": 2_000},
        eval_args=["--num-prompts", "64"],
    )
"""

from tfx_jax.sweep import Sweep


def get_sweep(arg=None):
    return Sweep(
        config="experiments/tiny.py",
        grid={"optimizer.learning_rate": [3e-3, 1e-3]},
        seeds=[0, 1],
        overrides={
            "train.steps": 40,
            "train.log_every": 5,
            "train.eval_every": 20,
            "train.eval_batches": 2,
            "checkpoint.every_steps": 20,
        },
    )

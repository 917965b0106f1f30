"""Noise limiting on and off: images that precede their caption trained at t <= 500 of 1000
(`diffusion.noise_limit_image_first`, Transfusion §4.3: it lifts captioning, which conditions on
a clean image, at no cost to generation). 2 x 3 seeds = 6 runs of experiments/shapes_ablation.py
(2,000 steps of 48 rows); the captions of the true images (eval/caption/...) are what it should
move, the judged drawings what it should not.

    python -m tfx_jax sweep experiments/sweeps/noise_limit.py --workdir runs/ablations/noise_limit
    python -m tfx_jax sweep collect experiments/sweeps/noise_limit.py \
        --workdir runs/ablations/noise_limit

`:smoke` is the same grid, one seed, on experiments/shapes_ablation.py:smoke (CPU seconds).
"""

from tfx_jax.sweep import Sweep

EVAL_ARGS = {
    None: ["--num-prompts", "64", "--no-report"],
    "smoke": ["--num-prompts", "2", "--diffusion-steps", "2", "--no-report"],
}


def get_sweep(arg=None):
    if arg not in EVAL_ARGS:
        raise ValueError(f"experiments/sweeps/noise_limit.py:{arg}: use no argument or :smoke")
    return Sweep(
        config="experiments/shapes_ablation.py" + (f":{arg}" if arg else ""),
        grid={"diffusion.noise_limit_image_first": [True, False]},
        seeds=[0] if arg else [0, 1, 2],
        eval_args=EVAL_ARGS[arg],
    )

"""The diffusion loss weight λ in L = L_LM + λ·L_DDPM (Transfusion §3.3 and §4.3: λ = 5) at 1, 5
and 20: 3 x 3 seeds = 9 runs of experiments/shapes_ablation.py (2,000 steps of 48 rows), each
judged after training (the drawings should gain with λ, the captions and eval/lm_loss lose).

    python -m tfx_jax sweep experiments/sweeps/loss_weight.py --workdir runs/ablations/loss_weight
    python -m tfx_jax sweep collect experiments/sweeps/loss_weight.py \
        --workdir runs/ablations/loss_weight

`:smoke` is the same grid, one seed, on experiments/shapes_ablation.py:smoke (CPU seconds).
"""

from tfx_jax.sweep import Sweep

EVAL_ARGS = {
    None: ["--num-prompts", "64", "--no-report"],
    "smoke": ["--num-prompts", "2", "--diffusion-steps", "2", "--no-report"],
}


def get_sweep(arg=None):
    if arg not in EVAL_ARGS:
        raise ValueError(f"experiments/sweeps/loss_weight.py:{arg}: use no argument or :smoke")
    return Sweep(
        config="experiments/shapes_ablation.py" + (f":{arg}" if arg else ""),
        grid={"diffusion.loss_weight": [1.0, 5.0, 20.0]},
        seeds=[0] if arg else [0, 1, 2],
        eval_args=EVAL_ARGS[arg],
    )

"""Causal vs bidirectional attention inside images, with linear and U-Net patch encoders
(Transfusion Table 5: linear patches FID 61.3 causal vs 20.3 bidirectional; U-Net 16.8 vs 16.7,
its convolutions mixing the patches whatever the mask). 2 x 2 x 3 seeds = 12 runs of
experiments/shapes_ablation.py (2,000 steps of 48 rows), each judged after training (prompt
alignment per split, captions of the true images).

    python -m tfx_jax sweep experiments/sweeps/attention.py --workdir runs/ablations/attention
    python -m tfx_jax sweep collect experiments/sweeps/attention.py \
        --workdir runs/ablations/attention
    bash benchmarks/ablations.sh OUT   # the four ablation files side by side on one GPU

`:smoke` is the same grid, one seed, on experiments/shapes_ablation.py:smoke (CPU seconds).
"""

from tfx_jax.sweep import Sweep

EVAL_ARGS = {
    None: ["--num-prompts", "64", "--no-report"],
    "smoke": ["--num-prompts", "2", "--diffusion-steps", "2", "--no-report"],
}


def get_sweep(arg=None):
    if arg not in EVAL_ARGS:
        raise ValueError(f"experiments/sweeps/attention.py:{arg}: use no argument or :smoke")
    return Sweep(
        config="experiments/shapes_ablation.py" + (f":{arg}" if arg else ""),
        grid={
            "model.image_attention": ["bidirectional", "causal"],
            "model.patch_encoder": ["linear", "unet"],
        },
        seeds=[0] if arg else [0, 1, 2],
        eval_args=EVAL_ARGS[arg],
    )

"""Linear vs U-Net patch encoders at 2x2 and 4x4 latent patches (Transfusion §4.3 / Table 5: the
U-Net encoder beats the linear one, most at larger patches). 4 variants x 3 seeds = 12 runs of
experiments/shapes_ablation.py (2,000 steps of 48 rows), each judged after training. The 8x8
latents make 16 patches an image at 2x2 and 4 at 4x4; the U-Net patches by 2^(stages - 1), so
at 4x4 it gets a third stage of twice the last width.

    python -m tfx_jax sweep experiments/sweeps/patch.py --workdir runs/ablations/patch
    python -m tfx_jax sweep collect experiments/sweeps/patch.py --workdir runs/ablations/patch

`:smoke` is the same variants, one seed, on experiments/shapes_ablation.py:smoke (CPU seconds).
"""

from pathlib import Path

from tfx_jax.config import load_config
from tfx_jax.sweep import Sweep

EVAL_ARGS = {
    None: ["--num-prompts", "64", "--no-report"],
    "smoke": ["--num-prompts", "2", "--diffusion-steps", "2", "--no-report"],
}


def get_sweep(arg=None):
    if arg not in EVAL_ARGS:
        raise ValueError(f"experiments/sweeps/patch.py:{arg}: use no argument or :smoke")
    config = "experiments/shapes_ablation.py" + (f":{arg}" if arg else "")
    widths = list(load_config(Path(__file__).resolve().parents[2] / config).model.unet_channels)
    return Sweep(
        config=config,
        runs=[
            {"model.patch_encoder": "linear", "model.patch_size": 2},
            {"model.patch_encoder": "linear", "model.patch_size": 4},
            {"model.patch_encoder": "unet", "model.patch_size": 2},
            {
                "model.patch_encoder": "unet",
                "model.patch_size": 4,
                "model.unet_channels": [*widths, 2 * widths[-1]],
            },
        ],
        seeds=[0] if arg else [0, 1, 2],
        eval_args=EVAL_ARGS[arg],
    )

"""The size of the paper's ablations on the shapes data (issue 26; Transfusion Table 5).

experiments/shapes_gpu.py's data, VAE and model (the `default` tier: one to three objects, 32 px,
8x8x4 latents in 2x2 patches; d_model 384 x 8 layers, 15M parameters, bf16), trained 2,000 steps
of 48 x 256-token rows (~12% of shapes_gpu's 6,500 x 128 rows): under a minute of training alone
on one GPU, so the four files' 27 distinct runs fit two 9-minute calls side by side
(benchmarks/ablations.sh; its header has the estimate). The ablation sweep files vary this:

    experiments/sweeps/attention.py    model.image_attention x model.patch_encoder
    experiments/sweeps/patch.py        model.patch_encoder x model.patch_size
    experiments/sweeps/noise_limit.py  diffusion.noise_limit_image_first
    experiments/sweeps/loss_weight.py  diffusion.loss_weight

Its data_dir is shapes_gpu's (the same data and VAE settings, so one `data all` serves both; the
records hold whole latents, patches are cut per batch, so any patch size reads them).

  :smoke   the same recipe shrunk to CPU seconds (the tiny shapes tier, d_model 64 x 2 layers,
           2 steps, a 3-step VAE) for the sweep files' `:smoke` arg and tests/test_sweep.py

    python -m tfx_jax data all --config experiments/shapes_ablation.py
    python -m tfx_jax sweep plan experiments/sweeps/attention.py --workdir runs/ablations/attention
"""

import dataclasses
from pathlib import Path

from tfx_jax.config import Config, load_config

TOPOLOGY = "cpu"  # one host, no TPU slice: meant for one GPU (a CPU runs it, slowly)
STEPS = 2000  # the one place the ablations' length is set
ROWS = 48  # data.global_batch_size: 256-token rows a step

# :smoke — every section that sets a size, shrunk (the sweeps' keys keep their meaning).
SMOKE = dict(
    model=dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, unet_channels=(16, 32)),
    data=dict(
        data_dir="data_cache/shapes_ablation_smoke",
        tfds_config="tiny",
        seq_len=128,
        global_batch_size=8,
        packing_bins=8,
        worker_count=0,
    ),
    vae=dict(steps=3, batch_size=16, channels=(16, 32), log_every=1),
    train=dict(steps=2, log_every=1, eval_every=2, eval_batches=1, eval_samples=0),
    optimizer=dict(warmup_steps=1),
    checkpoint=dict(every_steps=2, async_save=False),
)


def _replace(cfg: Config, **sections: dict) -> Config:
    return dataclasses.replace(
        cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    )


def get_config(arg: str | None = None) -> Config:
    if arg not in (None, "smoke"):
        raise ValueError(f"experiments/shapes_ablation.py:{arg}: use no argument or :smoke")
    base = load_config(Path(__file__).with_name("shapes_gpu.py"))
    cfg = _replace(
        base,
        data=dict(global_batch_size=ROWS, worker_count=2),  # K runs share the host's cores
        # In-training evals are the losses only; the sweep's `eval` judges images and captions.
        train=dict(
            steps=STEPS, log_every=100, eval_every=STEPS // 2, eval_batches=4, eval_samples=0
        ),
        # Saved every 500 steps so a run cut by a deadline resumes; two kept (disk: ~30 runs).
        checkpoint=dict(every_steps=500, keep=2),
    )
    cfg = dataclasses.replace(cfg, name="shapes_ablation")
    if arg == "smoke":
        cfg = dataclasses.replace(_replace(cfg, **SMOKE), name="shapes_ablation_smoke")
    return cfg

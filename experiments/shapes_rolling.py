"""Standard vs rolling diffusion on images tall enough for the window to roll (issue 15).

The 32 px `default` shapes tier with the data and VAE recipe of `experiments/shapes_gpu.py`
(8x8x4 latents, the recipe that reached 97.7% / 94.0% of prompted objects right at 4 patch rows),
but with 1x1 patches: the latent grid is 8 patch rows of 8 patches, so a window of 4 rows really
rolls (with 2x2 patches the 4-row window spans the whole image and the init pass draws it all).
The model is shapes_gpu's (d_model 384 x 8 layers, bf16). An example is ~20 caption tokens plus
66 image positions, so 512-token rows x 128 carry ~768 images a step: what the 4-row recipe saw
per step at 256 x 128. The arg picks the training:

  experiments/shapes_rolling.py            standard diffusion (one t per image)
  experiments/shapes_rolling.py:rolling    rolling diffusion, window 4 of the 8 rows

Both see the same data for the same steps (same compute per step: rolling only changes the
noise levels, the attention ids and which patches the loss averages). The data stages do not
depend on the patch size (the records hold whole 8x8x4 latents; patches are cut when batches are
made), so one data_dir serves both modes and any patch size. `benchmarks/rolling_quality.py`
trains the variants at the same time on one GPU and judges them per image row.

    python -m tfx_jax data all --config experiments/shapes_rolling.py
    python -m tfx_jax train --config experiments/shapes_rolling.py:rolling --workdir runs/roll8
"""

from tfx_jax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    VAEConfig,
)

TOPOLOGY = "cpu"  # one host, no TPU slice: meant for one GPU (a CPU runs it, slowly)
MODES = ("standard", "rolling")


def get_config(arg: str | None = None) -> Config:
    mode = arg or "standard"
    if mode not in MODES:
        raise ValueError(f"experiments/shapes_rolling.py:{mode}: use one of {MODES}")
    model = ModelConfig(
        vocab_size=1024,
        d_model=384,
        n_layers=8,
        n_heads=6,
        latent_size=8,
        latent_channels=4,
        patch_size=1,  # 8 x 8 patches: 8 patch rows
        patch_encoder="linear",  # rolling needs it (the window sees only its rows)
        dtype="bfloat16",
        remat_policy="none",
        attention_impl="auto",
    )
    return Config(
        name=f"shapes_rolling_{mode}",
        model=model,
        diffusion=DiffusionConfig(
            loss_weight=5.0, noise_limit_image_first=True, mode=mode, rolling_window=4
        ),
        data=DataConfig(
            source="shapes",
            data_dir="data_cache/shapes_rolling",
            tfds_config="default",
            image_size=32,
            seq_len=512,  # ~86 positions an example: ~768 images a step at 128 rows
            global_batch_size=128,
            packing_bins=64,
            caption_first_prob=0.8,
            worker_count=4,  # Grain prefetch processes: one core packs ~600k tokens/s, 65k a step
        ),
        vae=VAEConfig(
            downsample=4,
            channels=(32, 64),
            steps=2000,
            batch_size=256,
            learning_rate=2e-3,
            log_every=500,
        ),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=100, weight_decay=0.1),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every_steps=100_000, async_save=False),  # the last step only
        train=TrainConfig(steps=6500, log_every=100),
    )

"""A tiny Transfusion that trains in seconds on a laptop CPU (tests, demo, smoke runs).

python -m tfx_jax train --config experiments/tiny.py --workdir runs/tiny
python -m tfx_jax train --config experiments/tiny.py:unet --workdir runs/tiny_unet
"""

from tfx_jax.config import (
    Config,
    DataConfig,
    DiffusionConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)

TOPOLOGY = "cpu"  # meant for one CPU host (`tfx_jax dryrun --topology` still takes any)


def get_config(arg: str | None = None) -> Config:
    model = ModelConfig(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        mlp_dim=128,
        latent_size=8,
        latent_channels=4,
        patch_size=2,
        patch_encoder="unet" if arg == "unet" else "linear",
        unet_channels=(16, 32),
        dtype="float32",
        remat_policy="none",
    )
    return Config(
        name=f"tiny{'_' + arg if arg else ''}",
        model=model,
        diffusion=DiffusionConfig(loss_weight=5.0),
        data=DataConfig(source="synthetic", seq_len=128, global_batch_size=8),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=10, weight_decay=0.0),
        mesh=MeshConfig(data=-1),
        train=TrainConfig(steps=60, log_every=10),
    )

"""The demo: a small Transfusion on the embedded shapes data, end to end on a CPU.

    make demo            # = python -m tfx_jax demo --config experiments/demo.py --workdir runs/demo

Stages (each skipped when its output exists under data.data_dir): render the TFDS dataset (32 px
shapes with exact captions, interleaved documents, stdlib docstrings), train a 1024-piece
SentencePiece tokenizer, train a 4x KL-VAE (8x8x4 latents), encode all images once, then train
the transformer on packed sequences (16 patches per image).
"""

from tfx_jax.config import (
    Config,
    DataConfig,
    DiffusionConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    VAEConfig,
)

TOPOLOGY = "cpu"  # meant for one CPU host (`tfx_jax dryrun --topology` still takes any)


def get_config(arg: str | None = None) -> Config:
    model = ModelConfig(
        vocab_size=1024,
        d_model=128,
        n_layers=4,
        n_heads=4,
        latent_size=8,
        latent_channels=4,
        patch_size=2,
        patch_encoder="linear",
        dtype="float32",
        remat_policy="none",
    )
    return Config(
        name="demo",
        model=model,
        diffusion=DiffusionConfig(loss_weight=5.0),
        data=DataConfig(
            source="shapes",
            data_dir="data_cache/demo",
            tfds_config="default",
            image_size=32,
            seq_len=256,
            global_batch_size=16,
            packing_bins=32,
        ),
        vae=VAEConfig(
            downsample=4, channels=(32, 64), steps=1500, batch_size=64, learning_rate=2e-3
        ),
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=30, weight_decay=0.1),
        mesh=MeshConfig(data=-1),
        train=TrainConfig(steps=300, log_every=25, eval_every=150, eval_batches=2, eval_samples=8),
    )

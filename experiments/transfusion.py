"""The Transfusion paper's model sizes (Zhou et al. 2024, Table 1 / §4.1), on a text + image–caption
mixture.

    python -m tfx_jax train --config experiments/transfusion.py:0.76b --workdir gs://bucket/run
    python -m tfx_jax config --config experiments/transfusion.py:7b --workdir /tmp/x  # inspect
    python -m tfx_jax dryrun --config experiments/transfusion.py:0.76b --topology v5p-128
    python benchmarks/train_step.py --config experiments/transfusion.py:0.16b,synthetic

Images: 256x256 through an 8x VAE with 8 latent channels -> a 32x32x8 latent, 2x2 patches ->
256 positions per image. The 7B model uses U-Net down/up blocks as in the paper; the smaller ones
a linear patch projection (switch with --set model.patch_encoder=unet).

Data (`SIZE` alone): half the tokens from a text corpus, half from image–caption pairs, as in the
paper (§4.1: 0.5T tokens, half text, half images) — here LM1B and COCO captions from TFDS, both
prepared once on a machine with internet access (nothing is downloaded at run time):

    pip install tensorflow  # only on the preparing machine; tfds build needs it
    tfds build lm1b --file_format=array_record --data_dir=$DATA/tfds
    tfds build coco_captions --file_format=array_record --data_dir=$DATA/tfds
    gsutil -m cp -r $DATA gs://BUCKET/tfx_data   # then --set data.data_dir=gs://BUCKET/tfx_data
    python -m tfx_jax data all --config experiments/transfusion.py:0.76b \
        --set data.data_dir=gs://BUCKET/tfx_data

`SIZE,synthetic` trains on synthetic packed batches instead (benchmarks and smoke runs only).
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

# The slice each size is meant for (`python -m tfx_jax dryrun --topology ...` checks that the
# step compiles and fits there; TOPOLOGIES[arg]). Batch 512 x 4096 tokens, fsdp over all chips.
TOPOLOGY = "v5p-128"
TOPOLOGIES = {
    "0.16b": "v5p-128",
    "0.37b": "v5p-128",
    "0.76b": "v5p-128",
    "1.4b": "v5p-256",
    "7b": "v5p-1024",
}

# name: (layers, d_model, heads)
SIZES = {
    "0.16b": (16, 768, 12),
    "0.37b": (24, 1024, 16),
    "0.76b": (24, 1536, 24),
    "1.4b": (24, 2048, 16),
    "7b": (32, 4096, 32),
}


# The mixture (data.mixture entries, `tfx_jax/data/sources/mixture.py`): half the tokens each.
MIXTURE = (
    "text 0.5 source=tfds tfds_name=lm1b text_key=text tfds_splits=train=train,validation=test",
    "coco 0.5 source=tfds tfds_name=coco_captions caption_key=captions/text image_key=image "
    "tfds_splits=train=train,validation=val",
)


def data_config(kind: str) -> DataConfig:
    if kind == "synthetic":
        return DataConfig(source="synthetic", seq_len=4096, global_batch_size=512)
    return DataConfig(
        source="mixture",
        mixture=MIXTURE,
        mix_by="tokens",
        data_dir="data_cache/transfusion",
        image_size=256,
        seq_len=4096,
        global_batch_size=512,
        read_threads=8,  # gs:// reads
    )


def get_config(arg: str = "0.16b") -> Config:
    size, _, kind = arg.partition(",")
    if size not in SIZES or kind not in ("", "synthetic"):
        raise ValueError(
            f"experiments/transfusion.py: {arg!r}: use SIZE or SIZE,synthetic with SIZE one of "
            f"{list(SIZES)}"
        )
    arg = size
    layers, width, heads = SIZES[arg]
    model = ModelConfig(
        vocab_size=32_000,
        d_model=width,
        n_layers=layers,
        n_heads=heads,
        latent_size=32,
        latent_channels=8,
        patch_size=2,
        patch_encoder="unet" if arg == "7b" else "linear",
        unet_channels=(256, 512),
        dtype="bfloat16",
        remat_policy="dots_no_batch",
        attention_impl="auto",  # splash on TPU, pallas_gpu on GPU, xla on CPU
    )
    return Config(
        name=f"transfusion_{arg}",
        model=model,
        diffusion=DiffusionConfig(num_timesteps=1000, schedule="cosine", loss_weight=5.0),
        data=data_config(kind),
        vae=VAEConfig(downsample=8, channels=(128, 256, 512), steps=100_000, batch_size=256),
        optimizer=OptimizerConfig(
            learning_rate=3e-4, warmup_steps=4000, min_lr_ratio=0.05, weight_decay=0.1
        ),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3),
        train=TrainConfig(steps=250_000, log_every=50),
    )

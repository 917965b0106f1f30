"""The multi-object shapes data at accelerator scale: the demo's model widened for one GPU.

    python -m tfx_jax demo --config experiments/shapes_gpu.py --workdir runs/shapes_gpu
    python benchmarks/shapes_eval.py --workdir runs/shapes_gpu --num 128

The `default` tier (one to three objects per caption: shape x colour x size x position, the
held-out (shape, colour) pairs never in training), 32 px, a 15M-parameter model (d_model 384 x
8 layers), 256-token rows x 128, bf16, 6,500 steps, and a VAE trained 2,000 steps at batch 256.
Issue 14 reports this recipe on one H200: 3 min 45 s of training, 97.7% of prompted objects fully
right on training-split prompts and 94.0% on held-out ones, but captions of held-out images
exactly right 2 of 32 times (the model names a pair it has seen). Its targets, one seed and
>= 128 prompts per split: >= 97% held-out prompt alignment, held-out captions with >= 80% of
objects named exactly. Variants for the captioning gap: `:cfp02` / `:cfp05` put the caption
after its image 80% / 50% of the time; `:nolmb` keeps the paper's 80% caption-first but takes
the captions that precede their image out of the LM loss (`train.lm_loss_before_images=false`:
on the demo it lifted held-out captions from 75% to 87.5%, benchmarks/RESULTS.md "Demo tuning").
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

# arg -> (caption-first share (Transfusion §4.1: 0.8), LM loss on captions before their image).
VARIANTS = {"": (0.8, True), "cfp02": (0.2, True), "cfp05": (0.5, True), "nolmb": (0.8, False)}
TOPOLOGY = "cpu"  # one host, no TPU slice: meant for one GPU (a CPU runs it, slowly)


def get_config(arg: str | None = None) -> Config:
    if (arg or "") not in VARIANTS:
        names = ", ".join(f":{v}" for v in VARIANTS if v)
        raise ValueError(f"experiments/shapes_gpu.py:{arg}: use no argument or one of {names}")
    caption_first, lm_before_images = VARIANTS[arg or ""]
    model = ModelConfig(
        vocab_size=1024,
        d_model=384,
        n_layers=8,
        n_heads=6,
        latent_size=8,
        latent_channels=4,
        patch_size=2,
        patch_encoder="linear",
        dtype="bfloat16",
        remat_policy="none",
        attention_impl="auto",
    )
    return Config(
        name=f"shapes_gpu{'_' + arg if arg else ''}",
        model=model,
        diffusion=DiffusionConfig(loss_weight=5.0, noise_limit_image_first=True),
        data=DataConfig(
            source="shapes",
            data_dir="data_cache/shapes_gpu",
            tfds_config="default",
            image_size=32,
            seq_len=256,
            global_batch_size=128,
            packing_bins=64,
            caption_first_prob=caption_first,
            # In one process the packer held the step at ~96 ms on an H200 (RESULTS.md); Grain
            # workers pack in parallel (each its own slice of the examples).
            worker_count=4,
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
        train=TrainConfig(
            steps=6500,
            log_every=100,
            eval_every=1000,
            eval_batches=4,
            eval_samples=16,
            lm_loss_before_images=lm_before_images,
        ),
    )

"""`python -m tfx_jax demo` (what `make demo` runs): the main job end to end on one config.

prepare every missing or stale data stage → train → print the losses → draw images for
training and held-out prompts and score them with the source's judge → samples.html
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tfx_jax import artifacts, stages
from tfx_jax import params as params_lib
from tfx_jax.config import Config
from tfx_jax.data import sources
from tfx_jax.data.embedded import judge, shapes
from tfx_jax.generate import sample
from tfx_jax.generate.options import SampleOptions
from tfx_jax.train import loop


def run(cfg: Config, workdir: str) -> None:
    """Prepares the data, trains, prints both losses, then draws and scores samples."""
    source = sources.of(cfg)
    if not source.makes_batches:  # a source that makes batches itself needs no stages
        print(f"tfx_jax demo: preparing the {cfg.data.source} data in {cfg.data.data_dir}/")
        stages.prepare_all(cfg)
    print(
        f"tfx_jax demo: training '{cfg.name}' for {cfg.train.steps} steps on "
        f"{cfg.data.source} data (packed text + image latents)."
    )
    history = loop.train(cfg, workdir)
    if history:
        first, last = history[0], history[-1]
        print("\n               first logged   last logged")
        for key in ("lm_loss", "diffusion_loss"):
            print(f"  {key:<14} {first[key]:>12.4f} {last[key]:>13.4f}")
    print(f"metrics: {Path(workdir) / 'metrics.jsonl'}")
    if source.has_judge:
        samples(workdir)


def samples(workdir: str, per_split: int = 4) -> None:
    """Draws images for captions from train and held-out combinations and scores them."""
    cfg, params, step = params_lib.restore_params(workdir)
    rng = np.random.default_rng(1234)
    prompts = [
        (split, shapes.caption(shapes.sample_scene(rng, split)))
        for split in ("train", "heldout")
        for _ in range(per_split)
    ]
    opts = SampleOptions(max_new_tokens=8, sampler="ddim", diffusion_steps=50, guidance_scale=3.0)
    results = sample.generate(
        cfg,
        params,
        artifacts.load_tokenizer(cfg),
        [sample.Prompt(text, (), True) for _, text in prompts],
        opts,
        vae=artifacts.load_vae(cfg),
    )
    out = Path(workdir) / "samples" / f"step_{step}"
    paths = sample.write_documents(results, out)
    print(f"\nsamples (step {step}; DDIM 50 steps, guidance 3; judged by data.embedded.judge):")
    for split in ("train", "heldout"):
        scores = []
        for (sp, text), res in zip(prompts, results, strict=True):
            if sp == split and res.images and res.images[0].image is not None:
                scores.append(judge.score(res.images[0].image, text)["fraction"])
        mean = float(np.mean(scores)) if scores else 0.0
        print(f"  {split:<8} combinations: {len(scores)} images, attributes correct {mean:.0%}")
    print(f"open {paths['html']}")

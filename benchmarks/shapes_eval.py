"""Scores a run trained on the shapes data: prompt alignment and captioning, judged exactly.

    python benchmarks/shapes_eval.py --workdir RUN [--steps 200,300] [--num 64] [--seed 0]
    python benchmarks/shapes_eval.py --config CFG [--set k=v ...]   # the VAE read-back only

What it measures (the numbers of issue 14's targets; `python -m tfx_jax eval` is the
command for users, this script is the tuning tool that produced benchmarks/RESULTS.md):
  text → image   `num` prompts per split ("train": seen (shape, colour) pairs, "heldout": at
                 least one held-out pair), scenes of the run's tier (`data.tfds_config`), drawn
                 with a fixed seed; each image is read back by `data.embedded.judge` and scored
                 per attribute (shape, colour, size, position), exact (nothing else drawn) and
                 fraction of objects fully right.
  VAE read-back  the same scenes rendered, through the VAE and back, judged: the ceiling for
                 text → image (with --config alone, only this is measured: tuning the VAE).
  image → text   `num` rendered images per split, VAE-encoded, captioned greedily; the caption
                 is read with the grammar (`shapes.read_caption`; phrases are picked out of
                 text that does not parse) and its objects matched to the scene's: attribute
                 accuracy over the scene's objects, and exact (the whole scene named right).
Prints one summary line per measurement and writes all of it as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from tfx_jax import artifacts
from tfx_jax import params as params_lib
from tfx_jax.config import ConfigError, load_config
from tfx_jax.data.embedded import builders, judge, shapes
from tfx_jax.generate import sample
from tfx_jax.generate.options import SampleOptions

ATTRIBUTES = ("shape", "color", "size", "position")


def caption_score(truth: shapes.Scene, named: tuple[shapes.SceneObject, ...]) -> dict:
    """Per-attribute accuracy of `named` against `truth` after the best one-to-one matching."""
    candidates = [*named, *([None] * len(truth))]
    best, best_value = None, (-1, -1)
    for order in itertools.permutations(range(len(candidates)), len(truth)):
        hits = [
            [c is not None and getattr(t, a) == getattr(c, a) for a in ATTRIBUTES]
            for t, c in zip(truth, (candidates[i] for i in order), strict=True)
        ]
        value = (sum(all(h) for h in hits), sum(map(sum, hits)))
        if value > best_value:
            best, best_value = hits, value
    out = {a: float(np.mean([h[i] for h in best])) for i, a in enumerate(ATTRIBUTES)}
    out["objects"] = float(np.mean([all(h) for h in best]))  # the scene's objects named exactly
    out["exact"] = shapes.canonical(named) == shapes.canonical(truth)
    return out


def _summary(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], bool | float | int)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["attributes"] = float(np.mean([out[a] for a in ATTRIBUTES]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--config", default=None, help="without --workdir: VAE read-back only")
    p.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--steps", default="", help="checkpoint steps, e.g. 200,300; default latest")
    p.add_argument("--num", type=int, default=64, help="prompts (and images) per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--diffusion-steps", type=int, default=50)
    p.add_argument("--caption-tokens", type=int, default=0, help="0: 12 per object")
    p.add_argument(
        "--text-guidance", type=float, default=1.0, help="captions guided by the image; 1 = off"
    )
    p.add_argument("--out", default=None, help="default: WORKDIR/shapes_eval.json")
    args = p.parse_args(argv)
    if args.workdir is None:
        cfg = load_config(args.config, args.set)
        report = vae_readback(cfg, _scenes(args, cfg))
        r = report
        per = " ".join(f"{a}={r[a]:.0%}" for a in ATTRIBUTES)
        print(f"vae_readback attributes {r['attributes']:.1%}  exact {r['exact']:.0%}  ({per})")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        return 0
    steps = [int(x) for x in args.steps.split(",") if x.strip()] or [None]
    out = Path(args.out or Path(args.workdir) / "shapes_eval.json")
    reports = []
    for step in steps:  # written after each step: a sweep cut short keeps what it measured
        try:
            reports.append(evaluate(args, step))
        except ConfigError as e:  # e.g. a step a run cut short never saved
            print(f"step {step}: {e}")
            continue
        out.write_text(json.dumps(reports, indent=2, default=str))
    print(f"-> {out}")
    return 0


def _scenes(args: argparse.Namespace, cfg) -> dict[str, list[shapes.Scene]]:
    spec = builders.get_config(cfg.data.tfds_config).spec
    rng = np.random.default_rng(args.seed)
    return {
        split: [shapes.sample_scene(rng, split, spec) for _ in range(args.num)]
        for split in ("train", "heldout")
    }


def vae_readback(cfg, scenes: dict[str, list[shapes.Scene]]) -> dict:
    """Ground-truth images through the VAE and back, read by the judge: the ceiling for
    text → image."""
    vae = artifacts.load_vae(cfg)
    truth = [s for split in scenes for s in scenes[split]]
    rendered = np.stack([shapes.render(s, cfg.data.image_size) for s in truth])
    recon = np.asarray(vae.decode(vae.encode(rendered)))
    return _summary(
        [
            {a: r[a] for a in (*ATTRIBUTES, "exact", "fraction")}
            for r in (judge.score(x, s) for x, s in zip(recon, truth, strict=True))
        ]
    )


def evaluate(args: argparse.Namespace, step: int | None) -> dict:
    """Scores one checkpoint (see the module docstring); prints and returns the report."""
    start = time.perf_counter()
    cfg, params, step = params_lib.restore_params(args.workdir, step=step)
    spec = builders.get_config(cfg.data.tfds_config).spec
    tokenizer, vae = artifacts.load_tokenizer(cfg), artifacts.load_vae(cfg)
    scenes = _scenes(args, cfg)
    report: dict = {
        "workdir": args.workdir,
        "step": step,
        "num": args.num,
        "seed": args.seed,
        "guidance": args.guidance,
        "text_guidance": args.text_guidance,
    }

    report["vae_readback"] = vae_readback(cfg, scenes)

    # Text → image.
    opts = SampleOptions(
        max_new_tokens=8,
        sampler=args.sampler,
        diffusion_steps=args.diffusion_steps,
        guidance_scale=args.guidance,
        seed=args.seed,
    )
    prompts = [shapes.caption(s) for split in scenes for s in scenes[split]]
    results = sample.generate(
        cfg, params, tokenizer, [sample.Prompt(t, (), True) for t in prompts], opts, vae=vae
    )
    images = [r.images[0].image if r.images else None for r in results]
    for k, split in enumerate(scenes):
        rows = []
        for text, image in zip(
            prompts[k * args.num : (k + 1) * args.num],
            images[k * args.num : (k + 1) * args.num],
            strict=True,
        ):
            if image is None:
                rows.append({**dict.fromkeys(ATTRIBUTES, 0.0), "exact": False, "fraction": 0.0})
                continue
            s = judge.score(image, text)
            rows.append({a: s[a] for a in (*ATTRIBUTES, "exact", "fraction")})
        report[f"t2i_{split}"] = _summary(rows)

    # Image → text (greedy; no image may be opened).
    copts = SampleOptions(
        max_new_tokens=args.caption_tokens or 12 * spec.max_objects + 4,
        max_images=0,
        temperature=0.0,
        guidance_scale=None,
        text_guidance=args.text_guidance,
        seed=args.seed,
    )
    examples = []
    for split in scenes:
        rendered = np.stack([shapes.render(s, cfg.data.image_size) for s in scenes[split]])
        caps = sample.caption_images(cfg, params, tokenizer, rendered, vae, copts)
        rows = [
            caption_score(shapes.canonical(s), shapes.read_caption(c.text)[0])
            for s, c in zip(scenes[split], caps, strict=True)
        ]
        report[f"i2t_{split}"] = _summary(rows)
        examples += [
            {"split": split, "truth": shapes.caption(s), "caption": c.text}
            for s, c in list(zip(scenes[split], caps, strict=True))[:6]
        ]
    report["caption_examples"] = examples
    report["seconds"] = time.perf_counter() - start

    print(f"== {args.workdir} step {step} ({report['seconds']:.0f} s)")
    for key in ("vae_readback", "t2i_train", "t2i_heldout", "i2t_train", "i2t_heldout"):
        r = report[key]
        per = " ".join(f"{a}={r[a]:.0%}" for a in ATTRIBUTES)
        whole = r.get("fraction", r.get("objects"))  # objects fully right (drawn or named)
        print(
            f"{key:<12} attributes {r['attributes']:.1%}  objects {whole:.1%}  "
            f"exact {r['exact']:.0%}  ({per})"
        )
    for e in examples:
        print(f"  {e['split']:<8} {e['truth']!r} -> {e['caption']!r}")
    return report


if __name__ == "__main__":
    sys.exit(main())

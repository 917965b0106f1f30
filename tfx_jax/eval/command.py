"""`python -m tfx_jax eval`: a run's checkpoint evaluated (params only) into RUN/eval.json and
RUN/eval/step_N/, with the same code training's evaluators run (`tfx_jax.eval`).

    evaluate_run(workdir, make_eval_step=...)    every process generates in lockstep, process 0
                                                 writes RUN/eval.json and RUN/eval/step_N/
    summary(result)                              eval.json's main numbers as text
    config_brief(cfg)                            the run's config in a few lines (the header)

The train step's loss (`make_eval_step`) and the targets to check (`targets`) are given by the
caller (the CLI, the demo), so this package never imports the trainer or the demo.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import io
import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from tfx_jax import artifacts
from tfx_jax import params as params_lib
from tfx_jax.config import Config, ConfigError, apply_overrides
from tfx_jax.data import sources
from tfx_jax.data.judging import Judge
from tfx_jax.data.sources import RecordError
from tfx_jax.diffusion import modes
from tfx_jax.eval import fd
from tfx_jax.eval.losses import LossEval, MakeEvalStep, loss_metrics
from tfx_jax.eval.prompts import (
    IMAGE_OPTIONS,
    Captioned,
    Drawn,
    Prompting,
    sample_grid,
    split_options,
)
from tfx_jax.generate import sample
from tfx_jax.generate.documents import write_documents
from tfx_jax.generate.options import SampleOptions
from tfx_jax.models.transformer import Transfusion

log = logging.getLogger("tfx_jax")

LOSS_SPLIT = "validation"
DOCUMENT_TOKENS = 128  # text budget of the interleaved document (its images come on top)
# `metrics -> rows` of the targets a run is held to (`demo.check_targets`): name, key, goal,
# value, met, short_by.
CheckTargets = Callable[[dict[str, float]], list[dict]]


def summary(result: dict) -> str:
    """eval.json's main numbers and the targets (met / MISSED by how much) as text."""
    m = result["metrics"]
    pct = lambda k: f"{100 * m[k]:5.1f}%" if k in m else "    - "
    head = f"{result['num_prompts']} prompts per split, seed {result['seed']}"
    lines = [f"eval of step {result['step']} ({head}):"]
    if "eval/perplexity" in m:
        lines.append(
            f"  held-out perplexity {m['eval/perplexity']:.4g}, diffusion loss "
            f"{m['eval/diffusion_loss']:.4g}"
        )
    splits = list(dict.fromkeys(s["split"] for s in result.get("samples", [])))
    for prefix, title in (("eval/judge", "prompt -> image"), ("eval/caption", "image -> text")):
        if not any(f"{prefix}/{s}/attributes" in m for s in splits):
            continue
        lines.append(f"  {title:<16} attributes  objects right  count  exact")
        for s in splits:
            k = f"{prefix}/{s}"
            lines.append(
                f"    {s:<14} {pct(k + '/attributes'):>10} {pct(k + '/objects'):>14} "
                f"{pct(k + '/count'):>6} {pct(k + '/exact'):>6}"
            )
    # The judge's per-row groups (`Judge.groups` named row_<row>), in its order.
    rows = [r for k in m for r in re.findall(r"^eval/judge/row_([^/]+)/objects$", k)]
    if rows:
        by_row = ", ".join(f"{r} {pct(f'eval/judge/row_{r}/objects').strip()}" for r in rows)
        lines.append(f"  objects drawn right by grid row: {by_row}")
    lines += _fd_lines(result.get("fd"), m)
    if result.get("targets"):
        lines.append("targets:")
        for t in result["targets"]:
            verdict = "met" if t["met"] else f"MISSED by {100 * t['short_by']:.1f} points"
            lines.append(
                f"  {t['name']:<48} goal {100 * t['goal']:.0f}%  measured "
                f"{100 * t['value']:5.1f}%  {verdict}"
            )
    return "\n".join(lines)


def _fd_lines(info: dict | None, m: dict[str, float]) -> list[str]:
    """The in-domain FD beside its noise floor, the diversity figures and the classifier."""
    if not info or not info["samples"]:
        return []
    c = info["classifier"]
    lines = [
        f"  {info['what']}:",
        "    split          samples        FD   floor (real vs real)   diversity generated / real",
    ]
    for s, n in info["samples"].items():
        lines.append(
            f"    {s:<14} {n:>7} {m[f'eval/fd/{s}']:>9.5g} {m[f'eval/fd_floor/{s}']:>22.5g}   "
            f"{m[f'eval/diversity/{s}']:>13.4g} / {m[f'eval/diversity_real/{s}']:.4g}"
        )
    how = "trained now" if c["trained_now"] else "cached; trained"
    lines.append(
        f"    its classifier: held-out accuracy {100 * c['accuracy']:.1f}% of labels, "
        f"{100 * c['exact']:.1f}% of images"
    )
    lines.append(f"    with every label right ({how} in {c['seconds']:.0f} s)")
    return lines


# ----------------------------------------------------------------------------- eval command


def config_brief(cfg: Config, num_params: int | None = None) -> dict[str, str]:
    """The run's config in a few lines (the report's header)."""
    m, d, df, tr, op = cfg.model, cfg.data, cfg.diffusion, cfg.train, cfg.optimizer
    data = sources.of(cfg).describe(cfg)  # e.g. "shapes (single)"
    out = {
        "name": cfg.name,
        "model": f"{m.n_layers} layers x d_model {m.d_model}, {m.n_heads} heads, vocab "
        f"{m.vocab_size}, {m.dtype}",
        "images": f"{d.image_size} px -> {m.latent_size}x{m.latent_size}x{m.latent_channels} "
        f"latents, {m.patch_size}x{m.patch_size} patches ({m.num_patches} per image), "
        f"{m.patch_encoder} patch encoder"
        + (", causal attention inside images" if m.image_attention == "causal" else ""),
        "diffusion": f"{df.mode}, {df.schedule} schedule, {df.num_timesteps} steps, loss "
        f"weight {df.loss_weight}, p_uncond {df.p_uncond}",
        "data": f"{data}, seq_len {d.seq_len} x batch {d.global_batch_size}",
        "training": f"{tr.steps} steps, AdamW lr {op.learning_rate} (warmup "
        f"{op.warmup_steps}), eval every {tr.eval_every}"
        + ("" if tr.lm_loss_before_images else ", no LM loss on captions before their image"),
    }
    if num_params is not None:
        out["parameters"] = f"{num_params:,}"
    return out


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _document_prompt(cfg: Config, source: sources.Source) -> str | None:
    """The text before the first image of a validation interleaved document (None: the source
    has none among the first 256 of the split)."""
    if "validation" not in source.splits(cfg):
        return None
    data = source.open_split(cfg, "validation")
    for index in range(min(len(data), 256)):
        try:
            ex = data[index]
        except RecordError:
            continue
        if ex.get("kind") == "interleaved" and sample.IMAGE_PLACEHOLDER in ex["text"]:
            head = ex["text"].split(sample.IMAGE_PLACEHOLDER)[0].strip()
            if head:
                return head
    return None


def evaluate_run(
    workdir: str | epath.PathLike,
    step: int | None = None,
    *,
    splits: Sequence[str] | None = None,
    num_prompts: int = 64,
    options: SampleOptions = IMAGE_OPTIONS,
    overrides: Sequence[str] = (),
    num_batches: int = 0,
    document: bool = True,
    make_eval_step: MakeEvalStep,
    targets: CheckTargets | None = None,
) -> dict:
    """Evaluates a run's checkpoint (params only) and writes RUN/eval.json and RUN/eval/step_N/.

    Args:
      workdir: the run's workdir.
      step: default the newest complete checkpoint.
      splits: prompt splits (default `prompt_splits`: the judge's, train and heldout for the
        shapes data).
      num_prompts: prompts per split (also the in-domain FD's sample count, `fd`).
      options: how images are drawn (`IMAGE_OPTIONS`, as training's evaluator draws them);
        `options.seed` also picks the prompt examples (training's evaluator: 0).
      overrides: `--set key=value` on the saved config (e.g. data.data_dir when moved).
      num_batches: validation batches for the losses (0: train.eval_batches, as training).
      document: also continue one interleaved validation document.
      make_eval_step: `(model, cfg) -> (params, batch, rng) -> metrics`, the train step's
        eval losses (`train.steps.make_eval_step`), jitted here as `LossEval`.
      targets: the scores the run is held to (`demo.check_targets`), checked when the source
        has a judge: eval.json's "targets" (else empty).

    Returns:
      The eval.json content (identical on every process; process 0 writes it).
    """
    root = epath.Path(workdir)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such run directory (give the --workdir of a run).")
    cfg, params, step = params_lib.restore_params(root, step=step)
    cfg = apply_overrides(cfg, overrides)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    options, caption_options = split_options(options)
    options = options.resolved(cfg)
    seed = options.seed
    source = sources.of(cfg)
    splits = tuple(splits or ())
    if source.has_images and splits:
        bad = [s for s in splits if s not in source.splits(cfg)]
        if bad:
            raise ConfigError(
                f"--split {','.join(bad)}: data.source={cfg.data.source} has the splits "
                f"{source.splits(cfg)}."
            )
    is_main = jax.process_index() == 0
    out_dir = root / "eval" / f"step_{step}"
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    report: dict[str, Any] = {
        "step": int(step),
        "workdir": str(root),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": config_brief(cfg, num_params),
        "seed": seed,
        "num_prompts": num_prompts,
        "image_options": dataclasses.asdict(options),
        "caption_options": dataclasses.asdict(caption_options),
        "metrics": {},
        "samples": [],
        "captions": [],
        "document": None,
        "fd": None,
    }
    metrics = report["metrics"]

    num_batches = num_batches or cfg.train.eval_batches
    if LOSS_SPLIT in source.splits(cfg):
        log.info("eval: losses over %d %s batches", num_batches, LOSS_SPLIT)
        batches = artifacts.batches(cfg, LOSS_SPLIT, shuffle=False, num_epochs=None)
        pure_step = make_eval_step(Transfusion(cfg.model), cfg)
        step_fn = functools.partial(LossEval(cfg, mesh, pure_step), params)
        metrics.update(loss_metrics(step_fn, batches, num_batches, cfg.diffusion))
        report["loss_batches"] = num_batches

    if source.has_images:
        prompting = Prompting(cfg, num_prompts, seed, splits or None)
        log.info(
            "eval: %d images for the prompts of %s",
            len(prompting.examples),
            "/".join(prompting.splits),
        )
        stream = sample.RowStream() if modes.windowed(options.image_mode) else None
        drawn, captioned, scores = prompting(
            cfg, params, mesh, options, stream, caption_options=caption_options
        )
        metrics.update(scores)
        fd_scores, report["fd"] = fd.fd_metrics(cfg, prompting, drawn, seed)
        metrics.update(fd_scores)
        if stream is not None:
            report["streams"] = _strips(stream, drawn, prompting.vae, out_dir, step, is_main)
        rel = f"eval/step_{step}"
        report["samples"], report["captions"] = _records(
            drawn, captioned, prompting.judge, out_dir, rel, is_main
        )
        if is_main and drawn:
            (out_dir / "grid.png").write_bytes(_png(sample_grid(drawn)))
        if document:
            report["document"] = _document(
                cfg, params, mesh, prompting, options, out_dir, f"{rel}/document"
            )

    judged = targets is not None and source.judge(cfg) is not None
    report["targets"] = targets(metrics) if judged else []
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=1, sort_keys=False)
        (out_dir / "eval.json").write_text(text)
        (root / "eval.json").write_text(text)
    return report


def _records(
    drawn: Sequence[Drawn],
    captioned: Sequence[Captioned],
    judge: Judge | None,
    out_dir: epath.Path,
    rel: str,
    is_main: bool,
) -> tuple[list[dict], list[dict]]:
    """eval.json's per-example records (samples, captions) with the judge's results as JSON
    (`Judge.to_json`); process 0 writes their images as samples/<split>_<i>.png (drawn) and
    truth/<split>_<i>.png (the true image)."""
    scores = lambda judged: None if judged is None or judge is None else judge.to_json(judged)
    samples, captions, count = [], [], {}
    for d, c in zip(drawn, captioned, strict=True):
        split = d.example.split
        i = count[split] = count.get(split, -1) + 1
        name = f"{split}_{i:03d}.png"
        if is_main:
            for folder, image in (("samples", d.image), ("truth", c.example.image)):
                if image is not None:
                    (out_dir / folder).mkdir(parents=True, exist_ok=True)
                    (out_dir / folder / name).write_bytes(_png(image))
        samples.append(
            {
                "split": split,
                "prompt": d.example.text,
                "image": f"{rel}/samples/{name}" if d.image is not None else None,
                "judge": scores(d.judged),
            }
        )
        captions.append(
            {
                "split": split,
                "truth": c.example.text,
                "image": f"{rel}/truth/{name}",
                "generated": c.text,
                "read": c.read,
                "judge": scores(c.judged),
            }
        )
    return samples, captions


STREAMS = 4  # rolling mode: strips of rows arriving, for the first prompts


def _strips(
    stream: sample.RowStream,
    drawn: Sequence[Drawn],
    vae: Any,
    out_dir: epath.Path,
    step: int,
    is_main: bool,
) -> list[dict]:
    """Rolling mode: for the first `STREAMS` prompts, the image after each pass of the window
    side by side (rows arrive top to bottom; grey is not generated yet)."""
    out = []
    for b in range(min(STREAMS, len(drawn))):
        if (b, 0) not in stream.rows:
            continue
        frames = stream.frames((b, 0), vae)
        H, W = frames[0].shape[:2]
        gap = sample.RowStream.GAP
        strip = np.full((H, len(frames) * (W + gap) - gap, 3), 255, np.uint8)
        for k, f in enumerate(frames):
            strip[:, k * (W + gap) : k * (W + gap) + W] = f
        name = f"stream/strip_{b:03d}.png"
        if is_main:
            (out_dir / "stream").mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_bytes(_png(strip))
        out.append({"prompt": drawn[b].example.text, "strip": f"eval/step_{step}/{name}"})
    return out


def _document(
    cfg: Config,
    params: Any,
    mesh: Mesh,
    prompting: Prompting,
    options: SampleOptions,
    out_dir: epath.Path,
    rel: str,
) -> dict | None:
    """One interleaved document: a validation document's opening text, continued by the model
    (greedy text, its images drawn as the prompts' are), written as Markdown + HTML."""
    head = _document_prompt(cfg, prompting.source)
    if head is None:
        return None
    log.info("eval: one interleaved document from %r", head)
    opts = dataclasses.replace(options, max_new_tokens=DOCUMENT_TOKENS, max_images=3)
    (res,) = sample.generate(
        cfg, params, prompting.tokenizer, [head], opts, vae=prompting.vae, mesh=mesh
    )
    if jax.process_index() == 0:
        write_documents([res], out_dir / "document")
    pieces = []
    for j, piece in enumerate(res.pieces):  # write_documents names them s000_gen_<j>.png
        if piece.kind == "text":
            pieces.append({"kind": "text", "text": piece.text})
        else:
            pieces.append({"kind": "image", "image": f"{rel}/images/s000_gen_{j:02d}.png"})
    return {"prompt": head, "pieces": pieces, "stop": res.stop, "html": f"{rel}/samples.html"}

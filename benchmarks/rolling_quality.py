"""Standard vs rolling diffusion on 8-patch-row images, judged per image row (issue 15).

One process does the whole job, so it fits one call of a lent GPU:
  1. the data stages of `experiments/shapes_rolling.py` (64 px shapes, tokenizer, VAE, encode);
  2. the VAE round-trip ceiling: ground-truth renders of the prompts through the VAE, judged;
  3. trainings in priority order, the same steps each (same data, same compute per step):
     standard; rolling with the init share W/(W+g-1) (`rolling_init_prob=-1`); rolling with the
     old 0.1; rolling with window 2 — each started only if the time left fits it;
  4. after each training, images for train and held-out prompts with each sampler (DDIM 50,
     guidance 3; rolling also with 100 steps), judged by `data.embedded.judge`: the mean share of
     prompted objects fully right, exact images, accuracy by the grid row of the prompted
     object (top / middle / bottom) and detections no prompt asked for, by row;
  5. sampler cost of one rolling model: compiled temp memory of one full-image call vs one
     rolling pass, and when rows arrive (time to first row, time per row) vs the full image.
Results go to OUT/results.json after every step (a cut-off run still reports what it did), a
grid of samples to OUT/samples.png, one rolling stream to OUT/stream_*.png.

    PYTHONPATH=. python benchmarks/rolling_quality.py --out /tmp/rq --steps 4000 --deadline 540
    PYTHONPATH=. python benchmarks/rolling_quality.py --out /tmp/rq --smoke    # CPU, minutes
    PYTHONPATH=. python benchmarks/rolling_quality.py --out /tmp/rq --cost-only 8  # cost only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tfx_jax.data.embedded import judge, shapes

CONFIG = "experiments/shapes_rolling.py"
ROW_NAMES = ("top", "middle", "bottom")
SPLITS = ("train", "heldout")
# (name, config arg, overrides): trained in this order while time is left.
VARIANTS = (
    ("standard", "", ()),
    ("rolling_auto", "rolling", ("diffusion.rolling_init_prob=-1",)),
    ("rolling_p0.1", "rolling", ("diffusion.rolling_init_prob=0.1",)),
    (
        "rolling_auto_w2",
        "rolling",
        ("diffusion.rolling_init_prob=-1", "diffusion.rolling_window=2"),
    ),
)
SMOKE = (  # a CPU check of the whole flow: tiny data, model and steps
    "data.tfds_config=tiny",
    "data.data_dir=data_cache/rq_smoke",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "vae.steps=4",
    "vae.log_every=2",
    "data.global_batch_size=8",
)


def row_of(position: str) -> int:
    """The 3x3 grid row (0 top .. 2 bottom) of a position word."""
    return shapes.POSITIONS.index(position) // 3


def judge_one(image: np.ndarray, scene: tuple) -> dict:
    """The judge's score of one image, with the grid rows of its detections. An image the judge
    cannot read (it raised) counts as wrong on every object, and is counted."""
    try:
        s = judge.score(image, scene)
        s["detected_rows"] = [row_of(d.object.position) for d in judge.detect(image)]
    except ValueError as e:
        objects = [{"prompt": o, "found": None, "present": False} for o in scene]
        s = {"fraction": 0.0, "exact": False, "objects": objects, "detected_rows": []}
        s["judge_error"] = str(e)
    return s


def summarise(scores: list[dict]) -> dict:
    """Mean share of prompted objects fully right, exact images, and by grid row: accuracy of
    the prompted objects there and detections no prompted object was matched to."""
    right, asked, extra = np.zeros(3), np.zeros(3), np.zeros(3)
    for s in scores:
        for o in s["objects"]:
            r = row_of(o["prompt"].position)
            asked[r] += 1
            right[r] += o["present"]
            if o["found"] is not None:
                extra[row_of(o["found"].position)] -= 1
        for r in s["detected_rows"]:
            extra[r] += 1
    return {
        "score": float(np.mean([s["fraction"] for s in scores])),
        "exact": float(np.mean([s["exact"] for s in scores])),
        "images": len(scores),
        "row_accuracy": {n: float(right[r] / max(asked[r], 1)) for r, n in enumerate(ROW_NAMES)},
        "row_objects": {n: int(asked[r]) for r, n in enumerate(ROW_NAMES)},
        "row_extra": {n: int(extra[r]) for r, n in enumerate(ROW_NAMES)},
        "judge_errors": [s["judge_error"] for s in scores if "judge_error" in s],
    }


def prompts_for(per_split: int, seed: int = 1234) -> list[tuple[str, tuple, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for split in SPLITS:
        for _ in range(per_split):
            scene = shapes.sample_scene(rng, split)
            out.append((split, scene, shapes.caption(scene)))
    return out


def by_split(prompts, images) -> dict:
    scores = [judge_one(im, p[1]) for p, im in zip(prompts, images, strict=True)]
    pairs = list(zip(prompts, scores, strict=True))
    res = {sp: summarise([s for p, s in pairs if p[0] == sp]) for sp in SPLITS}
    res["all"] = summarise(scores)
    return res


class Job:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"args": vars(args), "variants": {}, "timings": {}}
        self.grid_rows: list[tuple[str, list[np.ndarray]]] = []

    def left(self) -> float:
        return self.args.deadline - (time.time() - self.t0)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def log(self, msg: str) -> None:
        print(f"[rq {time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def config(self, arg: str, overrides=()):
        from tfx_jax.config import load_config

        extra = list(SMOKE) if self.args.smoke else []
        sets = [*extra, f"train.steps={self.args.steps}", *self.args.set, *overrides]
        return load_config(f"{CONFIG}:{arg}" if arg else CONFIG, sets)


def generate_images(cfg, params, tok, vae, prompts, mode, steps, on_row=None, seed=0):
    from tfx_jax.generate import sample
    from tfx_jax.generate.options import SampleOptions

    opts = SampleOptions(
        max_new_tokens=1,
        sampler="ddim",
        diffusion_steps=steps,
        guidance_scale=3.0,
        image_mode=mode,
        seed=seed,
    )
    reqs = [sample.Prompt(p[2], (), True) for p in prompts]
    res = sample.generate(cfg, params, tok, reqs, opts, vae=vae, on_row=on_row)
    return [r.images[0].image for r in res]


def reuse_decoders() -> None:
    """Makes `generate` reuse one `Decoder` (and so its compiled functions) per model shape and
    options: each call otherwise builds a new one and compiles everything again. Benchmark only:
    a Decoder depends on the config only through the model, the schedule, the mesh and the
    rolling window, which the key holds."""
    from tfx_jax.generate import decode, sample

    cache: dict = {}

    def make(cfg, mesh, options):
        d = cfg.diffusion
        key = (cfg.model, cfg.mesh, d.schedule, d.num_timesteps, d.rolling_window, options)
        if key not in cache:
            cache[key] = decode.Decoder(cfg, mesh, options)
        return cache[key]

    sample.Decoder = make


def sampler_cost(cfg, params, tok, prompts) -> dict:
    """What one image costs with each sampler, for a batch of `prompts`.

    Memory: the compiled temp (activation) memory of one full-image call and of one rolling pass
    and row commit; the KV cache and the params are arguments, the same for both. Time: each
    compiled call re-run after its first (device time), and wall-clock times of a whole
    `generate` call once compiled (prompt prefill and host loop included): when `on_row` saw the
    first row, the mean gap between rows, and the full sampler's whole image.
    """
    import jax

    from tfx_jax.generate import decode
    from tfx_jax.sharding import mesh_context

    seen: dict = {}
    orig = decode.Decoder.__init__

    def recording_init(self, *a, **k):  # keep one call of each image function per shape
        orig(self, *a, **k)
        for name in ("image_full", "rolling_pass", "commit"):
            fn, raw = getattr(self, name), getattr(self, f"_{name}")

            def rec(*args, fn=fn, raw=raw, name=name, dec=self):
                shapes_ = str(jax.tree.map(lambda x: getattr(x, "shape", None), args))
                kind = f"{dec.opts.image_mode}/{name}"
                seen.setdefault((kind, shapes_), (kind, dec, fn, raw, args))
                return fn(*args)

            setattr(self, name, rec)

    out: dict = {"batch": len(prompts)}
    arrivals: list[float] = []
    decode.Decoder.__init__ = recording_init
    try:
        for mode in ("full", "rolling"):
            start = time.perf_counter()
            generate_images(cfg, params, tok, None, prompts, mode, 50, seed=1)
            out[f"{mode}_first_call_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        generate_images(
            cfg,
            params,
            tok,
            None,
            prompts,
            "rolling",
            50,
            on_row=lambda b, r, x: arrivals.append(time.perf_counter()),
            seed=1,  # options of their own: fresh Decoders, recorded, then reused here
        )
        end = time.perf_counter()
        generate_images(cfg, params, tok, None, prompts, "full", 50, seed=1)
        out["full_wall_s"] = round(time.perf_counter() - end, 4)
    finally:
        decode.Decoder.__init__ = orig
    per_row = arrivals[:: len(prompts)]  # on_row fires once per prompt for each row
    out["rolling_wall_s"] = round(end - start, 4)
    out["rolling_wall_first_row_s"] = round(per_row[0] - start, 4)
    out["rolling_wall_row_gap_s"] = round(float(np.mean(np.diff(per_row))), 4)
    calls = []
    for kind, dec, fn, raw, args in seen.values():
        jax.block_until_ready(fn(*args))
        t = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(fn(*args))
        rec = {"call": kind, "device_s": round((time.perf_counter() - t) / 3, 5)}
        if "rolling_pass" in kind:
            rec["steps"] = int(args[-2].shape[0]) - 1  # taus [n + 1, W]
        with mesh_context(dec.mesh, dec.cfg):
            mem = jax.jit(raw).lower(*args).compile().memory_analysis()
        if mem is not None:
            rec["temp_mib"] = round(mem.temp_size_in_bytes / 2**20, 3)
            rec["args_mib"] = round(mem.argument_size_in_bytes / 2**20, 3)
        calls.append(rec)
    out["calls"] = calls
    return out


def cost_only(args) -> None:
    """`sampler_cost` of the rolling config with random weights: cost does not depend on them."""
    import jax
    from flax import linen as nn

    from tfx_jax.config import load_config
    from tfx_jax.data.tokenizer import Tokenizer, train_tokenizer
    from tfx_jax.layout import ModelInputs
    from tfx_jax.models.transformer import Transfusion

    reuse_decoders()
    cfg = load_config(f"{CONFIG}:rolling", args.set)
    model = Transfusion(cfg.model)
    dummy = ModelInputs.dummy(cfg, length=8, images=1)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, dummy)["params"]))(jax.random.key(0))
    prompts = prompts_for(args.cost_only)[: args.cost_only]
    tok = Tokenizer(train_tokenizer([p[2] for p in prompts_for(200)], 300))
    out = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "config": f"{CONFIG}:rolling {' '.join(args.set)}".strip(),
        "sampler_cost": sampler_cost(cfg, params, tok, prompts),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cost.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def grid_png(rows: list[tuple[str, list[np.ndarray]]], path: Path) -> None:
    from PIL import Image

    if not rows:
        return
    h, w = rows[0][1][0].shape[:2]
    n = max(len(r[1]) for r in rows)
    canvas = np.full((len(rows) * (h + 2), n * (w + 2), 3), 255, np.uint8)
    for i, (_, ims) in enumerate(rows):
        for j, im in enumerate(ims):
            canvas[i * (h + 2) : i * (h + 2) + h, j * (w + 2) : j * (w + 2) + w] = im
    Image.fromarray(canvas).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workroot", default="runs/rolling_quality")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--per-split", type=int, default=128, help="prompts per split")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole job")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--set", action="append", default=[], help="config override for all")
    ap.add_argument("--smoke", action="store_true", help="tiny everything (a CPU check)")
    ap.add_argument(
        "--cost-only",
        type=int,
        default=0,
        help="only the sampler cost, for this many prompts, with random weights (no data)",
    )
    args = ap.parse_args()
    if args.cost_only:
        cost_only(args)
        return
    if args.smoke:
        args.steps, args.per_split = min(args.steps, 6), min(args.per_split, 3)
    job = Job(args)
    reuse_decoders()

    import jax

    from tfx_jax import artifacts, stages
    from tfx_jax import params as params_lib
    from tfx_jax.generate import sample
    from tfx_jax.models.vae import Codec
    from tfx_jax.train import loop

    job.results["device"] = str(jax.devices()[0].device_kind)
    job.results["versions"] = {"jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    base = job.config("")
    t = time.time()
    stages.prepare_all(base)
    job.results["timings"]["data_s"] = round(time.time() - t, 1)
    job.log(f"data ready in {job.results['timings']['data_s']}s")
    tok, vae = artifacts.load_tokenizer(base), artifacts.load_vae(base)
    prompts = prompts_for(args.per_split)

    # The ceiling: what the judge reads from the ground truth after a VAE round trip.
    gt = np.stack([shapes.render(p[1], base.data.image_size) for p in prompts])
    codec = Codec(*vae)
    rt = np.asarray(codec.decode(codec.encode(jax.numpy.asarray(gt))))
    job.results["vae_ceiling"] = by_split(prompts, list(rt))
    job.log(f"VAE round trip: {json.dumps(job.results['vae_ceiling']['all'])}")
    job.save()

    wanted = args.variants.split(",")
    need = 0.0  # what one more variant takes: its training and one sampler's evaluation
    for rank, (name, arg, overrides) in enumerate(VARIANTS):
        if name not in wanted:
            continue
        if rank >= 2 and job.left() < need:  # the first two are the comparison: always run
            job.log(f"skipping {name}: {job.left():.0f}s left, it needs ~{need:.0f}s")
            job.results["variants"][name] = {"skipped": f"time ({job.left():.0f}s left)"}
            job.save()
            continue
        tv = time.time()
        cfg = job.config(arg, overrides)
        workdir = Path(args.workroot) / name
        history = loop.train(cfg, str(workdir))
        train_s = time.time() - tv
        cfg, params, step = params_lib.restore_params(str(workdir))
        rec = {
            "steps": step,
            "train_s": round(train_s, 1),
            "mode": cfg.diffusion.mode,
            "window": cfg.diffusion.rolling_window,
            "init_prob": cfg.diffusion.rolling_init_prob,
            "loss": [
                {k: h[k] for k in ("step", "lm_loss", "diffusion_loss", "step_time_s") if k in h}
                for h in history
            ],
            "samplers": {},
        }
        job.results["variants"][name] = rec
        job.log(f"{name}: trained {step} steps in {train_s:.0f}s")

        def evaluate(mode, steps, on_row=None, name=name, cfg=cfg, params=params, rec=rec):
            ts = time.time()
            images = generate_images(cfg, params, tok, vae, prompts, mode, steps, on_row=on_row)
            gen_s = time.time() - ts
            scores = by_split(prompts, images)
            scores["generate_s"] = round(gen_s, 1)
            rec["samplers"][f"{mode}_{steps}"] = scores
            job.grid_rows.append((f"{name}/{mode}_{steps}", images[:12] + images[-12:]))
            grid_png(job.grid_rows, job.out / "samples.png")
            a = scores["all"]
            job.log(
                f"{name} {mode}_{steps}: train {scores['train']['score']:.3f} heldout "
                f"{scores['heldout']['score']:.3f} rows {a['row_accuracy']} extra {a['row_extra']}"
                f" ({gen_s:.0f}s)"
            )
            job.save()
            return time.time() - ts

        if cfg.diffusion.mode == "standard":
            eval_s = evaluate("full", 50)
        else:
            # The streaming API on the same call: rows as they arrive, kept for two prompts.
            stream = sample.RowStream() if name == "rolling_auto" else None
            eval_s = evaluate("rolling", 50, on_row=stream)
            if stream is not None:
                stream.rows = {key: v for key, v in stream.rows.items() if key[0] < 2}
                stream.write(job.out, vae)
        need = train_s + eval_s + 15
        if name == "rolling_auto":
            evaluate("full", 50)  # the rolling model with the full sampler
            if job.left() > 120:
                job.results["sampler_cost"] = sampler_cost(cfg, params, tok, prompts[:8])
                job.log(f"sampler cost: {job.results['sampler_cost']}")
                job.save()
            if job.left() > need + 60:  # steps per pass: 100 steps a row (25 per pass)
                evaluate("rolling", 100)
    job.results["grid_rows"] = [r[0] for r in job.grid_rows]
    job.save()
    job.log("done")


if __name__ == "__main__":
    main()

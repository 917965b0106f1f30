"""The largest Transfusion paper size that trains on one accelerator at T 4096 (issue 17 item 5).

    python benchmarks/memory_fit.py --out $OUT --deadline 200

Ahead-of-time: for each size of experiments/transfusion.py, largest first, the train step is
compiled on the local device without creating the state (`tfx_jax.dryrun.compile_step`: abstract
state, the Trainer's own jitted step) and `memory_analysis()` gives its peak, arguments + outputs
not aliased to the donated state + temporaries, which is compared with the device's memory
(`bytes_limit`; XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.95 here). The first size that fits
at batch 1 with the leanest remat policy (`full`) is the largest that trains. That size is then
searched over `--policies` (model.remat_policy; the least remat that fits at batch 1 wins) and
that policy's batches 2, 4, ... (stopping at the first that does not fit). Finally the preferred
fitting point (least remat, then the largest batch) really runs `--steps` steps on synthetic
batches to confirm, with tokens/s and MFU (its compile comes from a persistent cache). Sizes whose
state and gradients alone (16 bytes per parameter: fp32 params, grads, AdamW moments) exceed the
memory are skipped without compiling. New work is not started past `--deadline`; memory_fit.json
and memory_fit.md are rewritten after every compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
LEANEST = "full"  # recomputes the whole block: the least memory
PREFERENCE = ("none", "dots_no_batch", "dots", "full")  # fastest first, when it fits


def choose(points: list[dict]) -> list[dict]:
    """Fitting points in the order to confirm: least remat first, then the largest batch."""
    fit = [p for p in points if p.get("fits")]
    rank = {k: i for i, k in enumerate(PREFERENCE)}
    best = {}
    for p in fit:  # the largest fitting batch per (size, policy)
        key = (p["size"], p["policy"])
        if key not in best or p["batch"] > best[key]["batch"]:
            best[key] = p
    return sorted(best.values(), key=lambda p: (rank.get(p["policy"], 99), -p["batch"]))


def markdown(report: dict) -> str:
    gib = 2**30
    lines = [
        f"Device: {report['device']}, memory limit {report['limit_bytes'] / gib:.1f} GiB, "
        f"T {report['seq_len']}, jax {report['jax']}.",
        "",
        "| size | remat | batch | arguments GiB | temp GiB | peak GiB | fits | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        lines.append(
            f"| {p['size']} | {p['policy']} | {p['batch']} | "
            f"{p.get('argument_bytes', 0) / gib:.1f} | {p.get('temp_bytes', 0) / gib:.1f} | "
            f"{p.get('peak_bytes', 0) / gib:.1f} | {'yes' if p.get('fits') else 'no'}"
            f"{' (' + p['note'] + ')' if p.get('note') else ''} | "
            f"{p.get('compile_s', 0):.0f} |"
        )
    for r in report["runs"]:
        if "error" in r:
            lines.append(
                f"\nRun {r['size']} {r['policy']} B{r['batch']}: failed: {r['error'][:300]}"
            )
        else:
            lines.append(
                f"\nRun {r['size']} remat {r['policy']} B{r['batch']} x T{report['seq_len']}: "
                f"{r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {100 * r['mfu']:.1f}% "
                f"(loss {r['loss']:.3f})."
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="experiments/transfusion.py", help="SIZE is appended")
    p.add_argument("--sizes", default="7b,1.4b,0.76b,0.37b,0.16b", help="tried in this order")
    p.add_argument("--policies", default="dots_no_batch,full", help="of " + ",".join(PREFERENCE))
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=2, help="steps of the confirming run")
    p.add_argument("--confirm", type=int, default=1, help="how many fitting points to run")
    p.add_argument("--memory-gib", type=float, default=0, help="override the device's limit")
    p.add_argument("--deadline", type=float, default=240.0)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/memory_fit"))
    a = p.parse_args()
    t_start = time.perf_counter()
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import images_in, measure

    from tfx_jax import dryrun
    from tfx_jax.config import load_config
    from tfx_jax.data.sources import synthetic
    from tfx_jax.observability import flops
    from tfx_jax.train.loop import Trainer

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    limit = int(a.memory_gib * 2**30) or int(stats.get("bytes_limit", 0))
    if not limit:
        p.error(f"{dev.device_kind} reports no memory limit: pass --memory-gib")
    policies = a.policies.split(",")
    if any(x not in PREFERENCE for x in policies):
        p.error(f"--policies {a.policies!r}: use names from {PREFERENCE} (model.remat_policy)")
    # The confirming run compiles the same step again: let it come from the cache.
    jax.config.update("jax_compilation_cache_dir", "/tmp/tfx_jax_memory_fit_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if LEANEST in policies:  # the leanest decides whether a size fits at all: try it first
        policies = [LEANEST] + [x for x in policies if x != LEANEST]
    report = {
        "device": dev.device_kind,
        "limit_bytes": limit,
        "seq_len": a.seq_len,
        "jax": jax.__version__,
        "points": [],
        "runs": [],
        "largest_size": None,
    }

    def save():
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "memory_fit.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(a.out, "memory_fit.md"), "w") as f:
            f.write(markdown(report) + "\n")

    def config(size, policy, batch):
        sets = [
            f"data.seq_len={a.seq_len}",
            f"data.global_batch_size={batch}",
            f"model.remat_policy={policy}",
        ] + a.overrides
        return dryrun.target_config(load_config(f"{a.config}:{size},synthetic", sets), dev.platform)

    slowest = 0.0

    def time_left(reserve=0.0):
        return a.deadline - (time.perf_counter() - t_start) - reserve > 1.5 * slowest

    def try_point(size, policy, batch) -> dict:
        nonlocal slowest
        cfg = config(size, policy, batch)
        point = {"size": size, "policy": policy, "batch": batch}
        n = dryrun.count_params(cfg)
        if 16 * n > limit:  # state + gradients alone
            point.update(fits=False, note=f"{n / 1e9:.2f}B params x 16 bytes > limit")
        else:
            c = dryrun.compile_step(cfg, [dev])
            slowest = max(slowest, c.seconds)
            point.update(
                argument_bytes=c.argument_bytes,
                temp_bytes=c.temp_bytes,
                peak_bytes=c.total_bytes,
                compile_s=c.seconds,
                fits=c.total_bytes <= limit and not c.oom,
                note="compiler OOM" if c.oom else "",
            )
        report["points"].append(point)
        save()
        print(point, flush=True)
        return point

    reserve = 60.0  # keep for the confirming run (a fresh compile and a few steps)
    for size in a.sizes.split(","):
        if not time_left(reserve) or not try_point(size, policies[0], 1)["fits"]:
            continue
        report["largest_size"] = size
        # The least remat that fits at batch 1 is the fastest policy; then its largest batch.
        best = policies[0]
        for policy in sorted(policies[1:], key=lambda x: PREFERENCE.index(x)):
            if time_left(reserve) and try_point(size, policy, 1)["fits"]:
                best = policy
                break
        batch = 2
        while batch <= a.max_batch and time_left(reserve):
            if not try_point(size, best, batch)["fits"]:
                break
            batch *= 2
        break
    for pt in choose(report["points"])[: a.confirm]:
        if not time_left():
            break
        cfg = config(pt["size"], pt["policy"], pt["batch"])
        run = dict(size=pt["size"], policy=pt["policy"], batch=pt["batch"])
        try:
            trainer = Trainer(cfg)
            trainer.compile()
            rng = np.random.default_rng(0)
            host = [synthetic.config_batch(cfg, rng) for _ in range(2)]
            dt, metrics = measure(trainer, host, a.steps, 1)
            images = sum(map(images_in, host)) // 2
            fl = flops.train_flops_per_step(cfg, images_per_step=images)
            peak = flops.peak_flops_per_device(cfg.train.peak_tflops) or float("nan")
            tokens = cfg.data.global_batch_size * cfg.data.seq_len
            run.update(
                step_ms=dt * 1e3,
                tokens_per_s=tokens / dt,
                mfu=fl / dt / peak,
                loss=float(metrics["loss"]),
                attention_impl=cfg.model.attention_impl,
            )
            del trainer
        except Exception as e:  # an OOM at run time is a result too: report it, try the next
            run["error"] = f"{type(e).__name__}: {e}"
        report["runs"].append(run)
        save()
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()

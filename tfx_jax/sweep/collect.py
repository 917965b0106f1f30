"""`sweep collect`: every run's final and best eval metrics, and per group (the run name without
the seed) their mean ± sample standard deviation over seeds, with min and max in the CSV.

A run's values come from RUN/metrics.jsonl (training's `eval/...` entries, written every
train.eval_every steps) and RUN/eval.json (`python -m tfx_jax eval`): final = the value at the
latest step (eval.json's where it evaluated that step or a later one), best = the lowest loss or
perplexity, or the highest score, over all of them.

Files at the sweep root: sweep_results.md (the table), sweep_results.csv (group, metric, kind,
n, mean, std, min, max) and sweep_runs.csv (one row per run and metric).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from tfx_jax import report
from tfx_jax.sweep.expand import status

# The main numbers of a run; those no run has are left out of the table.
DEFAULT_METRICS = (
    "eval/lm_loss",
    "eval/perplexity",
    "eval/diffusion_loss",
    "eval/judge_fraction",
    "eval/judge/train/attributes",
    "eval/judge/heldout/attributes",
    "eval/caption/heldout/attributes",
)
KINDS = ("final", "best")
FILES = {"markdown": "sweep_results.md", "csv": "sweep_results.csv", "runs": "sweep_runs.csv"}


def lower_is_better(key: str) -> bool:
    return "loss" in key or "perplexity" in key or key.endswith("failures")


def run_metrics(workdir: str | epath.PathLike) -> dict[str, dict[str, Any]]:
    """{metric: {final, final_step, best, best_step}} for every `eval/` metric of one run."""
    root = epath.Path(workdir)
    points: dict[str, dict[int, float]] = {}  # metric -> step -> value (a re-logged step: last)
    for entry in report._read_history(root / "metrics.jsonl"):
        for key, value in entry.items():
            if key.startswith("eval/") and isinstance(value, int | float):
                points.setdefault(key, {})[int(entry["step"])] = float(value)
    final_from_eval: dict[str, tuple[int, float]] = {}
    ev_path = root / "eval.json"
    if ev_path.exists():
        ev = json.loads(ev_path.read_text())
        for key, value in ev.get("metrics", {}).items():
            if isinstance(value, int | float):
                final_from_eval[key] = (int(ev["step"]), float(value))
    out = {}
    for key in sorted(set(points) | set(final_from_eval)):
        steps = points.get(key, {})
        final_step, final = max(steps.items()) if steps else (-1, math.nan)
        if key in final_from_eval and final_from_eval[key][0] >= final_step:
            final_step, final = final_from_eval[key]
        candidates = list(steps.items()) + (
            [final_from_eval[key]] if key in final_from_eval else []
        )
        pick = min if lower_is_better(key) else max
        best_step, best = pick(candidates, key=lambda sv: sv[1])
        out[key] = {"final": final, "final_step": final_step, "best": best, "best_step": best_step}
    return out


def _stats(values: Sequence[float]) -> dict[str, float]:
    """n, mean, std (sample, n - 1; 0 for one value), min, max."""
    n = len(values)
    return {
        "n": n,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if n > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def collect(plan: Mapping[str, Any], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """The sweep's numbers (see the module docstring).

    Args:
      plan: ROOT/sweep.json's content.
      metrics: the metrics to show (default: the sweep's, else those of DEFAULT_METRICS that
        some run has).

    Returns:
      {"metrics": shown, "runs": [{name, group, seed, status, metrics}], "groups": {group:
      {"runs": n, metric: {kind: stats}}}, "missing": requested metrics no run has}.
    """
    with_eval = plan.get("eval_args") is not None
    runs = [
        {
            "name": r["name"],
            "group": r["group"],
            "seed": r["seed"],
            "status": status(r, with_eval),
            "metrics": run_metrics(r["workdir"]),
        }
        for r in plan["runs"]
    ]
    have = {k for r in runs for k in r["metrics"]}
    asked = list(metrics or plan.get("metrics") or ())
    shown = asked or [k for k in DEFAULT_METRICS if k in have]
    groups: dict[str, dict[str, Any]] = {}
    for r in runs:
        groups.setdefault(r["group"], {"runs": 0})["runs"] += 1
    for group, entry in groups.items():
        members = [r for r in runs if r["group"] == group]
        for key in shown:
            entry[key] = {}
            for kind in KINDS:
                values = [r["metrics"][key][kind] for r in members if key in r["metrics"]]
                values = [v for v in values if not math.isnan(v)]
                if values:
                    entry[key][kind] = _stats(values)
    return {
        "metrics": shown,
        "runs": runs,
        "groups": groups,
        "missing": [k for k in asked if k not in have],
    }


def fmt_stats(stats: Mapping[str, float] | None, runs: int) -> str:
    if not stats:
        return "–"
    text = f"{stats['mean']:.4g} ± {stats['std']:.2g}"
    return text if stats["n"] == runs else f"{text} (n={stats['n']})"


def markdown(result: Mapping[str, Any], title: str) -> str:
    """The groups table: a row per group, final and best per metric."""
    shown = result["metrics"]
    head = ["group", "runs", *(f"{k} {kind}" for k in shown for kind in KINDS)]
    lines = [
        f"# {title}",
        "",
        "Mean ± sample standard deviation (n − 1) over the group's seeds; (n=k) where only k "
        "of its runs have the metric. final: the run's last eval (eval.json when it is the "
        "newest); best: its lowest loss / perplexity or highest score over its evals.",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for group, entry in result["groups"].items():
        cells = [group, str(entry["runs"])]
        cells += [fmt_stats(entry[k].get(kind), entry["runs"]) for k in shown for kind in KINDS]
        lines.append("| " + " | ".join(cells) + " |")
    if result["missing"]:
        lines += ["", "No run has: " + ", ".join(result["missing"]) + "."]
    counts = {}
    for r in result["runs"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines += ["", "Runs: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + "."]
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write(plan: Mapping[str, Any], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Collects and writes the three files at the sweep root.

    Returns:
      {"result": collect()'s, "text": the Markdown, "paths": {markdown, csv, runs}}.
    """
    result = collect(plan, metrics)
    root = epath.Path(plan["root"])
    text = markdown(result, f"Sweep {plan['name']}: eval metrics over seeds")
    groups = [("group", "metric", "kind", "n", "mean", "std", "min", "max")]
    for group, entry in result["groups"].items():
        for key in result["metrics"]:
            for kind, s in entry[key].items():
                groups.append((group, key, kind, s["n"], s["mean"], s["std"], s["min"], s["max"]))
    per_run = [
        ("run", "group", "seed", "status", "metric", "final", "final_step", "best", "best_step")
    ]
    for r in result["runs"]:
        for key in result["metrics"]:
            if key in r["metrics"]:
                m = r["metrics"][key]
                per_run.append(
                    (
                        r["name"],
                        r["group"],
                        r["seed"],
                        r["status"],
                        key,
                        m["final"],
                        m["final_step"],
                        m["best"],
                        m["best_step"],
                    )
                )
    paths = {kind: root / name for kind, name in FILES.items()}
    root.mkdir(parents=True, exist_ok=True)
    paths["markdown"].write_text(text)
    paths["csv"].write_text(_csv(groups))
    paths["runs"].write_text(_csv(per_run))
    return {"result": result, "text": text, "paths": paths}

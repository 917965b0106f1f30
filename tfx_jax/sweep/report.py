"""`sweep report`: ROOT/sweep.html, one self-contained page (plots inline as PNG) of a sweep.

The runs' training curves overlaid (loss, lm_loss, diffusion_loss against step; a colour per
group, each seed a thin line of its group's colour, eval points as dots), the collected metrics
as bars per group (the mean over seeds of the final value, error bars ± one sample standard
deviation, each seed a dot), the groups table of `collect` (every number with its metric, kind
and exact value in `data-*` attributes, like the run report) and the runs with their status.
The embedding and page style are the run report's (`tfx_jax/report.py`).
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from tfx_jax import report
from tfx_jax.sweep import collect as collect_lib

CURVES = ("loss", "lm_loss", "diffusion_loss")
HTML_NAME = "sweep.html"


def _figures(plan: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    out: dict[str, bytes] = {}

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        out[name] = buf.getvalue()

    groups = list(result["groups"])
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    histories = {
        r["name"]: report._read_history(epath.Path(r["workdir"]) / "metrics.jsonl")
        for r in plan["runs"]
    }
    if any(any("loss" in h for h in hist) for hist in histories.values()):
        fig, axes = plt.subplots(1, len(CURVES), figsize=(13, 3.6))
        labelled: set[tuple[int, str]] = set()
        for r in plan["runs"]:
            hist = histories[r["name"]]
            for i, (ax, key) in enumerate(zip(axes, CURVES, strict=True)):
                train = sorted({h["step"]: h[key] for h in hist if key in h}.items())
                label = None if (i, r["group"]) in labelled else r["group"]
                labelled.add((i, r["group"]))
                if train:
                    ax.plot(
                        *zip(*train, strict=True),
                        lw=0.9,
                        alpha=0.8,
                        color=colours[r["group"]],
                        label=label,
                    )
                pts = sorted(
                    {h["step"]: h[f"eval/{key}"] for h in hist if f"eval/{key}" in h}.items()
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), "o", ms=3.5, color=colours[r["group"]])
        for ax, key in zip(axes, CURVES, strict=True):
            ax.set_title(f"train {key} (dots: eval/{key})" if key != "loss" else "train loss")
            ax.set_xlabel("step")
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FormatStrFormatter("%.3g"))  # not 1.1 x 10^1 on a narrow log range
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        save(fig, "curves")
    shown = [k for k in result["metrics"] if any(k in g for g in result["groups"].values())]
    shown = [k for k in shown if any("final" in g[k] for g in result["groups"].values())]
    if shown:
        cols = min(3, len(shown))
        rows = -(-len(shown) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, shown, strict=False):
            for x, g in enumerate(groups):
                s = result["groups"][g][key].get("final")
                if not s:
                    continue
                ax.bar(x, s["mean"], yerr=s["std"], color=colours[g], capsize=4, alpha=0.85)
                ax.annotate(
                    f"{s['mean']:.4g}",
                    (x, s["mean"]),
                    ha="center",
                    va="bottom",
                    xytext=(0, 4),
                    textcoords="offset points",
                    fontsize=8,
                )
                seeds = [
                    r["metrics"][key]["final"]
                    for r in result["runs"]
                    if r["group"] == g and key in r["metrics"]
                ]
                ax.plot([x] * len(seeds), seeds, "k.", ms=5)
            ax.set_xticks(range(len(groups)), [str(i) for i in range(len(groups))])
            ax.set_xlabel("group (numbered as in the table)")
            ax.set_title(f"{key} (final)", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
        for ax in list(axes.flat)[len(shown) :]:
            ax.axis("off")
        save(fig, "metrics")
    return out


def _cell(entry: Mapping[str, Any], key: str, kind: str, group: str, runs: int) -> str:
    s = entry.get(key, {}).get(kind)
    if not s:
        return "<td class='num muted'>–</td>"
    attrs = (
        f"data-group='{html.escape(group)}' data-key='{html.escape(key)}' data-kind='{kind}' "
        f"data-value='{s['mean']!r}' data-std='{s['std']!r}' data-n='{s['n']}'"
    )
    return f"<td class='num' {attrs}>{html.escape(collect_lib.fmt_stats(s, runs))}</td>"


def write(plan: Mapping[str, Any], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes ROOT/sweep.html (and the collect files, which it is made from).

    Returns:
      {"html": its path, "collected": collect.write()'s result}.
    """
    collected = collect_lib.write(plan, metrics)
    result = collected["result"]
    figures = _figures(plan, result)
    title = f"Sweep report: {plan['name']}"
    h = [f"<h1>{html.escape(title)}</h1>"]
    h.append(
        f"<p class='muted'>{html.escape(plan['root'])} · sweep file "
        f"{html.escape(plan['spec'])} · base config {html.escape(plan['config'])} · "
        f"{len(plan['runs'])} runs in {len(result['groups'])} groups</p>"
    )
    if "curves" in figures:
        h.append("<h2>Training curves</h2>")
        h.append("<p class='muted'>One colour per group; each seed a thin line.</p>")
        h.append(f"<p><img class='plot' alt='curves' src='{report._data_uri(figures['curves'])}'>")
    if "metrics" in figures:
        h.append("<h2>Final eval metrics</h2>")
        h.append(
            "<p class='muted'>Bars: the mean over seeds of each run's final value; error bars: "
            "± one sample standard deviation (n − 1); dots: the seeds.</p>"
        )
        h.append(
            f"<p><img class='plot' alt='metrics' src='{report._data_uri(figures['metrics'])}'>"
        )
    shown = result["metrics"]
    h.append("<h2>Groups</h2>")
    h.append(
        "<p class='muted'>Mean ± sample standard deviation over seeds; final: the last eval; "
        "best: the lowest loss / perplexity or highest score over the evals.</p>"
    )
    head = "".join(f"<th>{html.escape(k)} {kind}</th>" for k in shown for kind in collect_lib.KINDS)
    h.append(f"<table><tr><th>#</th><th>group</th><th>runs</th>{head}</tr>")
    for i, (group, entry) in enumerate(result["groups"].items()):
        cells = "".join(
            _cell(entry, k, kind, group, entry["runs"]) for k in shown for kind in collect_lib.KINDS
        )
        h.append(
            f"<tr><td>{i}</td><th class='group'>{html.escape(group)}</th>"
            f"<td class='num'>{entry['runs']}</td>{cells}</tr>"
        )
    h.append("</table>")
    if result["missing"]:
        h.append(f"<p class='muted'>No run has: {html.escape(', '.join(result['missing']))}.</p>")
    h.append("<h2>Runs</h2><table><tr><th>run</th><th>group</th><th>seed</th><th>status</th></tr>")
    for r in result["runs"]:
        h.append(
            f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['group'])}</td>"
            f"<td class='num'>{r['seed']}</td><td>{html.escape(r['status'])}</td></tr>"
        )
    h.append("</table>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{report.STYLE}</style></head><body>"
        + "\n".join(h)
        + "</body></html>"
    )
    path = epath.Path(plan["root"]) / HTML_NAME
    path.write_text(page)
    return {"html": path, "collected": collected}

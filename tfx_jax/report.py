"""A run's report: RUN/report.html (self-contained: images and plots inline as base64 PNG) and
RUN/report.md (the same, linking image files next to it), readable offline.

Made from what the run left behind, no model needed: RUN/eval.json and RUN/eval/step_N/
(`python -m tfx_jax eval`), RUN/metrics.jsonl (training) and RUN/config.json. Sections: the
config in brief; the targets (met / MISSED by how much); loss curves and eval metrics over
steps (matplotlib, Agg backend: no display); the metric tables; the sample grid with each prompt
under its image; the generated captions beside their held-out images; rows of rolling images
arriving; one generated interleaved document.

Every number in the HTML tables carries its metric key and exact value (`data-key`,
`data-value`), so a test can check the report says what eval.json says.

    write(workdir) -> {"html": path, "markdown": path}
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from etils import epath

PLOT_DIR = "report_files"  # the Markdown report's plots, next to it
SHOW_SAMPLES = 32  # per split in the sample grid (eval.json has them all)
SHOW_CAPTIONS = 8  # per split in the captions table
ATTRIBUTE_COLUMNS = (
    ("prompts", "prompts"),
    ("attributes", "attributes"),
    ("objects", "objects fully right"),
    ("shape", "shape"),
    ("color", "colour"),
    ("size", "size"),
    ("position", "position"),
    ("count", "count"),
    ("exact", "image exact"),
)
SPLIT_NAMES = {
    "train": "training-split prompts (seen shape/colour pairs)",
    "heldout": "held-out prompts (unseen shape/colour pairs)",
    "validation": "validation prompts",
}
STYLE = """
body{font-family:system-ui,sans-serif;max-width:70em;margin:1em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.met{color:#17803d;font-weight:bold}.missed{color:#c0262d;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:120px;font-size:11px;line-height:1.25}
figure img{width:96px;height:96px;image-rendering:pixelated;display:block;border:3px solid #ccc}
figure.right img{border-color:#2e9e50}figure.wrong img{border-color:#d0454c}
img.pix{width:96px;height:96px;image-rendering:pixelated}td img.pix{width:64px;height:64px}
img.strip{height:96px;image-rendering:pixelated}
img.plot{max-width:100%}.doc img{width:64px;height:64px;image-rendering:pixelated;
vertical-align:middle;margin:2px}.muted{color:#777}
"""


# ----------------------------------------------------------------------------- numbers


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}%"


def _num(key: str, v: float) -> str:
    if key.endswith("/prompts"):
        return f"{v:.0f}"
    if key.endswith(("/lm_loss", "perplexity")) or "diffusion_loss" in key:
        return f"{v:.4g}"
    if key.startswith(("eval/fd", "eval/diversity")):  # feature distances, not shares
        return f"{v:.5g}"
    return _pct(v)


def _cell(metrics: dict, key: str) -> str:
    """A table cell with the metric's formatted value and its exact value for machines."""
    if key not in metrics:
        return "<td class='num muted'>–</td>"
    v = metrics[key]
    return (
        f"<td class='num' data-key='{html.escape(key)}' data-value='{float(v)!r}'>"
        f"{_num(key, v)}</td>"
    )


def _md_cell(metrics: dict, key: str) -> str:
    return _num(key, metrics[key]) if key in metrics else "–"


def _table(
    metrics: dict, prefix: str, rows: Sequence[tuple[str, str]], columns=ATTRIBUTE_COLUMNS
) -> tuple[str, list[str]]:
    """(HTML, Markdown lines) of a table: one row per (sub-key, label) under `prefix`,
    one column per (metric, label); rows with no metric at all are left out."""
    rows = [r for r in rows if any(f"{prefix}/{r[0]}/{c}" in metrics for c, _ in columns)]
    if not rows:
        return "", []
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = []
    md = ["| | " + " | ".join(label for _, label in columns) + " |"]
    md.append("|---" * (len(columns) + 1) + "|")
    for sub, label in rows:
        cells = "".join(_cell(metrics, f"{prefix}/{sub}/{c}") for c, _ in columns)
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
        md.append(
            f"| {label} | "
            + " | ".join(_md_cell(metrics, f"{prefix}/{sub}/{c}") for c, _ in columns)
            + " |"
        )
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>", md


def _split_rows(metrics: dict, prefix: str, splits: Sequence[str]) -> list[tuple[str, str]]:
    """A row per split, and per one-/multi-object group when the split has both kinds."""
    rows = []
    for s in splits:
        rows.append((s, SPLIT_NAMES.get(s, f"{s} prompts")))
        if f"{prefix}/{s}/multi_object/attributes" in metrics:
            rows += [
                (f"{s}/one_object", "… of them, one-object prompts"),
                (f"{s}/multi_object", "… of them, 2-3 object prompts"),
            ]
    return rows


OBJECT_ROWS = (
    ("pair_seen", "objects of seen pairs"),
    ("pair_heldout", "objects of held-out pairs"),
    ("row_top", "objects in the top grid row"),
    ("row_middle", "objects in the middle row"),
    ("row_bottom", "objects in the bottom row"),
)


# ----------------------------------------------------------------------------- plots


def _plots(history: list[dict], ev: dict | None) -> dict[str, bytes]:
    """PNG bytes of: training losses over steps, eval metrics over steps, and the latest
    eval's diffusion loss by timestep and by patch row (whichever there is data for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        out[name] = buf.getvalue()

    train = [h for h in history if "loss" in h]
    evals = [h for h in history if any(k.startswith("eval/") for k in h)]
    if train:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        for ax, key in zip(axes, ("lm_loss", "diffusion_loss"), strict=True):
            ax.plot([h["step"] for h in train], [h[key] for h in train], label=f"train {key}")
            pts = [(h["step"], h[f"eval/{key}"]) for h in evals if f"eval/{key}" in h]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=f"eval/{key} (validation)")
            ax.set_xlabel("step")
            ax.set_title(key)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "losses")
    final = ev["metrics"] if ev else {}
    judged = {k for h in [*evals, final] for k in h if k.endswith("/attributes")}
    # One line per prompt split (not per group): eval/{judge,caption}/<split>/attributes.
    judged = sorted(k for k in judged if k.count("/") == 3 and k.split("/")[2] in SPLIT_NAMES)
    if judged:
        fig, ax = plt.subplots(figsize=(11, 3.4))
        for key in judged:
            pts = [(h["step"], h[key]) for h in evals if key in h]
            color = None
            if pts:
                color = ax.plot(*zip(*pts, strict=True), "o-", label=key)[0].get_color()
            if key in final:  # the final eval, over more prompts: a star
                label = None if pts else key
                ax.plot([ev["step"]], [final[key]], "*", ms=13, color=color, label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        n = f"; ★ eval.json, {ev['num_prompts']} prompts per split" if ev else ""
        ax.set_title(f"share of attributes right (judge: drawn images; caption: text){n}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        save(fig, "eval_metrics")
    if ev:
        m = ev["metrics"]
        buckets = sorted(k for k in m if k.startswith("eval/diffusion_loss_t"))
        rows = sorted(k for k in m if k.startswith("eval/diffusion_loss_row"))
        if buckets or rows:
            fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
            for ax, keys, title in (
                (axes[0], buckets, "diffusion loss by timestep (t from)"),
                (axes[1], rows, "diffusion loss by patch row (top = 0)"),
            ):
                labels = [k.split("_")[-1].lstrip("trow") or "0" for k in keys]
                ax.bar(range(len(keys)), [m[k] for k in keys], color="#4a7fb5")
                ax.set_xticks(range(len(keys)), labels)
                ax.set_title(f"{title}, step {ev['step']}")
                ax.grid(alpha=0.3, axis="y")
            save(fig, "diffusion_by_t_and_row")
    return out


# ----------------------------------------------------------------------------- report


def _read_history(path: epath.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write(workdir: str | epath.PathLike) -> dict[str, epath.Path]:
    """Writes RUN/report.html and RUN/report.md (and RUN/report_files/*.png for the Markdown).

    Raises:
      FileNotFoundError: `workdir` has neither eval.json nor metrics.jsonl.
    """
    root = epath.Path(workdir)
    ev_path, hist_path = root / "eval.json", root / "metrics.jsonl"
    if not ev_path.exists() and not hist_path.exists():
        raise FileNotFoundError(
            f"{root}: no eval.json or metrics.jsonl to report on (train a run there, then "
            f"python -m tfx_jax eval --workdir {root})."
        )
    ev = json.loads(ev_path.read_text()) if ev_path.exists() else None
    history = _read_history(hist_path)
    plots = _plots(history, ev)
    (root / PLOT_DIR).mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        (root / PLOT_DIR / f"{name}.png").write_bytes(png)

    def img(rel: str, cls: str = "pix", alt: str = "") -> str:
        """An image file of the run, inlined."""
        path = root / rel
        if not rel or not path.exists():
            return "<span class='muted'>(no image)</span>"
        return (
            f"<img class='{cls}' alt='{html.escape(alt)}' "
            f"src='{_data_uri(path.read_bytes())}' data-file='{html.escape(rel)}'>"
        )

    name = (ev or {}).get("config", {}).get("name") or root.name
    title = f"Run report: {name}" + (f", step {ev['step']}" if ev else "")
    h: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    md: list[str] = [f"# {title}", ""]
    h.append(f"<p class='muted'>{html.escape(str(root))}</p>")
    if ev is None:
        h.append(
            "<p class='missed'>No eval.json: run <code>python -m tfx_jax eval --workdir "
            f"{html.escape(str(root))}</code> for the scores.</p>"
        )
        md += ["**No eval.json**: run `python -m tfx_jax eval --workdir RUN` for the scores.", ""]

    # Config in brief.
    brief = (ev or {}).get("config") or _brief_from_config(root)
    if brief:
        h.append("<h2>Config</h2><table>")
        md += ["## Config", "", "| | |", "|---|---|"]
        for k, v in brief.items():
            h.append(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>")
            md.append(f"| {k} | {v} |")
        h.append("</table>")
        md.append("")

    if ev is not None:  # what the model does first, then how it got there, then every number
        _targets(ev, h, md)
        _samples(ev, h, md, img)
        _captions(ev, h, md, img)
        _streams(ev, h, md, img)
        _document(ev, h, md, img)
    if plots:
        h.append("<h2>Over training</h2>")
        md += ["## Over training", ""]
        for pname, png in plots.items():
            h.append(f"<p><img class='plot' alt='{pname}' src='{_data_uri(png)}'></p>")
            md += [f"![{pname}]({PLOT_DIR}/{pname}.png)", ""]
    if ev is not None:
        _metric_tables(ev, h, md)

    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(h)
        + "</body></html>"
    )
    html_path, md_path = root / "report.html", root / "report.md"
    html_path.write_text(page)
    md_path.write_text("\n".join(md) + "\n")
    return {"html": html_path, "markdown": md_path}


def _brief_from_config(root: epath.Path) -> dict[str, str]:
    path = root / "config.json"
    if not path.exists():
        return {}
    c = json.loads(path.read_text())
    m, d = c.get("model", {}), c.get("data", {})
    return {
        "name": c.get("name", ""),
        "model": f"{m.get('n_layers')} layers x d_model {m.get('d_model')}",
        "data": f"{d.get('source')}, seq_len {d.get('seq_len')} x batch "
        f"{d.get('global_batch_size')}",
        "training": f"{c.get('train', {}).get('steps')} steps",
    }


def _targets(ev: dict, h: list[str], md: list[str]) -> None:
    rows = ev.get("targets") or []
    if not rows:
        return
    n = ev.get("num_prompts")
    h.append(
        f"<h2>Targets</h2><p>Scored by the judge on {n} prompts per split (seed "
        f"{ev.get('seed')}).</p><table><tr><th>target</th><th>goal</th><th>measured</th>"
        "<th></th></tr>"
    )
    md += ["## Targets", "", f"{n} prompts per split, seed {ev.get('seed')}.", ""]
    md += ["| target | goal | measured | |", "|---|---|---|---|"]
    for t in rows:
        verdict = "met" if t["met"] else f"MISSED by {100 * t['short_by']:.1f} points"
        cls = "met" if t["met"] else "missed"
        h.append(
            f"<tr><td>{html.escape(t['name'])}</td><td class='num'>≥ {_pct(t['goal'])}</td>"
            f"{_cell(ev['metrics'], t['key'])}<td class='{cls}'>{verdict}</td></tr>"
        )
        md.append(f"| {t['name']} | ≥ {_pct(t['goal'])} | {_pct(t['value'])} | {verdict} |")
    h.append("</table>")
    md.append("")


def _metric_tables(ev: dict, h: list[str], md: list[str]) -> None:
    m = ev["metrics"]
    splits = list(dict.fromkeys(s["split"] for s in ev.get("samples", [])))
    for prefix, title, note in (
        ("eval/judge", "Prompt → image, scored by the judge", "images drawn for the captions"),
        ("eval/caption", "Image → text: captions of the true images", "captions read back"),
    ):
        table, lines = _table(m, prefix, _split_rows(m, prefix, splits))
        objects, olines = _table(m, prefix, OBJECT_ROWS, ATTRIBUTE_COLUMNS[1:3])
        if not table:
            continue
        h += [
            f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}; attributes = share of "
            "(object, attribute) pairs right; objects fully right = all four.</p>",
            table,
            "<p>By object (pair seen in training or not; grid row it sits in):</p>",
            objects,
        ]
        md += [f"## {title}", "", *lines, "", *olines, ""]
        parsed = [(s, f"{prefix}/{s}/parsed") for s in splits if f"{prefix}/{s}/parsed" in m]
        if parsed:
            cells = " ".join(f"{s}: {_pct(m[k])}" for s, k in parsed)
            h.append(f"<p>Captions inside the caption grammar — {html.escape(cells)}</p>")
            md += [f"Captions inside the caption grammar — {cells}", ""]
    _fd_table(ev, h, md)
    groups = (
        ("", ["eval/perplexity", "eval/lm_loss", "eval/diffusion_loss"]),
        ("diffusion loss by timestep, t from", sorted(k for k in m if "diffusion_loss_t" in k)),
        ("diffusion loss by patch row", sorted(k for k in m if "diffusion_loss_row" in k)),
    )
    groups = tuple((title, [k for k in keys if k in m]) for title, keys in groups)
    if not any(keys for _, keys in groups):
        return
    batches = ev.get("loss_batches", "?")
    h.append(f"<h2>Held-out losses</h2><p>{batches} validation batches.</p>")
    md += ["## Held-out losses", "", f"{batches} validation batches.", ""]
    for title, keys in groups:
        if not keys:
            continue
        labels = [k.removeprefix("eval/").split("_")[-1].lstrip("trow") or "0" for k in keys]
        labels = labels if title else [k.removeprefix("eval/") for k in keys]
        head = "".join(f"<th>{html.escape(x)}</th>" for x in labels)
        cells = "".join(_cell(m, k) for k in keys)
        h.append(f"<p>{html.escape(title)}</p>" if title else "")
        h.append(f"<table><tr>{head}</tr><tr>{cells}</tr></table>")
        md += [f"{title}:" if title else "", "", "| " + " | ".join(labels) + " |"]
        md += ["|---" * len(keys) + "|", "| " + " | ".join(_md_cell(m, k) for k in keys) + " |"]
        md.append("")


FD_ROWS = (
    ("fd", "FD, generated vs real"),
    ("fd_floor", "noise floor: FD, real vs real"),
    ("diversity", "diversity: mean pairwise distance, generated"),
    ("diversity_real", "diversity, real"),
)


def _fd_table(ev: dict, h: list[str], md: list[str]) -> None:
    """The in-domain FD (`tfx_jax.eval.fd`) beside its noise floor and the diversity figures,
    a column per split."""
    info = ev.get("fd")
    if not info or not info.get("samples"):
        return
    table, lines = _table(ev["metrics"], "eval", FD_ROWS, [(s, s) for s in info["samples"]])
    c = info["classifier"]
    note = (
        f"{', '.join(f'{s}: {n}' for s, n in info['samples'].items())} generated images vs as "
        "many real ones of other examples of the split; the floor compares the prompts' true "
        f"images with those. Classifier held-out accuracy {_pct(c['accuracy'])} of labels, "
        f"{_pct(c['exact'])} of images with every label right."
    )
    h += [f"<h2>{html.escape(info['what'])}</h2><p>{html.escape(note)}</p>", table]
    md += [f"## {info['what']}", "", note, "", *lines, ""]


def _mark(judged: dict | None) -> tuple[str, str]:
    """(css class, short verdict) of a judged sample."""
    if not judged:
        return "", ""
    right = sum(o["present"] for o in judged["objects"])
    n, read = len(judged["objects"]), judged["num_detected"]
    if judged["exact"]:
        return "right", "✓ exact"
    return "wrong", f"✗ {right}/{n} right, {read} object{'s' * (read != 1)} read"


def _samples(ev: dict, h: list[str], md: list[str], img) -> None:
    samples = ev.get("samples") or []
    if not samples:
        return
    opts = ev.get("image_options", {})
    how = (
        f"{opts.get('sampler')} {opts.get('diffusion_steps')} steps, guidance "
        f"{opts.get('guidance_scale')}, {opts.get('image_mode')} image mode"
    )
    h.append(
        f"<h2>Sample grid</h2><p>{html.escape(how)}. Green: the judge reads exactly the "
        "prompted objects; red: it does not (k/n: prompted objects read with all four "
        "attributes right; objects read: all it found).</p>"
    )
    md += ["## Sample grid", "", how + ".", ""]
    for split in dict.fromkeys(s["split"] for s in samples):
        mine = [s for s in samples if s["split"] == split]
        shown = f" (the first {SHOW_SAMPLES} of {len(mine)})" if len(mine) > SHOW_SAMPLES else ""
        mine = mine[:SHOW_SAMPLES]
        title = SPLIT_NAMES.get(split, split) + shown
        h.append(f"<h3>{html.escape(title)}</h3><div class='grid'>")
        md += [f"### {title}", ""]
        md += ["| image | prompt | judge |", "|---|---|---|"]
        for s in mine:
            cls, verdict = _mark(s.get("judge"))
            h.append(
                f"<figure class='{cls}'>{img(s['image'] or '', alt=s['prompt'])}"
                f"<figcaption>{html.escape(s['prompt'])}<br><b>{verdict}</b></figcaption>"
                "</figure>"
            )
            md.append(f"| ![]({s['image']}) | {s['prompt']} | {verdict} |")
        h.append("</div>")
        md.append("")


def _captions(ev: dict, h: list[str], md: list[str], img) -> None:
    caps = ev.get("captions") or []
    if not caps:
        return
    h.append(
        f"<h2>Captions</h2><p>A caption generated after each true image (image first, "
        f"greedy), read back with the caption grammar and compared with the true scene; the "
        f"first {SHOW_CAPTIONS} of each split (all in eval.json, scores over all below)."
        "</p><table><tr><th>split</th><th>image</th><th>true caption</th>"
        "<th>generated</th><th>attributes right</th></tr>"
    )
    md += ["## Captions", "", "| split | image | true caption | generated | attributes right |"]
    md.append("|---|---|---|---|---|")
    per_split: dict[str, int] = {}
    for c in caps:
        per_split[c["split"]] = per_split.get(c["split"], 0) + 1
        if per_split[c["split"]] > SHOW_CAPTIONS:
            continue
        j = c.get("judge")
        score = ""
        if j:
            attrs = sum(j[a] for a in ("shape", "color", "size", "position")) / 4
            score = f"{'✓' if j['exact'] else '✗'} {_pct(attrs)}"
        gen = c["generated"] or "(nothing)"
        h.append(
            f"<tr><td>{html.escape(c['split'])}</td><td>{img(c['image'], alt=c['truth'])}</td>"
            f"<td>{html.escape(c['truth'])}</td><td>{html.escape(gen)}</td>"
            f"<td class='num'>{score}</td></tr>"
        )
        flat = gen.replace("|", "\\|").replace("\n", " ")
        md.append(f"| {c['split']} | ![]({c['image']}) | {c['truth']} | {flat} | {score} |")
    h.append("</table>")
    md.append("")


def _streams(ev: dict, h: list[str], md: list[str], img) -> None:
    streams = ev.get("streams") or []
    if not streams:
        return
    h.append(
        "<h2>Rows arriving (rolling diffusion)</h2><p>Each strip shows an image after "
        "each pass of the rolling window, top row first (grey: not generated yet).</p>"
    )
    md += ["## Rows arriving (rolling diffusion)", ""]
    for s in streams:
        h.append(f"<p>{html.escape(s['prompt'])}<br>{img(s['strip'], 'strip', s['prompt'])}</p>")
        md += [f"{s['prompt']}", "", f"![]({s['strip']})", ""]


def _document(ev: dict, h: list[str], md: list[str], img) -> None:
    doc: dict[str, Any] | None = ev.get("document")
    if not doc:
        return
    h.append(
        "<h2>An interleaved document</h2><p>The opening of a validation document, "
        "continued by the model (greedy text; images drawn as above).</p><div class='doc'>"
        f"<p><b>Prompt:</b> {html.escape(doc['prompt'])}</p><p><b>Generated:</b> "
    )
    md += ["## An interleaved document", "", f"**Prompt:** {doc['prompt']}", "", "**Generated:**"]
    for piece in doc["pieces"]:
        if piece["kind"] == "text":
            h.append(f"<span>{html.escape(piece['text'])}</span> ")
            md.append(piece["text"])
        else:
            h.append(img(piece["image"], "", "generated image"))
            md.append(f"![]({piece['image']})")
    h.append(f" <small class='muted'>(stop: {html.escape(doc['stop'])})</small></p></div>")
    md.append("")

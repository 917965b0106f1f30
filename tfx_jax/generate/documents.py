"""Generated documents as Markdown and HTML: text and PNG images inline, in document order.

`write_documents(results, out_dir)` takes what `tfx_jax.sample.generate` returns (anything with
`prompt_pieces`, `pieces` and `stop`, whose pieces have `kind`, `text`, `latents`, `image`) and
writes samples.md, samples.html and images/*.png (locally or to `gs://`, through `etils.epath`).
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath


def latent_preview(latents_hwC: np.ndarray, scale: int = 4) -> np.ndarray:
    """A uint8 picture of a latent when no VAE is at hand: its first three channels, each
    stretched to [0, 255], upsampled `scale`x (nearest)."""
    x = np.asarray(latents_hwC, np.float32)[..., :3]
    if x.shape[-1] < 3:
        x = np.concatenate([x, np.repeat(x[..., :1], 3 - x.shape[-1], -1)], -1)
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    x = (x - lo) / np.maximum(hi - lo, 1e-6)
    x = np.repeat(np.repeat(x, scale, 0), scale, 1)
    return (x * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- documents


def write_documents(results: Sequence[Any], out_dir: str | epath.PathLike) -> dict[str, epath.Path]:
    """Writes `samples.md` and `samples.html` with every prompt, its text and its images inline
    (PNG files under `images/`; a latent preview stands in for images without a VAE).

    Returns:
      {"markdown": path, "html": path, "images": [png paths]}.
    """
    from PIL import Image

    out = epath.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    md = ["# Samples", ""]
    body = []
    pngs = []

    def png(piece: Any, name: str) -> str:
        pixels = piece.image if piece.image is not None else latent_preview(piece.latents)
        path = out / "images" / f"{name}.png"
        buf = io.BytesIO()
        Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        pngs.append(path)
        return f"images/{name}.png"

    def render(pieces: list[Any], tag: str) -> tuple[list[str], list[str]]:
        md_lines, html_parts = [], []
        for j, piece in enumerate(pieces):
            if piece.kind == "text":
                md_lines.append(piece.text)
                html_parts.append(f"<span>{html.escape(piece.text)}</span>")
            else:
                src = png(piece, f"{tag}_{j:02d}")
                md_lines.append(f"![{tag} image {j}]({src})")
                html_parts.append(f'<img src="{src}" alt="{tag} image {j}" class="gen">')
        return md_lines, html_parts

    for i, res in enumerate(results):
        p_md, p_html = render(res.prompt_pieces, f"s{i:03d}_prompt")
        g_md, g_html = render(res.pieces, f"s{i:03d}_gen")
        md += [f"## Sample {i}", "", "**Prompt:** " + " ".join(p_md or ["(empty)"]), ""]
        md += ["**Generated** (stop: " + res.stop + "):", "", "\n\n".join(g_md), ""]
        body.append(
            f"<section><h2>Sample {i}</h2><p class='prompt'><b>Prompt:</b> {' '.join(p_html)}</p>"
            f"<p class='gen'><b>Generated</b> <small>(stop: {html.escape(res.stop)})</small>"
            f"</p><div class='doc'>{' '.join(g_html)}</div></section>"
        )
    style = (
        "body{font-family:sans-serif;max-width:48em;margin:auto}"
        "img{image-rendering:pixelated;width:128px;vertical-align:middle;margin:4px}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Samples</title>"
        f"<style>{style}</style></head><body><h1>Samples</h1>{''.join(body)}</body></html>"
    )
    md_path, html_path = out / "samples.md", out / "samples.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(page)
    return {"markdown": md_path, "html": html_path, "images": pngs}

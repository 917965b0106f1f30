"""Draws docs/demo_heldout_row.png (the README's picture) from a demo run's evaluation.

    python docs/demo_row.py runs/demo docs/demo_heldout_row.png

The first eight held-out samples of RUN/eval.json (prompts whose shape/colour pair the model
never saw), each image with its prompt's colour and shape under it and the judge's verdict:
"ok" when every attribute of the prompted object is drawn right.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

N = 8


def main(run: str, out: str) -> None:
    root = Path(run)
    samples = json.loads((root / "eval.json").read_text())["samples"]
    held = [s for s in samples if s["split"] == "heldout"][:N]
    if not held:
        sys.exit(f"{root / 'eval.json'} has no held-out samples: evaluate a shapes run first.")
    fig, axes = plt.subplots(1, len(held), figsize=(1.05 * len(held), 1.45), dpi=100)
    for ax, s in zip(axes, held, strict=True):
        ax.imshow(plt.imread(root / s["image"]), interpolation="nearest")
        ax.set_axis_off()
        words = s["prompt"].split()  # "a huge orange square in the center"
        ok = s["judge"] is not None and s["judge"]["fraction"] == 1.0
        ax.text(0, -0.12, f"{words[2]} {words[3]}", transform=ax.transAxes, fontsize=7)
        verdict = f"judge: {'ok' if ok else 'x'}"
        color = "green" if ok else "red"
        ax.text(0, -0.3, verdict, transform=ax.transAxes, fontsize=7, color=color)
    fig.subplots_adjust(left=0.005, right=0.995, top=0.98, bottom=0.28, wspace=0.08)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

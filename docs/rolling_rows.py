"""Draws docs/rolling_rows.png (the README's rolling picture) from `benchmarks/rolling_quality.py`
outputs: one row of held-out samples per model, labelled.

    python docs/rolling_rows.py docs/rolling_rows.png \
        "standard=OUT1:standard/full_50" "rolling, window 4=OUT1:rolling_auto/rolling_50" ...

Each model is LABEL=DIR:GRIDROW, where DIR is a rolling_quality OUT (its samples.png and
results.json) and GRIDROW a name from its results.json "grid_rows". samples.png holds 12
training-split then 12 held-out prompts per row, the same prompts in every run (seed 1234), so
the columns line up across runs; the picture shows the held-out twelve.
"""

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIDE, GAP, PER_SPLIT = 32, 2, 12  # rolling_quality.grid_png: 32 px images, 2 px gaps


def held_out_row(out_dir: str, grid_row: str) -> np.ndarray:
    root = Path(out_dir)
    if not (root / "results.json").exists() or not (root / "samples.png").exists():
        sys.exit(f"{root}: no results.json and samples.png there (a rolling_quality --out)")
    names = json.loads((root / "results.json").read_text())["grid_rows"]
    if grid_row not in names:
        sys.exit(f"{root / 'results.json'}: no grid row {grid_row!r}; it has {names}")
    grid = plt.imread(root / "samples.png")[..., :3]
    top = names.index(grid_row) * (SIDE + GAP)
    left = PER_SPLIT * (SIDE + GAP)  # the held-out prompts follow the training-split ones
    return grid[top : top + SIDE, left : left + PER_SPLIT * (SIDE + GAP) - GAP]


def main(out: str, specs: list[str]) -> None:
    rows = []
    for spec in specs:
        label, _, where = spec.rpartition("=")  # a label may hold "=", a path may not
        out_dir, _, grid_row = where.rpartition(":")
        if not (label and out_dir and grid_row):
            sys.exit(f"{spec!r}: give LABEL=DIR:GRIDROW (see the module doc)")
        rows.append((label, held_out_row(out_dir, grid_row)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(9.5, 0.7 * len(rows)), dpi=110)
    for ax, (label, image) in zip(np.atleast_1d(axes), rows, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_axis_off()
        ax.text(-0.01, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.33, right=0.995, top=0.99, bottom=0.01, hspace=0.08)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])

"""`python -m tfx_jax eval` and the report: the same numbers as training's evaluators, every
breakdown the issue asks for (per attribute, seen vs held-out, one vs several objects, grid
row, diffusion loss by patch row), and a report whose images decode and whose numbers are
eval.json's."""

import base64
import io
import json
import re
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from tfx_jax import cli, demo
from tfx_jax.data.embedded import judge, shapes
from tfx_jax.data.sources import synthetic
from tfx_jax.eval import fd, losses, prompts
from tfx_jax.layout import ModelInputs
from tfx_jax.models.transformer import Transfusion
from tfx_jax.train.steps import make_eval_step

ATTRS = ("shape", "color", "size", "position")


def test_eval_equals_training_and_the_report_says_so(shapes_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(shapes_run.run, run)  # eval writes into the run: keep the shared one clean
    # The in-domain FD's classifier, trained into the data dir: a small one here (its full
    # training is tests/test_fd.py's; the stamp records these settings, so no run reuses it).
    monkeypatch.setattr(fd, "STEPS", 40)
    monkeypatch.setattr(fd, "NUM_TRAIN", 512)
    # Training evaluated step 6 with train.eval_samples=2 prompts per split and the default
    # sampling options; eval with the same count must give the same numbers.
    cli.main(["eval", "--workdir", str(run), "--num-prompts", "2"])
    out = capsys.readouterr().out
    assert "eval of step 6 (2 prompts per split, seed 0)" in out and "report.html" in out
    ev = json.loads((run / "eval.json").read_text())
    m = ev["metrics"]
    assert ev["step"] == 6 and json.loads((run / "eval/step_6/eval.json").read_text()) == ev

    # Every breakdown is there.
    for split in ("train", "heldout"):
        for key in (*ATTRS, "attributes", "objects", "count", "exact"):
            assert f"eval/judge/{split}/{key}" in m and f"eval/caption/{split}/{key}" in m
        assert m[f"eval/judge/{split}/prompts"] == 2
        groups = [f"eval/judge/{split}/{g}_object/attributes" for g in ("one", "multi")]
        assert any(k in m for k in groups)
    for group in ("pair_seen", "pair_heldout", "row_top", "row_middle", "row_bottom"):
        assert {f"eval/judge/{group}/attributes", f"eval/judge/{group}/objects"} <= set(m)
    rows = [f"eval/diffusion_loss_row{r:02d}" for r in range(4)]  # 8x8 latents, 2x2 patches
    assert set(rows) <= set(m) and all(np.isfinite(m[k]) and m[k] > 0 for k in rows)
    assert m["eval/judge_fraction"] == m["eval/judge/heldout/objects"]
    assert len(ev["samples"]) == len(ev["captions"]) == 4
    assert [t["key"] for t in ev["targets"]] == [t.key for t in demo.TARGETS]
    # The in-domain FD beside its floor and the diversity figures, per split (`eval` only:
    # training does not log them).
    fd_keys = {k for k in m if k.startswith(("eval/fd", "eval/diversity"))}
    kinds = ("fd", "fd_floor", "diversity", "diversity_real")
    assert fd_keys == {f"eval/{k}/{s}" for k in kinds for s in ("train", "heldout")}
    assert all(np.isfinite(m[k]) and m[k] >= 0 for k in fd_keys)
    assert ev["fd"]["samples"] == {"train": 2, "heldout": 2}
    assert "in-domain FD (shapes classifier features, not ImageNet FID)" in out

    # ... and equal to what training's evaluator logged at step 6: losses on the same
    # (rewound) batches, images and captions for the same prompts with the same params.
    logged = {k: v for k, v in shapes_run.reference[6].items() if k.startswith("eval/")}
    logged.pop("eval/failures")
    assert set(logged) == {k for k in m if k.startswith("eval/")} - fd_keys
    for key, value in logged.items():
        np.testing.assert_allclose(m[key], value, rtol=1e-6, err_msg=key)

    # The report: self-contained HTML whose images decode and whose numbers are eval.json's.
    page = (run / "report.html").read_text()
    cells = re.findall(r"data-key='([^']+)' data-value='([^']+)'", page)
    assert len(cells) > 20
    for key, value in cells:
        assert float(value) == m[key], key
    for t in ev["targets"]:
        assert f"data-key='{t['key']}'" in page and ("MISSED by" in page or t["met"])
    uris = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    images = [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]
    assert all(im.size[0] > 0 for im in images) and len(images) >= 4 + 4 + 1  # grid, captions,
    for s in ev["samples"]:  # plots: every sample and its prompt are in the page
        assert s["prompt"] in page and s["image"] in page
    assert ev["document"] and ev["document"]["prompt"] in page
    md = (run / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", md)
    assert links and all((run / link).is_file() for link in links)
    assert any(link.startswith("report_files/") for link in links)


def test_eval_errors_are_one_line(tmp_path, capsys):
    for workdir, says in ((tmp_path / "missing", "no such run directory"), (tmp_path, "no com")):
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--workdir", str(workdir)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err and str(workdir) in err
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--workdir", str(tmp_path)])
    assert e.value.code == 2 and "no eval.json or metrics.jsonl" in capsys.readouterr().err


def _scene(caption: str) -> shapes.Scene:
    return shapes.parse_caption(caption)


def test_judged_metrics_break_down_by_split_objects_pair_and_row():
    one = _scene("a large red circle at the top left")
    two = _scene("a large purple circle at the bottom right and a small blue square at the top")
    wrong_colour = (shapes.SceneObject("circle", "red", "large", "bottom right"), two[1])
    items = [
        ("train", judge.compare(one, one)),  # exact
        ("heldout", judge.compare(two, wrong_colour)),  # the held-out pair drawn red
    ]
    m = prompts.judged_metrics("x", items, judge.JUDGE)
    assert m["x/train/exact"] == 1.0 and m["x/train/attributes"] == 1.0
    assert m["x/heldout/color"] == 0.5 and m["x/heldout/shape"] == 1.0
    assert m["x/heldout/attributes"] == pytest.approx(7 / 8) and m["x/heldout/objects"] == 0.5
    assert m["x/heldout/multi_object/objects"] == 0.5 and "x/heldout/one_object/objects" not in m
    assert m["x/pair_heldout/objects"] == 0.0 and m["x/pair_seen/objects"] == 1.0
    assert m["x/row_top/objects"] == 1.0 and m["x/row_bottom/objects"] == 0.0
    assert "x/row_middle/objects" not in m
    assert m["x/heldout/prompts"] == 1 and m["x/train/count"] == 1.0


def test_captions_are_read_back_with_the_grammar():
    red = _scene("a large red circle at the top left")
    read = judge.JUDGE.read_caption  # what the eval package asks the shapes source's judge
    assert read("a large red circle at the top left") == (red, True)
    assert read("A large red circle at the top left. More text") == (red, True)
    assert read("a large red blob somewhere") == ((), False)
    # Outside the grammar, the well-formed phrases still count (the first per cell).
    text = "xx a large red circle at the top left a small blue square at the top left, a"
    assert read(text) == (red, False)
    missed = judge.compare(_scene("a small green square on the left"), ())
    assert missed["fraction"] == 0.0 and not missed["count"] and missed["num_detected"] == 0


class _Batches:
    """A checkpointable iterator (Grain's get_state / set_state) counting up."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"i": self.i}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_every_evaluation_reads_the_same_batches(tiny_config):
    cfg = tiny_config()
    seen = []

    def step(batch, rng):
        seen.append(batch["i"])
        z = np.zeros(10)
        return {"lm_loss": 1.0, "diffusion_loss": 0.5, "bucket_count": z, "bucket_loss_sum": z}

    batches = _Batches()
    next(batches)  # an iterator already moved before its first evaluation starts there
    first = losses.loss_metrics(step, batches, 2, cfg.diffusion)
    second = losses.loss_metrics(step, batches, 2, cfg.diffusion)
    assert seen == [2, 3, 2, 3] and first == second
    assert first["eval/perplexity"] == pytest.approx(np.e)


@pytest.mark.parametrize("mode", ["standard", "rolling"])
def test_diffusion_loss_by_patch_row(tiny_config, mode):
    """The eval step's per-row sums: in standard mode every row of every image counts and the
    rows average to the per-image loss; in rolling mode rows count by their window weight."""
    cfg = tiny_config(overrides=[f"diffusion.mode={mode}"])
    model = Transfusion(cfg.model)
    dummy = ModelInputs.dummy(cfg, length=8, images=1)
    params = nn.meta.unbox(model.init(jax.random.key(0), dummy)["params"])
    batch = synthetic.config_batch(cfg, np.random.default_rng(0))
    m = jax.device_get(jax.jit(make_eval_step(model, cfg))(params, batch, jax.random.key(1)))
    rows = cfg.model.latent_size // cfg.model.patch_size
    images = m["bucket_count"].sum()
    assert m["row_count"].shape == (rows,) and images > 0
    if mode == "standard":
        np.testing.assert_allclose(m["row_count"], images)
        np.testing.assert_allclose(m["row_loss_sum"].sum() / rows, m["bucket_loss_sum"].sum(), 1e-5)
    else:
        assert (m["row_count"] <= images).all() and m["row_count"].sum() > 0
    out = losses.loss_metrics(lambda b, r: m, iter([batch]), 1, cfg.diffusion)
    keys = [f"eval/diffusion_loss_row{r:02d}" for r in range(rows) if m["row_count"][r] > 0]
    assert keys and all(np.isfinite(out[k]) for k in keys)

"""benchmarks/rolling_quality.py's own logic (the step plan, the table) and its config's grid."""

import importlib.util
from pathlib import Path

import pytest

from tfx_jax.config import load_config, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rq():
    spec = importlib.util.spec_from_file_location(
        "rolling_quality", ROOT / "benchmarks" / "rolling_quality.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arg", ["", ":rolling"])
def test_config_has_eight_patch_rows(arg):
    cfg = load_config(str(ROOT / "experiments" / f"shapes_rolling.py{arg}"))
    validate(cfg, 1)
    assert cfg.model.latent_size // cfg.model.patch_size == 8  # the window of 4 rolls
    assert cfg.data.image_size // cfg.vae.downsample == cfg.model.latent_size


def test_plan_steps_fits_the_time_left(rq):
    # 100 s left, 20 s restart, 0.1 s a step: 92% of 800 steps after the 201 reached.
    assert rq.plan_steps(201, 0.1, 20.0, 100.0, 6500) == 201 + 736
    assert rq.plan_steps(201, 0.01, 20.0, 100.0, 6500) == 6500  # never past --steps
    assert rq.plan_steps(201, 0.1, 120.0, 100.0, 6500) == 201  # no time: stop where it is
    assert rq.plan_steps(201, 0.0, 20.0, 100.0, 6500) == 201  # no measurement: no plan


def test_variants_refuse_unknown_names(rq):
    assert rq.variant("rolling_auto")[1] == "rolling"
    with pytest.raises(ValueError, match="rolling_p0.1"):
        rq.variant("rolling")


def _scores(train, heldout, rows, extra):
    one = lambda s: {  # noqa: E731
        "score": s,
        "row_accuracy": dict(zip(("top", "middle", "bottom"), rows, strict=True)),
        "row_extra": dict(zip(("top", "middle", "bottom"), extra, strict=True)),
    }
    return {"train": one(train), "heldout": one(heldout), "all": one((train + heldout) / 2)}


def test_table_has_a_row_per_sampler_and_says_what_was_not_judged(rq):
    results = {
        "vae_ceiling": _scores(1.0, 0.99, (1.0, 1.0, 0.98), (0, 0, 1)),
        "variants": {
            "rolling_auto": {
                "steps": 2400,
                "planned_steps": 2500,
                "train_s": 301.4,
                "samplers": {
                    "rolling_50": _scores(0.9, 0.85, (0.8, 0.9, 0.95), (3, 1, 0)),
                    "full_50": _scores(0.7, 0.6, (0.7, 0.7, 0.7), (2, 2, 2)),
                },
            },
            "rolling_p0.1": {"status": "training", "planned_steps": 6500, "samplers": {}},
        },
    }
    errs = {r: dict(zip(rq.ERRORS, (0, 2, 1, 0, 0), strict=True)) for r in rq.ROW_NAMES}
    results["variants"]["rolling_auto"]["samplers"]["rolling_50"]["all"]["row_errors"] = errs
    lines = rq.table(results).splitlines()
    assert len(lines) == 2 + 1 + 2 + 1 + 3 + 1  # then the errors table: one judged sampler
    assert (
        lines[-1] == "| rolling_auto, rolling_50 | " + " | ".join(["0 / 2 / 1 / 0 / 0"] * 3) + " |"
    )
    assert lines[2].startswith("| VAE round trip") and "| 99.0% |" in lines[2]
    assert lines[3] == (
        "| rolling_auto, rolling sampler, 50 steps | 90.0% | 85.0% | 80.0% | 90.0% | 95.0% "
        "| 3 / 1 / 0 | 2400 (2500) | 301 s |"
    )
    assert lines[4].startswith("| rolling_auto, full sampler, 50 steps | 70.0% |")
    assert "not judged (training)" in lines[5] and "not finished" in lines[5]


def test_evaluation_names_and_error_counts(rq):
    assert rq.parse_eval("rolling_50") == {"mode": "rolling", "steps": 50}
    assert rq.parse_eval("full_50_ddpm_g5") == {
        "mode": "full", "steps": 50, "sampler": "ddpm", "guidance": 5.0
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown part 'x'"):
        rq.parse_eval("rolling_50_x")
    from tfx_jax.data.embedded.shapes import SceneObject

    top = SceneObject("circle", "red", "small", "top left")
    bottom = SceneObject("square", "blue", "large", "bottom")
    wrong = SceneObject("circle", "green", "large", "bottom")  # shape and colour wrong
    objects = [
        {"prompt": top, "found": None, "present": False},
        {"prompt": bottom, "found": wrong, "present": False, "shape": False, "color": False,
         "size": True, "position": True},
    ]  # fmt: skip
    s = rq.summarise([{"fraction": 0.0, "exact": False, "objects": objects, "detected_rows": [2]}])
    assert s["row_errors"]["top"] == {
        "missing": 1,
        "shape": 0,
        "color": 0,
        "size": 0,
        "position": 0,
    }
    assert s["row_errors"]["bottom"] == {
        "missing": 0, "shape": 1, "color": 1, "size": 0, "position": 0
    }  # fmt: skip
    assert s["row_accuracy"] == {"top": 0.0, "middle": 0.0, "bottom": 0.0}

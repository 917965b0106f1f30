"""The paper's ablations as sweep files (experiments/sweeps/{attention,patch,noise_limit,
loss_weight}.py on experiments/shapes_ablation.py): every run of every file expands and its
config resolves and validates, each varies what it says and nothing else, the files share 27
distinct runs (what benchmarks/ablations.sh trains), and one `:smoke` run — causal attention
inside images with a U-Net patch encoder — trains on the tiny shapes data in a `sweep run`
subprocess.

Fast on CPU: expansion builds no model; the run is 2 steps of the d_model-64 smoke model, on
the shapes data `shapes_run` (conftest.py) builds once per session for the shapes tests."""

import dataclasses
import json

import pytest
from conftest import REPO
from test_sweep import fast_children, tfx

from tfx_jax.config import load_config
from tfx_jax.sweep import expand

FILES = {"attention": 12, "patch": 12, "noise_limit": 6, "loss_weight": 9}
SMOKE_RUNS = {"attention": 4, "patch": 4, "noise_limit": 2, "loss_weight": 3}
DISTINCT = 27  # 39 runs, 12 repeats: the baseline in all four files, the 2x2 U-Net in two


def plans(tmp_path, arg=""):
    return {
        f: expand.plan_from_file(str(REPO / f"experiments/sweeps/{f}.py{arg}"), str(tmp_path / f))
        for f in FILES
    }


def test_every_ablation_run_resolves_and_varies_only_its_keys(tmp_path):
    base = load_config(REPO / "experiments/shapes_ablation.py")
    steps = base.train.steps  # experiments/shapes_ablation.py's STEPS
    every = plans(tmp_path)
    for f, plan in every.items():
        assert len(plan.runs) == FILES[f], f
        assert plan.eval_args is not None and "--num-prompts" in plan.eval_args
        assert sorted({r.seed for r in plan.runs}) == [0, 1, 2]
        for r in plan.runs:
            assert r.steps == steps and r.cfg.data == base.data and r.cfg.vae == base.vae
            changed = {
                f"{section}.{k}"
                for section in ("model", "diffusion", "optimizer")
                for k, v in dataclasses.asdict(getattr(r.cfg, section)).items()
                if v != dataclasses.asdict(getattr(base, section))[k]
            }
            assert changed <= set(r.overrides), (r.name, changed)

    def values(f, key):
        section, name = key.split(".")
        return sorted({str(getattr(getattr(r.cfg, section), name)) for r in every[f].runs})

    assert values("attention", "model.image_attention") == ["bidirectional", "causal"]
    assert values("attention", "model.patch_encoder") == ["linear", "unet"]
    assert values("patch", "model.patch_size") == ["2", "4"]
    assert values("noise_limit", "diffusion.noise_limit_image_first") == ["False", "True"]
    assert values("loss_weight", "diffusion.loss_weight") == ["1.0", "20.0", "5.0"]
    # A 4x4 U-Net patches by 2^(stages - 1): a third stage of twice the last width.
    models = {r.cfg.model for r in every["patch"].runs}
    (unet4,) = [m for m in models if m.patch_size == 4 and m.patch_encoder == "unet"]
    assert unet4.unet_channels == (*base.model.unet_channels, 2 * base.model.unet_channels[-1])
    assert unet4.num_patches == 4
    # Identical configs across files (what benchmarks/ablations.sh trains once and links).
    configs = {r.cfg.to_json() for plan in every.values() for r in plan.runs}
    assert sum(FILES.values()) == 39 and len(configs) == DISTINCT

    for f, plan in plans(tmp_path / "smoke", ":smoke").items():
        assert len(plan.runs) == SMOKE_RUNS[f], f
        assert all(r.cfg.name == "shapes_ablation_smoke" and r.steps == 2 for r in plan.runs)


def test_a_causal_unet_smoke_run_trains_on_the_shapes_data(tmp_path, shapes_run):
    """attention.py:smoke's run 3 (causal image attention, U-Net patches) through `sweep run`:
    a train subprocess to step 2 on the session's tiny shapes data, the run's config as the
    sweep file says. (Its eval is `eval`'s own tests: here the run stops at training.)"""
    wrapper = tmp_path / "attention_smoke.py"
    wrapper.write_text(
        "import dataclasses\n"
        "from tfx_jax.sweep.expand import load_sweep\n\n"
        "def get_sweep(arg=None):\n"
        f"    sweep, _ = load_sweep({str(REPO / 'experiments/sweeps/attention.py:smoke')!r})\n"
        "    return dataclasses.replace(\n"
        f"        sweep, overrides={{'data.data_dir': {str(shapes_run.data_dir)!r}}}, "
        "eval_args=None\n"
        "    )\n"
    )
    root = tmp_path / "root"
    plan = expand.plan_from_file(str(wrapper), str(root))
    run = plan.runs[3]
    assert run.name == "image_attention=causal__patch_encoder=unet__seed=0"
    with fast_children(tmp_path / "xla_cache"):
        code, out, err = tfx("sweep", "run", wrapper, "--workdir", root, "--only-index", "3")
    assert code == 0, out + err
    assert expand.trained_step(run.workdir) == 2
    saved = json.loads((root / run.name / "config.json").read_text())["model"]
    assert (saved["image_attention"], saved["patch_encoder"]) == ("causal", "unet")
    evals = [
        json.loads(line)
        for line in (root / run.name / "metrics.jsonl").read_text().splitlines()
        if "eval/lm_loss" in line
    ]
    assert evals and evals[-1]["step"] == 2
    assert not [r for r in plan.runs if r.index != 3 and (root / r.name / "checkpoints").exists()]


@pytest.mark.parametrize("arg", ["bad"])
def test_a_bad_arg_is_one_line(tmp_path, arg):
    code, _, err = tfx(
        "sweep", "plan", REPO / f"experiments/sweeps/patch.py:{arg}", "--workdir", tmp_path
    )
    assert code == 2 and "use no argument or :smoke" in err and err.count("\n") == 1

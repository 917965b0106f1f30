"""`python -m tfx_jax dryrun`: TPU topology names, the analytic plan, errors, `attention_impl=auto`,
and (with the optional libtpu) the real train step compiled for a v5p slice on this CPU machine.

Everything but the compile runs without libtpu; the compile test skips, saying so, where libtpu
is not installed (`pip install -e '.[tpu]'`).
"""

import os
import runpy
import sys

import jax
import pytest
from conftest import REPO, run_subprocess

from tfx_jax import cli, dryrun
from tfx_jax.config import ConfigError, load_config
from tfx_jax.layout import ModelInputs
from tfx_jax.models import attention
from tfx_jax.models.transformer import Transfusion
from tfx_jax.observability import flops
from tfx_jax.train.loop import param_count

TINY = str(REPO / "experiments" / "tiny.py")
PAPER = str(REPO / "experiments" / "transfusion.py")


@pytest.mark.parametrize(
    "name, chips, slices, topology, chip",
    [
        ("v5p-8", 4, 1, "v5p:2x2x1", "v5p"),
        ("v5p-128", 64, 1, "v5p:4x4x4", "v5p"),
        ("2xv5p-256", 256, 2, "v5p:4x4x8", "v5p"),
        ("v4-32", 16, 1, "v4:2x2x4", "v4"),
        ("v5e-16", 16, 1, "v5e:4x4", "v5e"),
        ("v5litepod-256", 256, 1, "v5e:16x16", "v5e"),
        ("v6e-8", 8, 1, "v6e:2x4", "v6e"),
        ("V6E-64", 64, 1, "v6e:8x8", "v6e"),
    ],
)
def test_topology_names(name, chips, slices, topology, chip):
    topo, n = dryrun.parse_topology(name)
    assert (topo.chips * n, n, topo.topology, topo.chip) == (chips, slices, topology, chip)


def test_v4_uses_one_device_per_chip():
    assert dryrun.TOPOLOGIES["v4-8"].chip_config == "megacore"  # "default" = 2 devices per chip


@pytest.mark.parametrize("name", ["v5p-100", "v7-8", "tpu", "0xv5p-8", ""])
def test_unknown_topology_lists_the_supported_ones(name):
    with pytest.raises(ConfigError, match=r"v5p-128.*v6e-256.*2xv5p-256"):
        dryrun.parse_topology(name)


def test_chip_table():
    hbm = {k: c.hbm_gib for k, c in dryrun.CHIPS.items()}
    assert hbm == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141}
    # The same peaks as the MFU table the trainer uses (by the device kind JAX reports).
    for key, kind in [("v4", "TPU v4"), ("v5e", "TPU v5 lite"), ("v5p", "TPU v5"),
                      ("v6e", "TPU v6 lite"), ("h100", "NVIDIA H100 80GB HBM3")]:  # fmt: skip
        assert flops.lookup_peak_flops(kind) == dryrun.CHIPS[key].peak_tflops * 1e12


def test_plan_without_libtpu(tiny_config):
    cfg = tiny_config()
    p = dryrun.plan(cfg, "v5p-8", mfu=0.5)
    assert p.chips == 4 and p.mesh_shape == {"data": 4, "fsdp": 1, "tensor": 1}
    assert p.flops_per_step == flops.train_flops_per_step(cfg)
    assert p.step_seconds == pytest.approx(p.flops_per_step / (4 * 459e12 * 0.5))
    model = Transfusion(cfg.model)
    params = model.init(jax.random.key(0), ModelInputs.dummy(cfg))["params"]
    assert p.params == param_count(params)
    text = dryrun.report(cfg, p, None, "libtpu is not installed")
    assert "4 x TPU v5p" in text and "not compiled: libtpu is not installed" in text


def test_paper_config_resolves_auto_for_the_target():
    cfg = load_config(f"{PAPER}:0.76b")
    assert cfg.model.attention_impl == "auto"
    p = dryrun.plan(cfg, "v5p-128")
    assert p.attention_impl == "splash" and p.attention_requested == "auto"
    assert p.mesh_shape == {"data": 1, "fsdp": 64, "tensor": 1}
    assert 0.7e9 < p.params < 0.9e9


def test_config_that_cannot_run_on_the_topology(tiny_config):
    with pytest.raises(ConfigError, match="mesh"):
        dryrun.plan(tiny_config(None, ["mesh.data=3"]), "v5p-8")
    with pytest.raises(ConfigError, match="--mfu"):
        dryrun.plan(tiny_config(), "v5p-8", mfu=1.5)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--topology", "v5p-100"], "is not a known TPU slice"),
        (["--topology", "v5p-8", "--set", "mesh.data=3"], "mesh="),
        (["--topology", "v5p-8", "--set", "model.n_hedas=3"], "Did you mean"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["dryrun", "--config", TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err


def test_every_experiment_names_its_topology():
    for path in sorted((REPO / "experiments").glob("*.py")):
        topo = runpy.run_path(str(path)).get("TOPOLOGY")
        assert topo is not None, f"{path.name} has no TOPOLOGY"
        if topo != "cpu":
            dryrun.parse_topology(topo)


def test_collective_counting():
    hlo = """
%all-reduce-scatter.3 (input.1: f32[8]) -> f32[2] {
  %input.1 = f32[8]{0} parameter(0)
  %all-reduce.7 = f32[8]{0} all-reduce(%input.1), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %dynamic-slice.1 = f32[2]{0} dynamic-slice(%all-reduce.7, %m), dynamic_slice_sizes={2}
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %all-reduce-start.1 = (f32[4]{0}, f32[4]{0}) all-reduce-start(f32[4]{0} %p), to_apply=%add
  %all-reduce-done.1 = f32[4]{0} all-reduce-done(%all-reduce-start.1)
  %ag = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %x), dimensions={0}
  %fusion.9 = f32[2]{0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.3, metadata={}
  %cp = (f32[2]{0}, f32[2]{0}) collective-permute-start(f32[2]{0} %z)
}
"""
    assert dryrun.count_collectives(hlo) == {
        "all-reduce": 1,
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-to-all": 0,
        "collective-permute": 1,
    }


# ----------------------------------------------------------------------------- attention auto


def test_auto_resolves_per_platform():
    assert attention.resolve_auto("cpu") == "xla"
    assert attention.resolve_auto("tpu") == "splash"  # the block-sparse Pallas kernel
    assert attention.resolve_auto("gpu") == "pallas_gpu"  # the block-sparse Pallas kernel


def test_auto_follows_the_target_platform():
    assert jax.default_backend() == "cpu"
    assert attention.get("auto") is attention.IMPLEMENTATIONS["xla"]
    with attention.target_platform("gpu"):
        assert attention.get("auto") is attention.IMPLEMENTATIONS[attention.resolve_auto("gpu")]
        # Decoding with a KV cache takes the dense mask: a key-range kernel falls back to xla.
        assert attention.decode_impl("auto") is attention.IMPLEMENTATIONS["xla"]
    assert attention.get("auto") is attention.IMPLEMENTATIONS["xla"]


def test_auto_model_matches_xla(tiny_config):
    outs = []
    for impl in ("auto", "xla"):
        cfg = tiny_config(None, [f"model.attention_impl={impl}"])
        model = Transfusion(cfg.model)
        x = ModelInputs.dummy(cfg)
        params = model.init(jax.random.key(0), x)["params"]
        outs.append(model.apply({"params": params}, x).logits)
    assert (outs[0] == outs[1]).all()


# ----------------------------------------------------------------------------- compile (libtpu)


@pytest.mark.parametrize(
    "topology, mesh",
    [("v5p-8", "data=2 fsdp=2 tensor=1"), ("2xv5p-8", "data=2 fsdp=4 tensor=1")],
)
def test_compiles_the_train_step_for_a_v5p_slice(topology, mesh):
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]')")
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    # attention auto: the block-sparse Pallas kernel, compiled by Mosaic inside the train step.
    sets = ["--set", "mesh.data=2", "--set", "mesh.fsdp=-1", "--mfu", "0.5"]
    sets += ["--set", "model.attention_impl=auto"]
    out = run_subprocess(
        [sys.executable, "-m", "tfx_jax", "dryrun", "--config", TINY, "--topology", topology]
        + sets,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "compiled for TPU v5" in text, text
    assert f"mesh {mesh}" in text and "attention splash (auto)" in text
    assert "of 95 GiB: fits" in text
    # fsdp shards the weights: the step gathers them and reduce-scatters the gradients.
    colls = dict(
        kv.rsplit(" ", 1) for kv in text.split("collectives in the compiled HLO")[1]
        .split(": ", 1)[1].strip().split(", ")
    )  # fmt: skip
    assert int(colls["all-gather"]) > 0 and int(colls["reduce-scatter"]) > 0, text


def test_without_libtpu_reports_the_analytic_part(tiny_config, monkeypatch):
    monkeypatch.setattr(dryrun, "libtpu_available", lambda: False)
    text, p, c = dryrun.run(tiny_config(), "v6e-8")
    assert c is None and p.chips == 8
    assert "not compiled: libtpu is not installed" in text
    # The state fits: a lower bound only, so no verdict (exit 0).
    assert "<= 32 GiB HBM on v6e" in text and "the compiled peak is not known" in text
    assert dryrun.fits(p, None) is None


@pytest.mark.parametrize(
    "mesh", [["mesh.data=8"], ["mesh.data=1", "mesh.fsdp=8"], ["mesh.data=2", "mesh.fsdp=4"]]
)
def test_the_state_lower_bound_is_the_sharded_train_state(tiny_config, mesh):
    """`state_bytes_per_chip` (shapes and the mesh's sizes, no devices) equals the bytes of the
    Trainer's own sharded train state on one device of a real 8-device mesh."""
    from tfx_jax import sharding
    from tfx_jax.train import loop
    from tfx_jax.train.optim import make_optimizer

    cfg = tiny_config(None, mesh)
    real = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    rng = jax.eval_shape(jax.random.key, 0)
    state, _ = loop.abstract_train_state(cfg, real, Transfusion(cfg.model), tx, rng)
    want = dryrun.sharded_bytes(state)
    assert dryrun.state_bytes_per_chip(cfg, dict(real.shape)) == want
    assert dryrun.state_bytes_per_chip(cfg, {}) > want or mesh == ["mesh.data=8"]  # unsharded


def test_without_libtpu_a_state_over_hbm_fails(monkeypatch, capsys):
    """7B on one v5e chip: params + AdamW moments alone are ~76 GiB of its 16 GiB, so even
    without libtpu the dry run says it does not fit, in one line, and exits 1."""
    monkeypatch.setattr(dryrun, "libtpu_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        cli.main(["dryrun", "--config", f"{PAPER}:7b", "--topology", "v5e-1"])
    out = capsys.readouterr().out
    assert e.value.code == 1, out
    (line,) = [x for x in out.splitlines() if "lower bound" in x]
    assert "lower bound: 75.82 GiB of state per chip" in line, line
    assert "> 16 GiB HBM on v5e: does NOT fit" in line
    assert "without libtpu the compiled peak is not known" in line


def test_compiler_out_of_memory_message():
    msg = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
        "required for HLO temporaries (229.29G) exceeds available HBM (95.73G). HLO module: x."
    )
    temp, available = dryrun.parse_oom(msg)
    assert temp == int(229.29 * 2**30) and available == int(95.73 * 2**30)


def test_fits_and_advice(tiny_config):
    cfg = tiny_config()
    p = dryrun.plan(cfg, "v5e-4")  # 16 GiB chips
    small = dryrun.Compiled(1.0, "TPU v5 lite", state_bytes=2**20, temp_bytes=2**30)
    big = dryrun.Compiled(1.0, "TPU v5 lite", state_bytes=2**20, temp_bytes=40 * 2**30)
    assert dryrun.fits(p, small) and not dryrun.fits(p, big) and dryrun.fits(p, None) is None
    text = dryrun.report(cfg, p, big)
    assert "does NOT fit" in text and "model.remat_policy=full" in text
    assert "optimizer.grad_accum_steps=" in text or "a larger topology" in text

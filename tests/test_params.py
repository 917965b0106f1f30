"""Parameters without the trainer (params.restore_params) and generation options defined once."""

import argparse
import gc

import jax
import numpy as np
import pytest

from tfx_jax import params as params_lib
from tfx_jax import sharding
from tfx_jax.checkpoint import Checkpointer
from tfx_jax.cli import build_parser
from tfx_jax.config import ConfigError, MeshConfig
from tfx_jax.generate import options
from tfx_jax.generate.options import SampleOptions
from tfx_jax.train import loop as train_lib
from tfx_jax.train.loop import Trainer


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_restore_params_reads_no_optimizer_state(tiny_config, tmp_path, fast_compile):
    """Loading for generation/export allocates the params and nothing else: the optimizer
    moments (2x the params for AdamW) stay on disk, and the values equal the trained ones."""
    cfg = tiny_config()
    trainer = Trainer(cfg)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(7, trainer.state, None, {"config": cfg.to_dict(), "step": 7})
    ckpt.close()
    state_bytes, param_bytes = _nbytes(trainer.state), _nbytes(trainer.state.params)
    assert state_bytes > 2.5 * param_bytes  # AdamW: params + two moments

    gc.collect()
    before = sum(x.nbytes for x in jax.live_arrays())
    loaded_cfg, params, step = params_lib.restore_params(tmp_path)
    grown = sum(x.nbytes for x in jax.live_arrays()) - before
    assert step == 7 and loaded_cfg == cfg
    assert grown == _nbytes(params) == param_bytes
    for want, got in zip(
        jax.tree.leaves(trainer.state.params), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_restore_params_onto_another_mesh(tiny_config, tmp_path, fast_compile):
    """The target tree carries the shardings: a checkpoint of an 8-device data-parallel run
    loads onto a 1x2x2 mesh of 4 devices, sharded there by the rules table."""
    cfg = tiny_config()
    trainer = Trainer(cfg)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, trainer.state, None, {"config": cfg.to_dict(), "step": 1})
    ckpt.close()
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    _, params, _ = params_lib.restore_params(tmp_path, mesh=mesh)
    embed = params["embed"]["embedding"]
    assert embed.sharding.mesh.shape == {"data": 1, "fsdp": 2, "tensor": 2}
    assert embed.addressable_shards[0].data.shape == (
        embed.shape[0] // 2,  # vocab over tensor
        embed.shape[1] // 2,  # embed over fsdp
    )
    np.testing.assert_array_equal(
        np.asarray(embed), np.asarray(trainer.state.params["embed"]["embedding"])
    )


def test_restore_params_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        params_lib.restore_params(tmp_path)


def test_sampler_defaults_follow_the_paper_and_the_training_mode(tiny_config):
    cfg = tiny_config()
    assert SampleOptions(sampler="ddpm").resolved(cfg).diffusion_steps == 250
    assert SampleOptions(sampler="ddim").resolved(cfg).diffusion_steps == 50
    assert SampleOptions(diffusion_steps=7).resolved(cfg).diffusion_steps == 7
    assert SampleOptions().resolved(cfg).image_mode == "full"
    rolling = tiny_config(None, ["diffusion.mode=rolling", "diffusion.rolling_window=2"])
    opts = SampleOptions().resolved(rolling)
    assert (opts.image_mode, opts.rolling_window) == ("rolling", 2)
    assert SampleOptions(image_mode="full").resolved(rolling).image_mode == "full"


def test_cli_flags_are_the_options_with_the_same_defaults():
    """`generate`'s flags are built from SampleOptions: parsing no sampling flag gives exactly
    the API's defaults, and --help shows each default."""
    parser = build_parser()
    args = parser.parse_args(["generate", "--workdir", "x", "--prompt", "p"])
    assert options.from_args(args) == SampleOptions()
    args = parser.parse_args(
        ["generate", "--workdir", "x", "--prompt", "p", "--guidance", "none", "--top-k", "5"]
    )
    assert options.from_args(args) == SampleOptions(guidance_scale=None, top_k=5)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    help_text = sub.choices["generate"].format_help()
    assert "(default: 250" not in help_text and "ddpm: 250" in help_text
    for field in ("--temperature", "--diffusion-steps", "--guidance", "--image-mode"):
        assert field in help_text


@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(diffusion_steps=-3), "diffusion_steps"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(image_mode="sideways"), "image_mode"),
        (dict(guidance_scale=-2.0), "guidance_scale"),
    ],
)
def test_bad_options_name_the_option(tiny_config, bad, name):
    with pytest.raises(ConfigError, match=f"generate option {name}="):
        SampleOptions(**bad).resolved(tiny_config())


def test_init_from_may_change_the_optimizer_recipe(
    tiny_config, tmp_path, caplog, compile_cache, fast_compile
):
    """--init-from takes the params alone: fine-tuning with another learning rate and schedule
    works (resuming with them would be refused); a changed model is still refused."""
    base = ["train.steps=2", "train.log_every=1", "checkpoint.every_steps=2"]
    pre_hist = train_lib.train(tiny_config(overrides=base), tmp_path / "pre")
    tuned = tiny_config(overrides=[*base, "optimizer.learning_rate=1e-4", "optimizer.b2=0.99"])
    hist = train_lib.train(tuned, tmp_path / "tune", init_from=str(tmp_path / "pre"))
    assert [h["step"] for h in hist] == [1, 2]
    # Step 1 sees the same batch as the pre-training's step 1, from the trained params.
    assert hist[0]["loss"] < pre_hist[0]["loss"] - 0.05
    wider = tiny_config(overrides=[*base, "model.mlp_dim=256"])
    with pytest.raises(ConfigError, match="model.mlp_dim"):
        train_lib.train(wider, tmp_path / "wide", init_from=str(tmp_path / "pre"))
    with pytest.raises(ConfigError, match="optimizer.learning_rate"):
        train_lib.train(tuned, tmp_path / "pre2", resume=str(tmp_path / "pre"))
    caplog.clear()
    train_lib.train(tiny_config(overrides=[*base]), tmp_path / "pre")
    assert any("nothing to train" in r.getMessage() for r in caplog.records)

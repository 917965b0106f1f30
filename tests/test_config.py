"""Config errors fail before compiling and name the key, the value and the fix."""

import dataclasses

import pytest

from tfx_jax.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    resolve_mesh_shape,
    validate,
)


def test_overrides_parse_types(tiny_config):
    cfg = tiny_config(
        overrides=[
            "model.d_model=96",
            "model.qk_norm=true",
            "optimizer.b2=0.99",
            "model.unet_channels=8,16",
            "name=x",
        ]
    )
    assert cfg.model.d_model == 96 and cfg.model.qk_norm is True
    assert cfg.optimizer.b2 == 0.99 and cfg.model.unet_channels == (8, 16) and cfg.name == "x"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.n_hedas=4", "Did you mean 'model.n_heads'"),
        ("modle.n_heads=4", "Did you mean 'model'"),
        ("model.d_model=abc", "model.d_model='abc': expected a value of type int"),
        ("model.qk_norm=maybe", "model.qk_norm='maybe'"),
        ("model=3", "is a section"),
        ("model.d_model", "must look like key.path=value"),
        ("data.max_examples=0", "data.max_examples=0 must be >= 1 when set"),  # unset = all
    ],
)
def test_bad_overrides_name_the_key(tiny_config, override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        tiny_config(overrides=[override])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.n_heads=3"], "model.n_heads=3 does not divide model.d_model=64"),
        (["model.patch_size=3"], "model.patch_size=3 does not tile model.latent_size=8"),
        (["mesh.data=3"], "has 3 devices but 8 are available"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis may be -1"),
        (["data.global_batch_size=12"], "not divisible by the batch-parallel size"),
        (["optimizer.grad_accum_steps=3"], "not divisible by optimizer.grad_accum_steps=3"),
        (["model.attention_impl=flash"], "model.attention_impl='flash'"),
        (["model.remat_policy=some"], "model.remat_policy='some'"),
        (["model.patch_encoder=unet", "model.unet_channels=8,16,32"], "downsamples by 4"),
        (["model.image_attention=full"], "model.image_attention='full': use 'bidirectional' or"),
        (
            ["model.image_attention=causal", "diffusion.mode=rolling"],
            "diffusion.mode=rolling needs model.image_attention=bidirectional",
        ),
        (["data.seq_len=10"], "cannot hold one image"),
        (["mesh.tensor=8", "mesh.data=1"], "mesh.tensor=8 must divide model.n_heads=4"),
    ],
)
def test_impossible_combinations(tiny_config, overrides, fragment):
    cfg = tiny_config(overrides=overrides)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        validate(cfg, num_devices=8)


def test_mesh_fill():
    from tfx_jax.config import MeshConfig

    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert resolve_mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)


def test_round_trip_through_dict(tiny_config):
    cfg = tiny_config("unet")
    assert from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="Unknown config key 'model.widht'"):
        d = cfg.to_dict()
        d["model"]["widht"] = 3
        from_dict(d)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().model.d_model = 3  # type: ignore[misc]
    assert apply_overrides(Config(), []) == Config()


def test_paper_sizes_validate():
    from conftest import REPO

    from tfx_jax.config import load_config

    for size in ("0.16b", "0.37b", "0.76b", "1.4b", "7b"):
        validate(load_config(f"{REPO}/experiments/transfusion.py:{size}"), num_devices=256)

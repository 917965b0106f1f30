"""Test setup: 8 simulated CPU devices so every sharding path runs for real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_config():
    from tfx_jax.config import load_config

    def make(arg=None, overrides=()):
        path = REPO / "experiments" / "tiny.py"
        return load_config(f"{path}:{arg}" if arg else path, overrides)

    return make

"""tfx_jax: a JAX/Flax trainer for Transfusion-style unified text+image models."""

__version__ = "0.1.0"

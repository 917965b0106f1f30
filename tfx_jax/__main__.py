"""`python -m tfx_jax <command>`: see `tfx_jax.cli`."""

from tfx_jax.cli import main

if __name__ == "__main__":
    main()

"""The one entry point: `python -m tfx_jax <command>` (also installed as `tfx`).

Every command takes `--config FILE[:arg]` (a Python file returning a Config), `--workdir DIR` and
repeatable `--set key.path=value` overrides. Config errors are reported before anything compiles,
as one line naming the key and value, with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tfx_jax.config import Config, ConfigError, load_config, validate

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "tiny.py"


def _add_common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument(
        "--config",
        required=config_required,
        default=None if config_required else str(DEFAULT_CONFIG),
        help="experiment file defining get_config(arg); 'file.py:arg' passes arg",
    )
    p.add_argument("--workdir", required=True, help="where logs, metrics and checkpoints go")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.n_layers=4 (repeatable)",
    )


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> None:
    from tfx_jax import train

    train.train(_load(args), args.workdir)


def cmd_config(args: argparse.Namespace) -> None:
    import jax

    cfg = _load(args)
    validate(cfg, num_devices=jax.device_count())
    print(cfg.to_json())


def cmd_demo(args: argparse.Namespace) -> None:
    from tfx_jax import train

    cfg = _load(args)
    print(
        f"tfx_jax demo: training '{cfg.name}' for {cfg.train.steps} steps on "
        f"{cfg.data.source} data (packed text + image latents)."
    )
    history = train.train(cfg, args.workdir)
    first, last = history[0], history[-1]
    print("\n               first logged   last logged")
    for key in ("lm_loss", "diffusion_loss"):
        print(f"  {key:<14} {first[key]:>12.4f} {last[key]:>13.4f}")
    print(f"metrics: {Path(args.workdir) / 'metrics.jsonl'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfx", description="tfx_jax: train and run Transfusion-style text+image models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model", description="Train a model.")
    _add_common(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "demo",
        help="the main job end to end on the embedded default (tiny config)",
        description="Train the tiny config end to end on CPU and print both losses.",
    )
    _add_common(p, config_required=False)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser(
        "config",
        help="print the resolved config after overrides and validate it",
        description="Print the resolved config as JSON and validate it for this machine.",
    )
    _add_common(p)
    p.set_defaults(fn=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("jax._src.xla_bridge", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)

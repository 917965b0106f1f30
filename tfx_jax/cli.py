"""The one entry point: `python -m tfx_jax <command>` (also installed as `tfx`).

Every command takes `--config FILE[:arg]` (a Python file returning a Config), `--workdir DIR` and
repeatable `--set key.path=value` overrides. Config errors are reported before anything compiles,
as one line naming the key and value, with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import jax
from etils import epath

from tfx_jax import artifacts, demo, dryrun, export, report, stages
from tfx_jax import params as params_lib
from tfx_jax.checkpoint import CheckpointWriteError
from tfx_jax.config import Config, ConfigError, load_config, validate
from tfx_jax.data.sources import RecordError
from tfx_jax.eval import command as eval_command
from tfx_jax.eval.prompts import IMAGE_OPTIONS, split_options
from tfx_jax.generate import command as generate_command
from tfx_jax.generate import options as sample_options
from tfx_jax.sweep import command as sweep_command
from tfx_jax.train import loop
from tfx_jax.train.steps import make_eval_step

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "demo.py"


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument(
        "--distributed",
        choices=["off", "auto", "explicit"],
        default=os.environ.get("TFX_DISTRIBUTED", "off"),
        help="auto: jax.distributed.initialize() detects the cluster (TPU pods, SLURM); "
        "explicit: use the three flags below (or TFX_COORDINATOR / TFX_NUM_PROCESSES / "
        "TFX_PROCESS_ID)",
    )
    g.add_argument("--coordinator", default=os.environ.get("TFX_COORDINATOR"), help="host:port")
    g.add_argument("--num-processes", type=int, default=_env_int("TFX_NUM_PROCESSES"))
    g.add_argument("--process-id", type=int, default=_env_int("TFX_PROCESS_ID"))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def init_distributed(args: argparse.Namespace) -> None:
    """Joins the multi-process job before any JAX computation (no-op when off)."""
    mode = getattr(args, "distributed", "off")
    if mode == "auto":
        jax.distributed.initialize()
    elif mode == "explicit":
        missing = [
            f"--{n.replace('_', '-')}"
            for n in ("coordinator", "num_processes", "process_id")
            if getattr(args, n) is None
        ]
        if missing:
            raise ConfigError(f"--distributed explicit needs {', '.join(missing)}.")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )


def _add_config(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    """--config FILE[:arg] and repeatable --set KEY=VALUE."""
    p.add_argument(
        "--config",
        required=config_required,
        default=None if config_required else str(DEFAULT_CONFIG),
        help="experiment file defining get_config(arg); 'file.py:arg' passes arg",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.n_layers=4 (repeatable)",
    )


def _add_common(
    p: argparse.ArgumentParser, config_required: bool = True, workdir: bool = True
) -> None:
    _add_config(p, config_required)
    if workdir:
        p.add_argument("--workdir", required=True, help="where logs, metrics and checkpoints go")
    _add_distributed(p)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> None:
    loop.train(_load(args), args.workdir, resume=args.resume, init_from=args.init_from)


def cmd_export(args: argparse.Namespace) -> None:
    cfg, params, step = params_lib.restore_params(args.workdir, step=args.step)
    out = args.out or f"{args.workdir}/export/step_{step}"
    if args.format == "params":
        tok = artifacts.tokenizer_path(cfg)
        vae = artifacts.vae_dir(cfg)
        path = export.export_params(
            cfg,
            params,
            out,
            dtype=args.dtype,
            tokenizer_path=tok if tok.exists() else None,
            vae_dir=vae if (vae / "vae.json").exists() else None,
        )
    else:
        tok = artifacts.tokenizer_path(cfg)
        try:
            path = export.export_hf_llama(
                cfg, params, out, tokenizer_path=tok if tok.exists() else None, dtype=args.dtype
            )
        except ValueError as e:  # the architecture has no Llama equivalent
            raise ConfigError(f"cannot export to the Hugging Face Llama layout: {e}") from e
    print(f"exported step {step} ({args.format}, {args.dtype}) to {path}")


def cmd_generate(args: argparse.Namespace) -> None:
    # Everything that can be wrong with the request fails before the model is loaded.
    options = sample_options.from_args(args)
    options.validate()
    for image in args.image:
        if not epath.Path(image).is_file():  # may be gs://
            raise ConfigError(f"--image {image}: no such file (give an image file).")
    generate_command.plan_prompt_images(args.prompt, len(args.image))
    if args.export:
        cfg, params = export.load_export(args.export)
        out = args.out or f"{args.export}/samples"
    else:
        cfg, params, step = params_lib.restore_params(args.workdir, step=args.step)
        out = args.out or f"{args.workdir}/samples/step_{step}"
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=args.data_dir))
    generate_command.generate_cli(
        cfg,
        params,
        args.prompt,
        out,
        options,
        input_images=args.image,
        force_image=args.force_image,
    )


def cmd_eval(args: argparse.Namespace) -> None:
    options = sample_options.from_args(args)
    for part in split_options(options):  # images' and captions' own
        part.validate()  # a bad option fails before the model is loaded
    if args.num_prompts < 1:
        raise ConfigError(f"--num-prompts {args.num_prompts}: give at least 1 per split.")
    splits = [s for part in args.split for s in part.split(",") if s]
    result = eval_command.evaluate_run(
        args.workdir,
        args.step,
        splits=splits or None,
        num_prompts=args.num_prompts,
        options=options,
        overrides=args.overrides,
        num_batches=args.num_batches,
        make_eval_step=make_eval_step,
        targets=demo.check_targets,
    )
    if jax.process_index() != 0:
        return
    print(eval_command.summary(result))
    print(f"wrote {epath.Path(args.workdir) / 'eval.json'}")
    if not args.no_report:
        print(f"report: {report.write(args.workdir)['html']}")


def cmd_report(args: argparse.Namespace) -> None:
    paths = report.write(args.workdir)
    print(f"wrote {paths['html']} and {paths['markdown']}")


def cmd_config(args: argparse.Namespace) -> None:
    cfg = _load(args)
    validate(cfg, num_devices=jax.device_count())
    print(cfg.to_json())


def cmd_data(args: argparse.Namespace) -> None:
    cfg = _load(args)
    validate(cfg, num_devices=jax.device_count())
    {
        "build": stages.build_dataset,
        "tokenizer": stages.build_tokenizer,
        "encode": stages.encode,
        "latents": stages.encode,  # the former name of `encode`
        "all": stages.prepare_all,
    }[args.stage](cfg)


def cmd_vae(args: argparse.Namespace) -> None:
    cfg = _load(args)
    validate(cfg, num_devices=jax.device_count())
    stages.train_vae(cfg)


def cmd_demo(args: argparse.Namespace) -> None:
    cfg = _load(args)
    validate(cfg, num_devices=jax.device_count())
    demo.run(cfg, args.workdir)


def cmd_dryrun(args: argparse.Namespace) -> None:
    cfg = _load(args)
    topology = args.topology or dryrun.intended_topology(args.config)
    text, plan, compiled = dryrun.run(cfg, topology, mfu=args.mfu)
    print(text)
    if dryrun.fits(plan, compiled) is False:
        sys.exit(1)  # scripts can gate a launch on it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfx", description="tfx_jax: train and run Transfusion-style text+image models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model (resumes from the workdir's checkpoints)",
        description="Train a model. Starts from, in order: the newest complete checkpoint in "
        "--workdir, --resume PATH (full state and data position), --init-from PATH (params "
        "only), or fresh. SIGTERM saves at the next step boundary and exits 0.",
    )
    _add_common(p)
    p.add_argument("--resume", help="another run's workdir or checkpoint dir to continue from")
    p.add_argument("--init-from", help="a checkpoint whose params initialise a fresh run")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "demo",
        help="the main job end to end on the embedded default (tiny config)",
        description="Train the tiny config end to end on CPU and print both losses.",
    )
    _add_common(p, config_required=False)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser(
        "data",
        help="prepare data: build | tokenizer | encode | all",
        description="build: render the embedded TFDS dataset (or check a tfds/folder/text "
        "source is there); tokenizer: train SentencePiece on a sample of its text "
        "(data.tokenizer_sample); encode: tokenize every example and encode its images with the "
        "trained VAE, once, into ArrayRecord shards (data.encode_shard_size), spread over every "
        "process under --distributed; a killed encode resumes, a current one does nothing; all: "
        "every missing or stale stage, the VAE included ('latents' is accepted for 'encode'). "
        "data.max_examples=N bounds every stage for a trial.",
    )
    p.add_argument("stage", choices=["build", "tokenizer", "encode", "latents", "all"])
    _add_common(p, config_required=False, workdir=False)
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser(
        "vae",
        help="train the image VAE on the dataset's images",
        description="Train the KL-VAE on the mesh (sharded batches, metrics, Orbax checkpoints "
        "in DATA_DIR/vae, resumable); saves params, scale factor and held-out PSNR.",
    )
    _add_common(p, config_required=False, workdir=False)
    p.set_defaults(fn=cmd_vae)

    p = sub.add_parser(
        "export",
        help="export a checkpoint: params-only safetensors, or the text backbone as HF Llama",
        description="Export a run's checkpoint for evaluation. --format params: model.safetensors "
        "+ config.json + tokenizer + VAE, loadable by generate/eval without optimizer state. "
        "--format hf: the text backbone in the Hugging Face Llama layout (refused, with the "
        "reason, when the architecture has no Llama equivalent, e.g. QK-norm).",
    )
    p.add_argument("--workdir", required=True, help="the run (or its checkpoints directory)")
    p.add_argument("--step", type=int, default=None, help="default: the latest complete step")
    p.add_argument("--format", choices=["params", "hf"], default="params")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--out", default=None, help="default: WORKDIR/export/step_N")
    _add_distributed(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser(
        "generate",
        help="write text and images from prompts (Markdown + HTML with PNGs)",
        description="Decode text with a KV cache; on BOI (or --force-image) draw an image by "
        "diffusion over the cached prefix with classifier-free guidance; continue to EOS. "
        "'<image>' in a prompt marks where an --image goes; a prompt with an --image and no "
        "marker is captioned (image to text).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run: its newest checkpoint is used")
    src.add_argument("--export", help="a params-only export directory (tfx export)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--image", action="append", default=[], help="input image file (repeatable)")
    p.add_argument("--out", default=None, help="default: WORKDIR/samples/step_N")
    p.add_argument("--data-dir", default=None, help="tokenizer/VAE location if moved")
    p.add_argument("--force-image", action="store_true", help="start every answer with an image")
    sample_options.add_arguments(p)
    _add_distributed(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "eval",
        help="evaluate a run's checkpoint: losses, judged images and captions -> eval.json",
        description="Restore a checkpoint's params only and compute what training's "
        "evaluators compute: held-out perplexity, diffusion loss per timestep bucket and per "
        "patch row; for image sources, an image per prompt of each split scored by the judge "
        "(per attribute, seen vs held-out pairs, one vs several objects, grid row) and a greedy "
        "caption for each true image; one interleaved document. Writes WORKDIR/eval.json, "
        "WORKDIR/eval/step_N/ and (unless --no-report) WORKDIR/report.html.",
    )
    p.add_argument("--workdir", required=True, help="the run (its checkpoints/ are read)")
    p.add_argument("--step", type=int, default=None, help="default: the latest complete step")
    p.add_argument(
        "--split",
        action="append",
        default=[],
        help="prompt split(s), repeatable or comma-separated (default: train,heldout for the "
        "shapes data, else validation)",
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        default=64,
        help="prompts per split; --seed picks them and the noise (default: 64)",
    )
    p.add_argument(
        "--num-batches",
        type=int,
        default=0,
        help="validation batches for the losses (default: train.eval_batches, as in training)",
    )
    p.add_argument("--no-report", action="store_true", help="do not write report.html/.md")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the saved config, e.g. --set data.data_dir=DIR when the data moved",
    )
    sample_options.add_arguments(p, IMAGE_OPTIONS)
    _add_distributed(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser(
        "report",
        help="write WORKDIR/report.html and report.md from eval.json and metrics.jsonl",
        description="A self-contained HTML report (images inline) and a Markdown one: config, "
        "targets, loss and eval curves, metric tables, the sample grid with its prompts, "
        "captions beside their images, an interleaved document. Needs no model.",
    )
    p.add_argument("--workdir", required=True, help="the run")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser(
        "config",
        help="print the resolved config after overrides and validate it",
        description="Print the resolved config as JSON and validate it for this machine.",
    )
    _add_common(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser(
        "dryrun",
        help="compile the train step for a TPU pod on this machine; memory, FLOPs, collectives",
        description="Without the hardware: build the mesh over the abstract devices of a TPU "
        "topology, compile the real train step with libtpu (pip install 'tfx_jax[tpu]'), and "
        "report per-chip memory against the chip's HBM, FLOPs per step, parameters, the "
        "collectives and the step time at --mfu. Without libtpu the analytic part and a lower "
        "bound of memory (the sharded train state; exit 1 when even that does not fit).",
    )
    _add_config(p)
    p.add_argument(
        "--topology",
        default=None,
        help="a Cloud TPU slice: v5p-128, v4-32, v5e-16, v6e-64, ...; 2xv5p-256 = 2 slices "
        "(default: the config file's TOPOLOGIES[arg] or TOPOLOGY)",
    )
    p.add_argument("--mfu", type=float, default=0.4, help="MFU for the expected step time")
    p.set_defaults(fn=cmd_dryrun)

    p = sub.add_parser(
        "sweep",
        help="a sweep file's runs: run here, launch on a cluster, collect, report",
        description="Expand a sweep file (experiments/sweeps/) into named runs under --workdir "
        "ROOT, every run's config checked first; `sweep FILE` is `sweep run FILE`.",
    )
    sweep_command.add_arguments(p)
    return parser


def _one_line_library_logs(record: logging.LogRecord) -> bool:
    """Libraries' error logs (Orbax's background writers on a full disk, ...) keep their message
    but not their traceback: the run's own one-line error says what happened and what to do."""
    if not record.name.startswith("tfx_jax") and (record.exc_info or record.stack_info):
        record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("jax._src.xla_bridge", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_one_line_library_logs)
    argv = sweep_command.default_action(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        init_distributed(args)
        args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:  # a missing dataset, tokenizer, VAE or checkpoint: say which
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RecordError as e:  # bad data with data.on_error=raise: the message names the record
        print(f"data error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointWriteError as e:  # names the directory and the OS error
        print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # e.g. a full disk under the metrics: errno, message and path
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except loop.NonFiniteLossError as e:  # train.nan_policy=stop
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except loop.InputPipelineError as e:  # e.g. a Grain worker killed; the steps done are saved
        print(f"data error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first)
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)

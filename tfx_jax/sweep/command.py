"""The `sweep` command: `python -m tfx_jax sweep [run|plan|launch|collect|report] ...`.

    sweep [run] FILE --workdir ROOT [--only-index I,J] [--distributed auto]
    sweep plan FILE --workdir ROOT
    sweep launch slurm|xpk|tpu FILE --workdir ROOT [--dry-run] [--name-prefix P]
                 [--max-parallel K] -- SCRIPT_ARGS...
    sweep collect [FILE] --workdir ROOT [--metrics a,b,c]
    sweep report [FILE] --workdir ROOT [--metrics a,b,c]

Every form expands the sweep file and resolves every run's config first: a bad file or key is
one line (exit 2) before anything runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tfx_jax.sweep import collect, expand, launch, report, run

ACTIONS = ("run", "plan", "launch", "collect", "report")


def default_action(argv: Sequence[str]) -> list[str]:
    """`sweep FILE ...` is `sweep run FILE ...`; the launch script's arguments after `--` in
    `sweep launch` become `--script-arg=A` each (argparse cannot take options as a trailing
    positional list after positionals it has already filled)."""
    argv = list(argv)
    if len(argv) > 1 and argv[0] == "sweep" and argv[1] not in ACTIONS and argv[1][:1] != "-":
        argv.insert(1, "run")
    if argv[:2] == ["sweep", "launch"] and "--" in argv:
        cut = argv.index("--")
        argv = argv[:cut] + [f"--script-arg={a}" for a in argv[cut + 1 :]]
    return argv


def _indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give run indices, e.g. 3 or 0,2,5") from None


def _metrics(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _plan(args: argparse.Namespace) -> expand.Plan:
    return expand.plan_from_file(args.sweep_file, args.workdir)


def cmd_run(args: argparse.Namespace) -> None:
    plan = _plan(args)
    runs = run.select(plan.runs, args.only_index)
    if run.is_main_process():
        expand.write_plan(plan, runs)
    code, _ = run.run_sweep(plan, runs, distributed=args.child_distributed)
    if code:
        sys.exit(code)


def cmd_plan(args: argparse.Namespace) -> None:
    plan = _plan(args)
    expand.write_plan(plan)
    with_eval = plan.eval_args is not None
    print(f"sweep {plan.name}: {len(plan.runs)} run(s) of {plan.config} under {plan.root}")
    for r in plan.runs:
        print(
            f"  {r.index:>3}  {r.name}  [{expand.status(r, with_eval)}]  --set {' '.join(r.sets)}"
        )
    print(f"wrote {plan.root}/{expand.PLAN_NAME}")


def cmd_launch(args: argparse.Namespace) -> None:
    plan = _plan(args)
    code = launch.launch(
        args.engine,
        plan,
        args.script_args,
        dry_run=args.dry_run,
        name_prefix=args.name_prefix,
        max_parallel=args.max_parallel,
    )
    if code:
        sys.exit(code)


def _read(args: argparse.Namespace) -> dict:
    if args.sweep_file:  # re-expanded (and checked), so sweep.json is the file's current runs
        expand.write_plan(_plan(args))
    return expand.read_plan(args.workdir)


def cmd_collect(args: argparse.Namespace) -> None:
    out = collect.write(_read(args), args.metrics)
    print(out["text"], end="")
    print(f"wrote {', '.join(str(p) for p in out['paths'].values())}")


def cmd_report(args: argparse.Namespace) -> None:
    out = report.write(_read(args), args.metrics)
    print(out["collected"]["text"], end="")
    print(f"wrote {out['html']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `sweep` subcommands, on the `sweep` parser."""
    sub = p.add_subparsers(dest="sweep_action", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser, file_required: bool = True) -> None:
        q.add_argument(
            "sweep_file",
            nargs=None if file_required else "?",
            metavar="SWEEP_FILE",
            help="a sweep file defining get_sweep(arg); 'file.py:arg' passes arg"
            + ("" if file_required else " (default: ROOT/sweep.json as last written)"),
        )
        q.add_argument("--workdir", required=True, help="the sweep's root: ROOT/<run name>/")

    q = sub.add_parser(
        "run",
        help="run the sweep's runs here, one after another (the default action)",
        description="Each run: `python -m tfx_jax train` in a subprocess (then `eval` if the "
        "sweep asks), output in ROOT/<run>/log.txt. Finished runs are skipped, unfinished ones "
        "resume from their checkpoints, a failed one is reported and the rest go on; a summary "
        "at the end, exit 1 if any failed.",
    )
    common(q)
    q.add_argument(
        "--only-index",
        type=_indices,
        default=None,
        metavar="I[,J...]",
        help="only these runs (0-based, the order of `sweep plan`; a SLURM array "
        "task passes its index)",
    )
    q.add_argument(
        "--distributed",
        dest="child_distributed",
        default="off",
        choices=["off", "auto"],
        help="passed to each run's train and eval (auto: a multi-process SLURM task)",
    )
    q.set_defaults(fn=cmd_run)

    q = sub.add_parser(
        "plan",
        help="list the runs (names, overrides, status) and write ROOT/sweep.json",
        description="Expand and check the sweep; write ROOT/sweep.json and each run's "
        "config.json; print every run with its --set overrides and status. Runs nothing.",
    )
    common(q)
    q.set_defaults(fn=cmd_plan)

    q = sub.add_parser(
        "launch",
        help="launch the runs on a cluster: one SLURM array, or an xpk workload / TPU "
        "queued resource per run",
        description="slurm: one job array through launch/slurm.sh (task i runs `sweep run "
        "--only-index i`); xpk: one workload per run through launch/xpk_multislice.sh; tpu: "
        "one queued resource per run through launch/tpu_queued.sh (all at once). The script's "
        "own arguments follow '--', e.g. `-- --nodes 2 --gpus-per-node 8 --partition gpu`.",
    )
    q.add_argument("engine", choices=sorted(launch.ENGINES))
    common(q)
    q.add_argument("--dry-run", action="store_true", help="the scripts print every command")
    q.add_argument(
        "--name-prefix",
        default=None,
        help="job / workload names: PREFIX (slurm) or PREFIX-i (default: the sweep's name)",
    )
    q.add_argument(
        "--max-parallel",
        type=int,
        default=0,
        help="slurm: at most K array tasks at once (--array=0-N%%K)",
    )
    q.add_argument(
        "--script-arg", dest="script_args", action="append", default=[], help=argparse.SUPPRESS
    )  # what follows `--`: see default_action
    q.epilog = "-- SCRIPT_ARGS: the launch script's own arguments (launch/<script> --help)."
    q.set_defaults(fn=cmd_launch)

    for action, what, fn, module in (
        (
            "collect",
            "final and best eval metrics per group, mean ± std over seeds "
            "-> ROOT/sweep_results.md/.csv",
            cmd_collect,
            collect,
        ),
        ("report", "ROOT/sweep.html: loss curves and metric bars of every run", cmd_report, report),
    ):
        doc = " ".join(module.__doc__.split("\n\n")[0].split())
        q = sub.add_parser(action, help=what, description=doc.replace("%", "%%"))
        common(q, file_required=False)
        q.add_argument(
            "--metrics",
            type=_metrics,
            default=None,
            metavar="A,B,C",
            help="the eval metrics to show (default: the sweep's, else eval/lm_loss, "
            "eval/perplexity, eval/diffusion_loss and the judge's scores where "
            "present)",
        )
        q.set_defaults(fn=fn)

"""Where the train step's time goes: a per-category table from a profiler trace (issue 17 item 2).

    python benchmarks/profile_step.py --config experiments/transfusion.py:0.16b,synthetic \
        --batch 8 --seq-len 4096 --out /tmp/profile --deadline 150

Compiles the train step once (as benchmarks/train_step.py does), traces `--steps` steps of the
Transfusion batch and then of the text-only batch (same compiled step, rows that are one causal
document each) with `jax.profiler.trace(..., create_perfetto_trace=True)`, and sorts the device
time of every HLO op into categories. The category comes from the op's metadata in the compiled
HLO (`compiled.as_text()`: `metadata={op_name="jit(train_step)/.../attn/..."}`, the flax module
path), never from the kernel's name: a fusion is judged by its heavy instructions (dots,
convolutions, custom calls, gathers/scatters) or else by the majority of what it fuses.
Prints a markdown table (ms per step and share, both steps side by side) and writes
`profile_step.json` (with each step's top ops) and `profile_step.md` under --out; the raw traces
stay under --trace-dir (open them in Perfetto or XProf).
Trace events name the HLO op: `args.hlo_op` (CPU thunks; GPU kernels), an `hlo_op=` annotation,
or the event name itself (GPU kernels: the instruction's name with '_' for '.'); on a GPU only
device-side events are summed. XLA's command buffers (CUDA graphs) are switched off while
profiling so that every op launches on its own (`--keep-command-buffers` leaves them on).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

CATEGORIES = (
    "attention",  # scores/softmax/values or the attention kernel, RoPE, q/k norms, mask prep
    "matmuls (dense layers)",  # q/k/v/o projections and the SwiGLU MLP
    "LM head + losses",  # lm_head, cross-entropy and the diffusion MSE (the loss function)
    "patch layers",  # patch_in / patch_out projections (or U-Net), timestep embedding
    "image-slot gathers/scatters",  # moving image tokens between slots and the sequence
    "optimizer update",  # AdamW, gradient clipping: everything outside the differentiated fn
    "other",  # embedding lookup, norms, residuals, RNG, copies, scan bookkeeping
)
HEAVY_OPCODES = {"dot", "convolution", "custom-call", "gather", "scatter"}
# Control flow: on a CPU trace their events enclose their bodies' events (counted there).
CONTAINER_OPCODES = {"while", "call", "conditional"}
_TOP = re.compile(r"^jit\([^)]*\)/")  # "jit(train_step)/": the jitted function's own scope


def category(op_name: str) -> str:
    """The category of one metadata op_name (a '/'-separated trace of jax/flax scopes)."""
    s = op_name.lower()
    if not s:
        return "other"
    if "lm_head" in s:
        return "LM head + losses"
    if any(k in s for k in ("patch_in", "patch_out", "time_embed")):
        return "patch layers"
    if "/attn/" in s or s.endswith("/attn"):
        # The projections are einsums against weights (tfx_jax/models/layers.py); the rest of
        # the attention module is the attention itself.
        if "btd,dxh" in s or "btnh,nhd" in s:
            return "matmuls (dense layers)"
        return "attention"
    if "/mlp/" in s or s.endswith("/mlp"):
        return "matmuls (dense layers)"
    if "/embed/" in s:
        return "other"
    if "take_along_axis" in s or "scatter" in s:
        return "image-slot gathers/scatters"
    if any(k in s for k in ("threefry", "_normal", "_uniform", "randint", "random")):
        return "other"
    if re.search(r"^jit\([^)]*\)/(transpose\()?jvp\(\)", s):  # the loss function, unscoped
        return "LM head + losses"
    if _TOP.match(s) and "jvp(" not in s and "transpose(" not in s:
        return "optimizer update"
    return "other"


_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\(.*?\)|\S+)\s+([a-z][\w\-]*)\(")
_CALLS = re.compile(r"\bcalls=([%\w.\-, ]+?)(?:,\s*\w+=|$)")
_OPNAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')


def parse_hlo(hlo_text: str) -> dict[str, dict]:
    """{instruction: {"opcode", "op_name", "calls": [computations], "comp": its computation}}
    for every instruction of every computation (HLO instruction names are unique per module)."""
    out, comp = {}, None
    for line in hlo_text.splitlines():
        if line.startswith("}"):
            comp = None
            continue
        m = _INSTR.match(line)
        if m is None:
            c = _COMP.match(line)
            if c and "=" not in line.split("(")[0]:
                comp = c.group(1)
            continue
        calls = _CALLS.search(line)
        name = _OPNAME.search(line)
        out[m.group(1)] = {
            "opcode": m.group(2),
            "op_name": name.group(1) if name else "",
            "calls": [c.strip().lstrip("%") for c in calls.group(1).split(",")] if calls else [],
            "comp": comp,
        }
    return out


def classify_ops(hlo: dict[str, dict]) -> dict[str, str]:
    """{instruction: category}: heavy instructions decide, else the majority of what it fuses."""
    by_comp = collections.defaultdict(list)
    for ins in hlo.values():
        by_comp[ins["comp"]].append(ins)

    def inner(ins, seen):
        yield ins
        for c in ins["calls"]:
            if c not in seen:
                seen.add(c)
                for sub in by_comp.get(c, ()):
                    yield from inner(sub, seen)

    result = {}
    for name, ins in hlo.items():
        parts = list(inner(ins, set()))
        heavy = [category(p["op_name"]) for p in parts if p["opcode"] in HEAVY_OPCODES]
        votes = heavy or [category(p["op_name"]) for p in parts if p["op_name"]] or ["other"]
        counts = collections.Counter(votes)
        result[name] = max(CATEGORIES, key=lambda k: (counts[k], -CATEGORIES.index(k)))
    return result


def load_trace(logdir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(
            f"no *.trace.json.gz under {logdir}: was the trace perfetto-enabled?"
        )
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def op_times(events: list[dict], known: dict[str, dict]) -> dict[str, float]:
    """Microseconds per HLO instruction. On a GPU only device-side events count, and only the
    "XLA Ops" line when the trace has one (its kernels would count twice otherwise)."""
    names = {
        (e["pid"], e.get("tid")) if e.get("name") == "thread_name" else e["pid"]: e.get(
            "args", {}
        ).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")
    }
    kernel_names = {re.sub(r"[.\-]", "_", k): k for k in known}  # GPU kernels: "loop_fusion_3"

    def hlo_op(e):
        args = e.get("args") or {}
        if args.get("hlo_op"):
            return args["hlo_op"]
        for v in args.values():
            m = re.search(r"hlo_op=([\w.\-]+)", str(v))
            if m:
                return m.group(1)
        name = e.get("name")
        return name if name in known else kernel_names.get(name)

    timed = [(e, hlo_op(e)) for e in events if e.get("ph") == "X" and "dur" in e]
    timed = [(e, op) for e, op in timed if op in known]
    device = [
        (e, op) for e, op in timed if re.search(r"gpu|/device:", names.get(e["pid"], ""), re.I)
    ]
    xla_ops = [(e, op) for e, op in device if names.get((e["pid"], e.get("tid"))) == "XLA Ops"]
    out = collections.defaultdict(float)
    for e, op in xla_ops or device or timed:
        if known[op].get("opcode") in CONTAINER_OPCODES:
            continue
        out[op] += float(e["dur"])
    return dict(out)


def summarize(times_us: dict[str, float], cats: dict[str, str], steps: int) -> dict[str, dict]:
    per = collections.defaultdict(float)
    for op, us in times_us.items():
        per[cats.get(op, "other")] += us
    total = sum(per.values()) or 1.0
    return {c: {"ms": per[c] / steps / 1e3, "share": per[c] / total} for c in CATEGORIES}


def table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per category, ms/step and share for each step kind side by side."""
    kinds = list(results)
    head = "| category | " + " | ".join(f"{k} ms/step | {k} share" for k in kinds) + " |"
    lines = [head, "|---|" + "---|---|" * len(kinds)]
    for c in CATEGORIES:
        cells = " | ".join(
            f"{results[k][c]['ms']:.2f} | {100 * results[k][c]['share']:.1f}%" for k in kinds
        )
        lines.append(f"| {c} | {cells} |")
    tot = " | ".join(f"**{sum(v['ms'] for v in results[k].values()):.2f}** | 100%" for k in kinds)
    lines.append(f"| total (op time) | {tot} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="experiments/transfusion.py:0.16b,synthetic")
    p.add_argument("--batch", type=int, default=8, help="data.global_batch_size")
    p.add_argument("--seq-len", type=int, default=4096, help="data.seq_len")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="after the above")
    p.add_argument("--steps", type=int, default=3, help="traced steps per step kind")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/profile_step"))
    p.add_argument("--trace-dir", default="/tmp/profile_step_traces", help="the raw traces")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds; skip what would not fit")
    p.add_argument(
        "--keep-command-buffers",
        action="store_true",
        help="leave XLA's CUDA graphs on (their ops may then not show one by one)",
    )
    args = p.parse_args()
    t_start = time.perf_counter()
    if not args.keep_command_buffers:  # CUDA graphs would hide the ops inside one launch
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
        )
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import text_only_batch  # noqa: E402  (benchmarks/ is not a package)

    from tfx_jax.config import load_config
    from tfx_jax.data.sources import synthetic
    from tfx_jax.train.loop import Trainer

    sizes = [f"data.seq_len={args.seq_len}", f"data.global_batch_size={args.batch}"]
    cfg = load_config(args.config, sizes + args.overrides)
    os.makedirs(args.out, exist_ok=True)
    trainer = Trainer(cfg)
    compiled = trainer.compile()
    hlo = parse_hlo(compiled.as_text())
    cats = classify_ops(hlo)
    rng = np.random.default_rng(0)
    report = {
        "config": cfg.name,
        "overrides": sizes + args.overrides,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "steps": args.steps,
        "hlo_ops": len(hlo),
        "results": {},
        "wall_ms_per_step": {},
        "unmapped_trace_ops": {},
    }
    kinds = {
        "transfusion": lambda: synthetic.config_batch(cfg, rng),
        "text-only causal": lambda: text_only_batch(cfg, rng),
    }
    per_kind_s = None
    for kind, make in kinds.items():
        elapsed = time.perf_counter() - t_start
        if per_kind_s and elapsed + per_kind_s > args.deadline:
            print(f"deadline: skipping {kind} ({elapsed:.0f} s used of {args.deadline:.0f})")
            break
        t0 = time.perf_counter()
        batch = trainer.put_batch(make())
        for _ in range(args.warmup):
            jax.block_until_ready(trainer.train_step(batch))
        logdir = os.path.join(args.trace_dir, "trace_" + kind.split()[0].replace("-", "_"))
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            t1 = time.perf_counter()
            for _ in range(args.steps):
                metrics = trainer.train_step(batch)
            jax.block_until_ready(metrics)
            report["wall_ms_per_step"][kind] = (time.perf_counter() - t1) / args.steps * 1e3
        times = op_times(load_trace(logdir), hlo)
        report["results"][kind] = summarize(times, cats, args.steps)
        top = sorted(times.items(), key=lambda kv: -kv[1])[:15]
        report.setdefault("top_ops", {})[kind] = [
            {
                "op": op,
                "ms_per_step": us / args.steps / 1e3,
                "category": cats.get(op),
                "op_name": hlo[op]["op_name"],
            }
            for op, us in top
        ]
        per_kind_s = time.perf_counter() - t0
        with open(os.path.join(args.out, "profile_step.json"), "w") as f:
            json.dump(report, f, indent=1)
    md = table(report["results"]) if report["results"] else "(no step traced)"
    walls = ", ".join(f"{k} {v:.1f} ms" for k, v in report["wall_ms_per_step"].items())
    md += f"\n\nWall time per traced step: {walls}. {cfg.name}, {report['device']}, "
    md += f"jax {jax.__version__}, command buffers {'on' if args.keep_command_buffers else 'off'}."
    print(md)
    for kind, rows in report.get("top_ops", {}).items():
        print(f"\nTop ops, {kind}:")
        for r in rows[:8]:
            ms, cat, op = r["ms_per_step"], r["category"], r["op"]
            print(f"  {ms:8.3f} ms  {cat:<28} {op:<24} {r['op_name'][-70:]}")
    with open(os.path.join(args.out, "profile_step.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()

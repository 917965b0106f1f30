"""`python -m tfx_jax dryrun`: compile the real train step for a TPU pod without the hardware.

    python -m tfx_jax dryrun --config experiments/transfusion.py:0.76b --topology v5p-128

What happens (ahead of time, on the CPU machine; needs the optional `libtpu`, `pip install
'tfx_jax[tpu]'`):
  1. the topology name (Cloud TPU naming, `TOPOLOGIES`) becomes abstract TPU devices
     (`jax.experimental.topologies.get_topology_desc`); nothing runs on them;
  2. the config's mesh (data / fsdp / tensor, -1 filled) is built over those devices with
     `sharding.make_mesh`;
  3. the train state's shapes come from `jax.eval_shape` as `ShapeDtypeStruct`s carrying their
     NamedShardings (`loop.abstract_train_state`): init is never run there (a jit onto abstract
     devices compiles and then fails when called);
  4. the Trainer's own jitted step (`loop.jit_train_step`: `steps.make_train_step` + the
     optimizer of `train/optim.py`) is lowered and compiled by libtpu, with
     `model.attention_impl=auto` resolved for TPU, not for the host's CPU;
  5. the report: per-chip memory from `compiled.memory_analysis()` against the chip's HBM (fits
     or not, by how much, and which knob helps), model FLOPs per step from the config
     (`observability.flops`: XLA's cost analysis counts a scanned layer body once), parameters,
     the collectives in the compiled HLO, and the step time expected at a given MFU.

Everything up to the compile (topology names, the mesh check, parameters, FLOPs, step time)
works without libtpu (`plan`); only `compile_step` needs it. Without libtpu the memory verdict
is a lower bound: the train state per chip (params fp32, the optimizer's moments, the step),
sharded as the config's mesh says (`state_bytes_per_chip`), against the chip's HBM; when even
that does not fit, the dry run says so and fails (exit 1).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import runpy
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from tfx_jax import layout, sharding
from tfx_jax.config import Config, ConfigError, resolve_mesh_shape, validate
from tfx_jax.layout import ModelInputs
from tfx_jax.models import attention
from tfx_jax.models.transformer import Transfusion
from tfx_jax.observability import flops
from tfx_jax.sharding import mesh_context
from tfx_jax.train import loop
from tfx_jax.train.optim import learning_rate_schedule, make_optimizer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float  # memory per chip (per JAX device), GiB as the vendor states it
    peak_tflops: float  # dense bf16 TFLOP/s per chip
    platform: str


# Vendor datasheets (cloud.google.com/tpu/docs/v4 | v5e | v5p | v6e; NVIDIA H100 SXM / H200).
# The runtime keeps a little of the HBM for itself, so a program within ~5% of it is marginal.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32, 275, "tpu"),
    "v5e": Chip("TPU v5e", 16, 197, "tpu"),
    "v5p": Chip("TPU v5p", 95, 459, "tpu"),
    "v6e": Chip("TPU v6e", 32, 918, "tpu"),
    "h100": Chip("NVIDIA H100 SXM", 80, 989, "gpu"),
    "h200": Chip("NVIDIA H200 SXM", 141, 989, "gpu"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """One slice: `get_topology_desc(platform="tpu", topology_name=topology,
    chip_config_name=chip_config, chips_per_host_bounds=host_bounds)`."""

    chip: str  # key of CHIPS
    topology: str  # libtpu's topology string, e.g. "v5p:4x4x4"
    host_bounds: tuple[int, int, int]  # chips per host
    chip_config: str = "default"  # v4 needs "megacore": one JAX device per chip, as on a pod

    @property
    def chips(self) -> int:
        return math.prod(int(x) for x in self.topology.split(":")[1].split("x"))


def _table() -> dict[str, Topology]:
    """Cloud TPU slice names. v4-N and v5p-N count TensorCores (2 per chip: v5p-128 = 64 chips,
    4x4x4); v5e-N (v5litepod-N) and v6e-N count chips. Hosts hold 4 chips (2x2x1), except the
    single-host v5e-8 / v6e-8 (8 chips) and the 1-chip slices."""
    out: dict[str, Topology] = {}
    cube = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
            512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}  # fmt: skip
    for cores, shape in cube.items():
        out[f"v5p-{cores}"] = Topology("v5p", f"v5p:{shape}", (2, 2, 1))
        out[f"v4-{cores}"] = Topology("v4", f"v4:{shape}", (2, 2, 1), "megacore")
    plane = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}  # fmt: skip
    for chips, shape in plane.items():
        bounds = {1: (1, 1, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
        for gen in ("v5e", "v6e"):
            out[f"{gen}-{chips}"] = Topology(gen, f"{gen}:{shape}", bounds)
    return out


TOPOLOGIES: dict[str, Topology] = _table()
ALIASES = {"v5litepod-": "v5e-", "v6litepod-": "v6e-"}


def parse_topology(name: str) -> tuple[Topology, int]:
    """'v5p-128' -> (its Topology, 1 slice); '2xv5p-256' -> (v5p-256, 2 slices).

    Raises:
      ConfigError: for an unknown name, listing the supported ones.
    """
    text = name.strip().lower()
    slices = 1
    m = re.fullmatch(r"(\d+)x(.+)", text)
    if m:
        slices, text = int(m.group(1)), m.group(2)
    for alias, canonical in ALIASES.items():
        if text.startswith(alias):
            text = canonical + text[len(alias) :]
    if text not in TOPOLOGIES or slices < 1:
        names = ", ".join(TOPOLOGIES)
        raise ConfigError(
            f"--topology {name!r} is not a known TPU slice; use one of: {names} "
            "(prefix Kx for K slices, e.g. 2xv5p-256; v4/v5p count TensorCores, v5e/v6e chips)."
        )
    return TOPOLOGIES[text], slices


def intended_topology(config_path: str) -> str:
    """The slice an experiment file names for itself: `TOPOLOGIES[arg]` for 'file.py:arg', else
    its module-level `TOPOLOGY`.

    Raises:
      ConfigError: the file names none, or "cpu" (a config meant for one CPU host).
    """
    path, arg = str(config_path), None
    if ":" in Path(path).name:
        path, arg = path.rsplit(":", 1)
    try:
        module = runpy.run_path(path)
    except Exception:  # load_config reports a broken file properly; here just "no default"
        module = {}
    topo = (module.get("TOPOLOGIES") or {}).get(arg) or module.get("TOPOLOGY")
    if not topo or topo == "cpu":
        raise ConfigError(
            f"{config_path} names no TPU topology (TOPOLOGY={topo!r}): give --topology, "
            "e.g. --topology v5p-8."
        )
    return topo


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """What can be said without compiling."""

    name: str
    topology: Topology
    slices: int
    chips: int
    mesh_shape: dict[str, int]
    attention_impl: str  # as resolved for the target platform
    attention_requested: str  # as configured ("auto" or a kernel)
    params: int
    matmul_params: int
    flops_per_step: float
    peak_flops_per_chip: float
    mfu: float
    # The train state on one chip from the shapes and the mesh alone (`state_bytes_per_chip`):
    # a lower bound of the compiled step's peak; 0 = not computed (`run` computes it without
    # libtpu, where there is no compiled peak).
    state_bytes: int = 0

    @property
    def chip(self) -> Chip:
        return CHIPS[self.topology.chip]

    @property
    def step_seconds(self) -> float:
        return self.flops_per_step / (self.chips * self.peak_flops_per_chip * self.mfu)


def target_config(cfg: Config, platform: str) -> Config:
    """The config with `model.attention_impl=auto` resolved for `platform` (not the host's)."""
    if cfg.model.attention_impl != "auto":
        return cfg
    impl = attention.resolve_auto(platform)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=impl))


def count_params(cfg: Config) -> int:
    """Parameters of the model, from `jax.eval_shape` (nothing is allocated)."""
    model = Transfusion(dataclasses.replace(cfg.model, attention_impl="xla"))
    abstract = jax.eval_shape(
        lambda r: model.init(r, ModelInputs.dummy(cfg))["params"], jax.random.key(0)
    )
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(abstract))))


def state_bytes_per_chip(cfg: Config, mesh_shape: dict[str, int]) -> int:
    """Bytes of the train state on one chip: the params (fp32), the optimizer's state (AdamW's
    two moments, its counters), the step and the skipped-update count, each array split over
    the mesh axes its logical axes map to (`cfg.mesh.rules`) in a mesh of `mesh_shape`. No
    devices, nothing allocated
    (`jax.eval_shape`): a lower bound of the step's peak, which adds gradients, activations and
    the compiler's temporaries."""
    model = Transfusion(dataclasses.replace(cfg.model, attention_impl="xla"))
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)

    def init(rng):
        params = model.init(rng, ModelInputs.dummy(cfg))["params"]
        counter = jax.numpy.zeros((), jax.numpy.int32)  # the step, the skipped updates
        return params, tx.init(params), counter, counter

    with nn.logical_axis_rules(cfg.mesh.rules):
        abstract = jax.eval_shape(init, jax.random.key(0))
        specs = nn.logical_to_mesh(nn.get_partition_spec(abstract))
    arrays = jax.tree.leaves(nn.meta.unbox(abstract))
    is_spec = lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)
    total = 0
    for x, spec in zip(arrays, jax.tree.leaves(specs, is_leaf=is_spec), strict=True):
        shape = list(x.shape)
        for i, axes in enumerate(spec or ()):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            shape[i] = -(-shape[i] // math.prod(mesh_shape.get(a, 1) for a in axes))
        total += math.prod(shape) * x.dtype.itemsize
    return total


def plan(cfg: Config, topology: str, mfu: float = 0.4) -> Plan:
    """The config checked against the topology, and the analytic numbers (no libtpu needed).

    Raises:
      ConfigError: unknown topology, an MFU outside (0, 1], or a config that cannot run on the
        topology's chip count (mesh, batch divisibility, ...), with the key and the fix.
    """
    topo, slices = parse_topology(topology)
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: give a fraction in (0, 1], e.g. 0.4.")
    chip = CHIPS[topo.chip]
    chips = topo.chips * slices
    requested = cfg.model.attention_impl
    cfg = target_config(cfg, chip.platform)
    validate(cfg, num_devices=chips)
    shape = resolve_mesh_shape(cfg.mesh, chips)
    return Plan(
        name=topology,
        topology=topo,
        slices=slices,
        chips=chips,
        mesh_shape=dict(zip(cfg.mesh.axis_names, shape, strict=True)),
        attention_impl=cfg.model.attention_impl,
        attention_requested=requested,
        params=count_params(cfg),
        matmul_params=sum(flops.matmul_params(cfg.model).values()),
        flops_per_step=flops.train_flops_per_step(cfg),
        peak_flops_per_chip=chip.peak_tflops * 1e12,
        mfu=mfu,
    )


# ----------------------------------------------------------------------------- the compile


@dataclasses.dataclass
class Compiled:
    """Per-device figures of the compiled step; when the compiler itself refused for lack of
    HBM (`oom`), only what its message says (the temporaries it needed) and the state."""

    seconds: float
    device_kind: str
    state_bytes: int  # the sharded train state on one device, from the shardings
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)
    oom: str = ""  # the compiler's out-of-memory message
    hlo: str = dataclasses.field(default="", repr=False)  # the compiled module's text
    hbm_available_bytes: int = 0  # as the compiler states it (only with `oom`)

    @property
    def total_bytes(self) -> int:
        """Peak per device: arguments + outputs not aliased to them (donated state) + temps.
        After an out-of-memory refusal: the state + the temporaries the compiler needed."""
        if self.oom:
            return self.state_bytes + self.temp_bytes
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> tuple[int, int]:
    """(bytes needed for temporaries, HBM available) from libtpu's CompileTimeHbmOom message:
    '... HLO temporaries (229.29G) exceeds available HBM (95.73G) ...'; 0 where not stated."""
    found = re.findall(r"\(([\d.]+)([KMGT])i?B?\)", message)
    sizes = [int(float(v) * _UNITS[u]) for v, u in found]
    return (sizes + [0, 0])[0], (sizes + [0, 0])[1]


def sharded_bytes(tree: Any) -> int:
    """Bytes on one device of a tree of `ShapeDtypeStruct`s carrying NamedShardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topo: Topology, slices: int = 1) -> list[Any]:
    """The abstract TPU devices of `slices` slices of `topo` (libtpu, no hardware)."""
    if not libtpu_available():
        raise ConfigError(
            "dryrun compiles with libtpu, which is not installed: pip install 'tfx_jax[tpu]' "
            "(or 'jax[tpu]' at the installed jax version)."
        )
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.topology,
        chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.host_bounds,
        num_slices=slices,
    )
    return list(desc.devices)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
# TPU fusions that are a collective: `fusion(...), kind=kCustom, calls=%all-reduce-scatter.3`.
_FUSED = re.compile(r"\bcalls=%(" + "|".join(("all-reduce-scatter", *COLLECTIVES)) + r")[.,\s]")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions in a compiled HLO module's text, by kind.

    An async pair counts once (its `-start`); a collective fusion (TPU's all-reduce-scatter:
    an all-reduce + dynamic-slice fused into one reduce-scatter) counts as one of its kind, and
    the instructions inside fused computations are not counted again. Each op of a loop body
    (the scanned layers, micro-batches) counts once, not once per iteration.
    """
    counts = dict.fromkeys(COLLECTIVES, 0)
    fused_names = set(re.findall(r"\bcalls=%([\w.-]+)", hlo_text))
    inside_fusion = False
    for line in hlo_text.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.-]+) \(", line)
        if header and line.rstrip().endswith("{"):
            inside_fusion = header.group(1) in fused_names
            continue
        if inside_fusion:
            continue
        m = _OP.search(line)
        if m:
            counts[m.group(1)] += 1
        m = _FUSED.search(line)
        if m:
            kind = m.group(1)
            counts["reduce-scatter" if kind == "all-reduce-scatter" else kind] += 1
    return counts


def compile_step(cfg: Config, devices: list[Any]) -> Compiled:
    """Lowers and compiles the Trainer's train step on `devices` (abstract ones are fine)."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    model = Transfusion(cfg.model)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    lr_fn = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    rng = jax.eval_shape(jax.random.key, 0)
    state, shardings = loop.abstract_train_state(cfg, mesh, model, tx, rng)
    step = loop.jit_train_step(cfg, mesh, model, tx, lr_fn, shardings)
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding.replicated(mesh))
    t0 = time.time()
    kind = devices[0].device_kind
    with mesh_context(mesh, cfg), attention.target_platform(devices[0].platform):
        lowered = step.lower(state, layout.batch_spec(cfg), rng)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            message = str(e).split("\n")[0]
            temp, available = parse_oom(message)
            return Compiled(
                seconds=time.time() - t0,
                device_kind=kind,
                state_bytes=sharded_bytes(state),
                temp_bytes=temp,
                oom=message,
                hbm_available_bytes=available,
            )
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    return Compiled(
        seconds=time.time() - t0,
        device_kind=kind,
        state_bytes=sharded_bytes(state),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        collectives=count_collectives(hlo),
        hlo=hlo,
    )


# ----------------------------------------------------------------------------- the report


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _si(x: float, unit: str) -> str:
    for scale, prefix in (
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _time(s: float) -> str:
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def advice(cfg: Config, p: Plan, c: Compiled) -> str:
    """One line: the knobs most likely to bring the step under the chip's memory."""
    fsdp = p.mesh_shape.get("fsdp", 1)
    if c.state_bytes > 0.5 * p.chip.hbm_gib * GiB:
        return (
            f"the train state alone is {_gib(c.state_bytes)} per chip: shard it over more chips "
            f"(a larger mesh.fsdp, {fsdp} now, or a larger topology) or set mesh.tensor"
        )
    knobs = []
    if fsdp < p.chips:
        knobs.append(f"a larger mesh.fsdp ({fsdp} now)")
    if cfg.model.remat_policy != "full":
        knobs.append(f"model.remat_policy=full ({cfg.model.remat_policy} now)")
    # Temporaries scale roughly with the micro-batch: split it by the factor they are over.
    room = 0.9 * p.chip.hbm_gib * GiB - c.state_bytes
    over = c.temp_bytes / room if room > 0 else math.inf
    accum = cfg.optimizer.grad_accum_steps * 2 ** max(1, math.ceil(math.log2(max(over, 1.0))))
    rows = p.mesh_shape.get("data", 1) * fsdp
    if cfg.data.global_batch_size % (accum * rows) == 0:
        knobs.append(f"optimizer.grad_accum_steps={accum} (temporaries are {over:.1f}x the room)")
    else:
        knobs.append("a larger topology (the micro-batch cannot be split further)")
    return f"activations dominate ({_gib(c.temp_bytes)} temporaries): " + ", or ".join(knobs)


def report(cfg: Config, p: Plan, c: Compiled | None, skipped: str = "") -> str:
    """The dry run as a few lines of text (`cfg` with `auto` already resolved)."""
    chip, m = p.chip, cfg.model
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh_shape.items())
    slices = f"{p.slices} slices of " if p.slices > 1 else ""
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    attn = p.attention_impl
    if p.attention_requested != attn:
        attn += f" ({p.attention_requested})"
    lines = [
        f"dry run: {cfg.name} on {p.name} = {slices}{p.topology.topology}: {p.chips} x "
        f"{chip.name} ({chip.hbm_gib:g} GiB HBM, {chip.peak_tflops:g} TFLOP/s bf16 each)",
        f"  mesh {mesh}; attention {attn}; remat {m.remat_policy}; batch "
        f"{cfg.data.global_batch_size} x {cfg.data.seq_len} tokens; grad accum "
        f"{cfg.optimizer.grad_accum_steps}",
        f"  parameters {p.params / 1e6:,.1f}M ({p.matmul_params / 1e6:,.1f}M in matmuls)",
        f"  model FLOPs per step {_si(p.flops_per_step, 'FLOP')} "
        f"({_si(p.flops_per_step / tokens, 'FLOP')}/token, causal attention, from the config)",
        f"  step time at {p.mfu:.0%} MFU: {_time(p.step_seconds)} "
        f"({_si(tokens / p.step_seconds, 'tokens/s')}, "
        f"{_si(tokens / p.step_seconds / p.chips, 'tokens/s')} per chip)",
    ]
    if c is None:
        lines.append(f"  not compiled: {skipped}")
        if p.state_bytes:
            lines.append("  " + lower_bound_verdict(p))
        return "\n".join(lines)
    hbm = chip.hbm_gib * GiB
    total = c.total_bytes
    if c.oom:
        lines += [
            f"  the compiler for {c.device_kind} refused after {c.seconds:.1f} s: {c.oom}",
            f"  memory per chip: train state {_gib(c.state_bytes)}, temporaries "
            f"{_gib(c.temp_bytes)} (the compiler's count) of {_gib(c.hbm_available_bytes)} "
            f"available: does NOT fit, {_gib(total - hbm)} over {chip.hbm_gib:g} GiB "
            f"({total / hbm:.0%})",
            "  to fit: " + advice(cfg, p, c),
        ]
        return "\n".join(lines)
    verdict = (
        f"fits, {_gib(hbm - total)} to spare ({total / hbm:.0%} of HBM)"
        if total <= hbm
        else f"does NOT fit, {_gib(total - hbm)} over ({total / hbm:.0%} of HBM)"
    )
    lines += [
        f"  compiled for {c.device_kind} in {c.seconds:.1f} s",
        f"  memory per chip: arguments {_gib(c.argument_bytes)} (train state "
        f"{_gib(c.state_bytes)}), temporaries {_gib(c.temp_bytes)}, outputs "
        f"{_gib(c.output_bytes)} ({_gib(c.alias_bytes)} aliased to the donated state)",
        f"  total {_gib(total)} of {chip.hbm_gib:g} GiB: {verdict}",
    ]
    if total > hbm:
        lines.append("  to fit: " + advice(cfg, p, c))
    elif total > 0.95 * hbm:
        lines.append("  marginal (within 5% of HBM): " + advice(cfg, p, c))
    colls = ", ".join(f"{k} {v}" for k, v in c.collectives.items())
    lines.append(f"  collectives in the compiled HLO (a scanned layer body counts once): {colls}")
    return "\n".join(lines)


def lower_bound_verdict(p: Plan) -> str:
    """One line: the train state per chip (`Plan.state_bytes`) against the chip's HBM."""
    chip, hbm = p.chip, p.chip.hbm_gib * GiB
    bound = (
        f"lower bound: {_gib(p.state_bytes)} of state per chip (params fp32 + optimizer moments)"
    )
    unknown = "without libtpu the compiled peak is not known"
    if p.state_bytes > hbm:
        return (
            f"{bound} > {chip.hbm_gib:g} GiB HBM on {p.topology.chip}: does NOT fit; {unknown} "
            "(shard the state over more chips: a larger mesh.fsdp or topology)"
        )
    return (
        f"{bound} <= {chip.hbm_gib:g} GiB HBM on {p.topology.chip} ({p.state_bytes / hbm:.0%}); "
        f"{unknown} (gradients, activations and temporaries come on top)"
    )


def fits(p: Plan, c: Compiled | None) -> bool | None:
    """Whether the compiled step fits the chip's HBM. Not compiled: False when even the train
    state (`Plan.state_bytes`, if computed) exceeds it, else None (not known)."""
    if c is None:
        return False if p.state_bytes > p.chip.hbm_gib * GiB else None
    return not c.oom and c.total_bytes <= p.chip.hbm_gib * GiB


def run(cfg: Config, topology: str, mfu: float = 0.4) -> tuple[str, Plan, Compiled | None]:
    """The whole dry run; returns (report text, plan, compiled or None without libtpu).

    Without libtpu the analytic part is reported and the compile is skipped, with the reason,
    and the memory verdict is the lower bound (`lower_bound_verdict`; `fits` is False when even
    that exceeds the chip's HBM).
    """
    p = plan(cfg, topology, mfu)
    cfg = target_config(cfg, p.chip.platform)
    if not libtpu_available():
        why = "libtpu is not installed (pip install 'tfx_jax[tpu]')"
        p = dataclasses.replace(p, state_bytes=state_bytes_per_chip(cfg, p.mesh_shape))
        return report(cfg, p, None, why), p, None
    devices = topology_devices(p.topology, p.slices)
    c = compile_step(cfg, devices)
    return report(cfg, p, c), p, c

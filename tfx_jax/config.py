"""Typed configuration: nested frozen dataclasses, dotted overrides, validation before compile.

A run is described by one `Config`. Experiment files in `experiments/` define
`get_config(arg: str | None) -> Config`; the CLI applies repeatable `--set key.path=value`
overrides and then `validate()` checks everything that can be checked without compiling: unknown
keys (with the closest valid key), wrong types, and impossible combinations (heads not dividing the
width, a mesh that does not match the device count, a batch the data-parallel axes cannot split,
a patch grid that does not tile the latent).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfx_jax.data.checks import validate_data
from tfx_jax.data.config import DataConfig, DataConfigError, explicit_value_error
from tfx_jax.diffusion import modes
from tfx_jax.models.config import ModelConfig, ModelConfigError, validate_model

# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """DDPM on image latents (Ho et al. 2020) with the cosine schedule (Nichol & Dhariwal 2021)."""

    num_timesteps: int = 1000
    schedule: str = "cosine"  # "cosine" or "linear"
    loss_weight: float = 5.0  # λ in L = L_LM + λ·L_DDPM (Transfusion §3.3: λ = 5)
    # Classifier-free guidance (Ho & Salimans 2022): the data pipeline drops a caption example's
    # caption with this probability (BOS, image block, EOS), so the model learns ε(x_t | ∅).
    p_uncond: float = 0.1
    # Transfusion §4.3: images that precede their caption train with t <= 500 of 1000.
    noise_limit_image_first: bool = False
    # "standard" (one t per image) or "rolling": rolling diffusion over patch rows (Ruhe et al.
    # 2024; tfx_jax.diffusion.rolling), each row at its own level inside a window of
    # `rolling_window` rows.
    mode: str = "standard"
    rolling_window: int = 4
    # Share of images trained on the init (first-window) schedule; -1 = W / (W + rows - 1), the
    # init pass's share of the sampler's model calls (tfx_jax.diffusion.rolling; issue 15: 0.1
    # left the top rows of rolling samples wrong).
    rolling_init_prob: float = -1.0
    # Local time τ_ctx in [0, 0.5] of the finished rows above the window, in training and in the
    # sampler's KV cache (noise augmentation against exposure bias, issue 15: with clean context
    # and a 2-row window, 8-row images had 57% of bottom-row objects right, with 0.1 92%; with
    # the 4-row window both were within noise of each other). 0 = clean context.
    rolling_context_noise: float = 0.1
    # The first window's local schedule (Ruhe et al. §3.3; tfx_jax.diffusion.rolling):
    # "staircase" clip(w/W + t), or "joint" t + (1 - t)·w/W (every row leaves noise at once).
    rolling_init_schedule: str = "staircase"
    # An image's window loss over "window" (the mean over its window's patches) or "full" (a
    # full window's patches, so a window hanging past the last row does not up-weight its rows).
    rolling_loss_norm: str = "window"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The frozen image autoencoder (trained by `python -m tfx_jax vae`)."""

    downsample: int = 4  # 4 or 8; latent side = data.image_size / downsample = model.latent_size
    channels: tuple[int, ...] = (32, 64, 128)
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    log_every: int = 50  # train metrics, held-out PSNR and a reconstruction grid every N steps
    checkpoint_every: int = 500  # Orbax save of the VAE state; also at the end and on SIGTERM


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay (Transfusion §4.1 recipe)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 4000
    decay_steps: int = 0  # 0 = train.steps
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum_steps: int = 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data x fsdp x tensor; -1 fills) and the logical-name -> mesh-axis rules."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # The ONLY place logical axis names meet mesh axes. Parameters use the short names,
    # activations the `act_*` names, so the batch axis and the fsdp-sharded weight axis never
    # collide on one tensor.
    rules: tuple[tuple[str, Any], ...] = (
        ("act_batch", ("data", "fsdp")),
        ("act_length", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("patch", None),
        ("layers", None),
        ("conv_in", None),
        ("conv_out", None),
        ("norm", None),
    )

    @property
    def axis_names(self) -> tuple[str, ...]:
        return ("data", "fsdp", "tensor")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000  # also saved at the last step and on SIGTERM
    keep: int = 3  # the newest N are kept ...
    keep_every: int = 0  # ... plus every K-th step forever (0 = none)
    async_save: bool = True
    # The run's own checkpoints made with other settings (train/skeleton.py, both trainers):
    # "refuse" names the differing keys; "restart" moves them to checkpoints.stale/, fresh start.
    on_config_mismatch: str = "refuse"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000
    seed: int = 0
    log_every: int = 10
    z_loss: float = 0.0  # PaLM z-loss coefficient on log Z of the LM softmax (0 = off)
    # False: no LM loss for predicting text that precedes an image in its document (a caption
    # before its image); captions are then learned only after their images. BOI keeps its loss.
    lm_loss_before_images: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look up the device kind
    eval_every: int = 0  # evaluate on the held-out split every N steps (0 = never)
    eval_batches: int = 4
    eval_samples: int = 0  # images drawn for held-out captions at each eval (needs a VAE)
    nan_policy: str = "skip"  # non-finite loss: "skip" the update (counted) or "stop"
    strict_eval: bool = False  # a failing evaluator stops the run (default: one line, counted)
    profile_start: int = 0  # JAX profiler trace for steps [start, start + profile_steps)
    profile_steps: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "unnamed"
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    vae: VAEConfig = VAEConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    train: TrainConfig = TrainConfig()

    @property
    def max_images_per_row(self) -> int:
        return self.data.max_images_per_row or self.data.seq_len // (self.model.num_patches + 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class ConfigError(ValueError):
    """A config that cannot run. The message names the key, the value, and what to do."""


# ----------------------------------------------------------------------------- overrides


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _closest(name: str, options: Sequence[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    if match:
        return f" Did you mean '{prefix}{match[0]}'?"
    return f" Valid keys: {', '.join(prefix + o for o in options)}."


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _parse_value(key: str, raw: str, typ: Any) -> Any:
    """Parses a string from the command line as the field's declared type."""
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        elif typ is int:
            return int(raw)
        elif typ is float:
            return float(raw)
        elif typ is str:
            return raw
        elif typing.get_origin(typ) is tuple:
            text = raw.strip()
            if text.startswith(("[", "(")):
                items = json.loads(text.replace("(", "[").replace(")", "]"))
            else:
                items = [s.strip() for s in text.split(",") if s.strip()]
            args = typing.get_args(typ)
            if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str, bool):
                return tuple(_parse_value(key, str(v), args[0]) for v in items)
            return _to_tuple(items)
    except (ValueError, json.JSONDecodeError):
        pass
    raise ConfigError(f"{key}={raw!r}: expected a value of type {getattr(typ, '__name__', typ)}.")


def _check_type(key: str, value: Any, typ: Any) -> None:
    origin = typing.get_origin(typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if origin is tuple:
        ok = isinstance(value, tuple)
    elif dataclasses.is_dataclass(typ):
        ok = isinstance(value, typ)
    elif typ is Any:
        ok = True
    else:
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"{key}={value!r}: expected {getattr(typ, '__name__', typ)}, "
            f"got {type(value).__name__}."
        )


def replace_path(cfg: Any, key: str, value: Any, _prefix: str = "") -> Any:
    """Returns `cfg` with the dotted `key` set to `value` (a string is parsed as the field type).

    Raises:
      ConfigError: unknown key (naming the closest valid one) or a value of the wrong type.
    """
    head, _, rest = key.partition(".")
    full = f"{_prefix}{head}"
    types = _field_types(type(cfg))
    if head not in types:
        raise ConfigError(f"Unknown config key '{full}'.{_closest(head, list(types), _prefix)}")
    typ = types[head]
    if rest:
        if not dataclasses.is_dataclass(typ):
            raise ConfigError(f"Config key '{full}' is a {typ.__name__}, it has no '{rest}'.")
        new = replace_path(getattr(cfg, head), rest, value, _prefix=full + ".")
    elif dataclasses.is_dataclass(typ):
        raise ConfigError(
            f"Config key '{full}' is a section; set one of its fields ({full}.x=...)."
        )
    else:
        new = _parse_value(full, value, typ) if isinstance(value, str) else value
        _check_type(full, new, typ)
    return dataclasses.replace(cfg, **{head: new})


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Applies `key.path=value` strings in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key.path=value.")
        key, value = item.split("=", 1)
        cfg = replace_path(cfg, key.strip(), value.strip())
        section, _, field = key.strip().partition(".")
        if section == "data" and (problem := explicit_value_error(field, getattr(cfg.data, field))):
            raise ConfigError(problem)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Loads `get_config(arg)` from a Python file; `path:arg` passes `arg` (big_vision style)."""
    path = str(path)
    arg = None
    if ":" in Path(path).name:
        path, arg = path.rsplit(":", 1)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"Config file '{file}' does not exist (see experiments/ for examples).")
    spec = importlib.util.spec_from_file_location(f"tfx_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"Config file '{file}' line {e.lineno}: syntax error: {e.msg}.") from e
    except Exception as e:  # an import or a name inside the user's file: say which and where
        raise ConfigError(
            f"Config file '{file}' failed to load: {type(e).__name__}: {e}{_user_line(e, file)}."
        ) from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file '{file}' must define get_config(arg=None) -> Config.")
    params = inspect.signature(module.get_config).parameters
    if arg is not None and not params:
        raise ConfigError(
            f"Config file '{file}' was given ':{arg}' but its get_config() takes no argument: "
            f"drop ':{arg}' or add a parameter (get_config(arg=None))."
        )
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"get_config({'' if arg is None else repr(arg)}) in '{file}' raised "
            f"{type(e).__name__}: {e}{_user_line(e, file)}."
        ) from e
    if not isinstance(cfg, Config):
        raise ConfigError(f"get_config() in '{file}' returned {type(cfg).__name__}, not Config.")
    return apply_overrides(cfg, overrides)


def _user_line(error: BaseException, file: Path) -> str:
    """' (line N)' of the innermost frame of `error` inside `file`, if any."""
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == file.resolve():
            line = frame.lineno
    return f" (line {line})" if line else ""


def from_dict(d: dict[str, Any], cls: type = Config, _prefix: str = "") -> Any:
    """Rebuilds a config from `to_dict()` output (e.g. a checkpoint's saved config)."""
    types = _field_types(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in types:
            raise ConfigError(
                f"Unknown config key '{_prefix}{key}'.{_closest(key, list(types), _prefix)}"
            )
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            value = from_dict(value, typ, _prefix=f"{_prefix}{key}.")
        elif typing.get_origin(typ) is tuple:
            value = _to_tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------- validation


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Fills the one -1 in the mesh shape so the product equals `num_devices`."""
    shape = list(mesh.shape)
    names = mesh.axis_names
    for name, size in zip(names, shape, strict=True):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size}: sizes must be positive or -1 (fill).")
    if shape.count(-1) > 1:
        raise ConfigError(
            f"mesh={dict(zip(names, shape, strict=True))}: at most one axis may be -1."
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"mesh={dict(zip(names, shape, strict=True))}: the fixed axes ({known}) do not "
                f"divide the {num_devices} devices."
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh={dict(zip(names, shape, strict=True))} has {math.prod(shape)} devices but "
            f"{num_devices} are available: make the product {num_devices} or set one axis to -1."
        )
    return tuple(shape)


def validate(cfg: Config, num_devices: int | None = None) -> None:
    """Raises ConfigError for any combination that cannot run. Cheap: no compilation."""
    m, d, o = cfg.model, cfg.data, cfg.optimizer

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    try:
        validate_model(m)  # the model section: sizes, dtypes, kernels, remat policy
    except ModelConfigError as e:
        raise ConfigError(str(e)) from None
    dc = cfg.diffusion
    need(dc.schedule in ("cosine", "linear"), f"diffusion.schedule={dc.schedule!r}: cosine|linear.")
    need(dc.num_timesteps > 1, f"diffusion.num_timesteps={dc.num_timesteps} must be > 1.")
    need(dc.loss_weight >= 0, f"diffusion.loss_weight={dc.loss_weight} must be >= 0.")
    need(0.0 <= dc.p_uncond <= 1.0, f"diffusion.p_uncond={dc.p_uncond} must be in [0, 1].")
    need(dc.mode in modes.MODES, f"diffusion.mode={dc.mode!r}: {' | '.join(modes.MODES)}.")
    problem = modes.of(dc.mode).check(dc, m)  # the mode's own settings against the model
    need(problem is None, problem or "")
    need(
        0.0 <= dc.rolling_context_noise <= 0.5,
        f"diffusion.rolling_context_noise={dc.rolling_context_noise} must be in [0, 0.5] "
        "(the local time of the rolling window's context rows; 0 = clean context).",
    )
    try:
        validate_data(cfg)  # the data section, and the source's own checks
    except DataConfigError as e:
        raise ConfigError(str(e)) from None
    v = cfg.vae
    need(v.steps > 0, f"vae.steps={v.steps} must be > 0.")
    need(v.batch_size > 0, f"vae.batch_size={v.batch_size} must be > 0.")
    need(v.log_every > 0, f"vae.log_every={v.log_every} must be > 0.")
    need(v.checkpoint_every > 0, f"vae.checkpoint_every={v.checkpoint_every} must be > 0.")
    need(o.grad_accum_steps >= 1, f"optimizer.grad_accum_steps={o.grad_accum_steps} must be >= 1.")
    need(
        d.global_batch_size % o.grad_accum_steps == 0,
        f"data.global_batch_size={d.global_batch_size} is not divisible by "
        f"optimizer.grad_accum_steps={o.grad_accum_steps}.",
    )
    need(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must be >= 0.")
    need(o.learning_rate > 0, f"optimizer.learning_rate={o.learning_rate} must be > 0.")
    need(o.decay_steps >= 0, f"optimizer.decay_steps={o.decay_steps} must be >= 0 (0 = steps).")
    need(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1].")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1={o.b1}, b2={o.b2} must be in [0, 1).")
    need(o.eps > 0, f"optimizer.eps={o.eps} must be > 0.")
    need(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0.")
    need(o.grad_clip >= 0, f"optimizer.grad_clip={o.grad_clip} must be >= 0 (0 = off).")
    tr = cfg.train
    need(tr.steps > 0, f"train.steps={tr.steps} must be > 0.")
    need(tr.log_every > 0, f"train.log_every={tr.log_every} must be > 0.")
    need(tr.eval_every >= 0, f"train.eval_every={tr.eval_every} must be >= 0 (0 = never).")
    need(
        tr.eval_batches > 0 or not tr.eval_every,
        f"train.eval_batches={tr.eval_batches} must be > 0 when train.eval_every is set "
        "(or set train.eval_every=0 to skip evaluation).",
    )
    need(tr.eval_samples >= 0, f"train.eval_samples={tr.eval_samples} must be >= 0.")
    need(tr.z_loss >= 0, f"train.z_loss={tr.z_loss} must be >= 0.")
    need(tr.peak_tflops >= 0, f"train.peak_tflops={tr.peak_tflops} must be >= 0 (0 = lookup).")
    need(
        tr.profile_start >= 0 and tr.profile_steps >= 0,
        "train.profile_start and train.profile_steps must be >= 0.",
    )
    need(
        cfg.train.nan_policy in ("skip", "stop"),
        f"train.nan_policy={cfg.train.nan_policy!r}: skip | stop.",
    )
    need(cfg.checkpoint.every_steps > 0, "checkpoint.every_steps must be > 0.")
    need(cfg.checkpoint.keep > 0, "checkpoint.keep must be > 0.")
    need(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every must be >= 0 (0 = none).")
    need(
        cfg.checkpoint.on_config_mismatch in ("refuse", "restart"),
        f"checkpoint.on_config_mismatch={cfg.checkpoint.on_config_mismatch!r}: refuse | restart.",
    )
    if num_devices is not None:
        data, fsdp, tensor = resolve_mesh_shape(cfg.mesh, num_devices)
        micro = d.global_batch_size // o.grad_accum_steps
        need(
            micro % (data * fsdp) == 0,
            f"data.global_batch_size={d.global_batch_size} (micro-batch {micro} with "
            f"grad_accum_steps={o.grad_accum_steps}) is not divisible by the batch-parallel size "
            f"mesh.data*mesh.fsdp={data * fsdp}.",
        )
        need(
            m.n_heads % tensor == 0 and m.kv_heads % tensor == 0,
            f"mesh.tensor={tensor} must divide model.n_heads={m.n_heads} and the kv heads "
            f"({m.kv_heads}).",
        )
        need(
            m.hidden_dim % tensor == 0 and m.vocab_size % tensor == 0,
            f"mesh.tensor={tensor} must divide the MLP width ({m.hidden_dim}) and "
            f"model.vocab_size={m.vocab_size}.",
        )
        need(
            m.d_model % fsdp == 0,
            f"mesh.fsdp={fsdp} must divide model.d_model={m.d_model} (weights are sharded on it).",
        )

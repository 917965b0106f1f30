"""Generation options, defined once: the API's defaults, the CLI's flags and its help text.

`SampleOptions` is what `generate` takes; `add_arguments` builds `python -m tfx_jax generate`'s
flags from its fields (same names, types, defaults; the help shows every default) and
`from_args` reads them back. `resolved(cfg)` fills the choices that depend on the model: the
number of reverse steps (DDPM: the paper's 250; DDIM: 50), the image mode (as the model was
trained: rolling diffusion for `diffusion.mode=rolling`) and the rolling window.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from tfx_jax.config import Config, ConfigError
from tfx_jax.diffusion import modes, samplers

IMAGE_MODES = ("auto", "full", "rolling")
DEFAULT_CLIP_X0 = 6.0  # latents are scaled to unit variance; the demo data's max |z| is 6.75


def _opt(default: Any, help: str, flag: str = "", choices: tuple = ()) -> Any:
    return dataclasses.field(
        default=default, metadata={"help": help, "flag": flag, "choices": choices}
    )


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Decoding and diffusion choices for `generate` (and the `generate` command's flags)."""

    max_new_tokens: int = _opt(64, "text tokens to sample per prompt (BOI and EOS count)")
    max_images: int = _opt(1, "images a prompt may generate (BOI is banned afterwards)")
    temperature: float = _opt(0.0, "text sampling temperature; 0 = greedy")
    top_k: int = _opt(0, "sample among the k most likely tokens; 0 = all")
    top_p: float = _opt(1.0, "nucleus sampling: the smallest set of tokens with mass p")
    sampler: str = _opt(
        "ddim", "ddpm (ancestral) or ddim (deterministic)", choices=samplers.SAMPLERS
    )
    diffusion_steps: int = _opt(
        0,
        "reverse diffusion steps; 0 = the sampler's default (ddpm: 250, as in the paper; "
        "ddim: 50). Rolling mode: steps a row spends in the window",
    )
    guidance_scale: float | None = _opt(
        3.0,
        "classifier-free guidance scale s (eps = eps_u + s (eps_c - eps_u)); 'none' = no "
        "unconditional pass",
        flag="--guidance",
    )
    text_guidance: float = _opt(
        1.0,
        "guidance of text by the prompt's images (captioning): logits = l_u + s (l_c - l_u), "
        "l_u from the prompt without its images (CFG for text, Sanchez et al. 2023); 1 = off; "
        "needs max_images=0",
    )
    image_mode: str = _opt(
        "auto",
        "auto = as the model was trained (rolling for diffusion.mode=rolling), full, or rolling "
        "(rows streamed top to bottom)",
        choices=IMAGE_MODES,
    )
    rolling_window: int = _opt(0, "rows in the rolling window; 0 = diffusion.rolling_window")
    clip_x0: float = _opt(
        DEFAULT_CLIP_X0,
        "clip the predicted clean latent to +-this at every step (samplers.clip_eps); 0 = off",
    )
    seed: int = _opt(0, "all randomness derives from it")

    @property
    def guided(self) -> bool:
        """Images are drawn with classifier-free guidance (unconditional twin rows)."""
        return self.guidance_scale is not None

    @property
    def text_guided(self) -> bool:
        """Text is guided by the prompt's images (image-free twin rows)."""
        return self.text_guidance != 1.0

    @property
    def twins(self) -> bool:
        """The cache holds a twin row per prompt (for one guidance or the other)."""
        return self.guided or self.text_guided

    def validate(self) -> None:
        """Raises ConfigError naming the option, the value and the valid range."""
        checks = (
            (self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0"),
            (self.max_images >= 0, "max_images", "must be >= 0"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = all tokens)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.sampler in samplers.SAMPLERS, "sampler", f"use one of {samplers.SAMPLERS}"),
            (self.diffusion_steps >= 0, "diffusion_steps", "must be >= 0 (0 = default)"),
            (
                self.guidance_scale is None or self.guidance_scale >= 0,
                "guidance_scale",
                "must be >= 0 or none",
            ),
            (self.text_guidance >= 0, "text_guidance", "must be >= 0 (1 = off)"),
            (
                not self.text_guided or self.max_images == 0,
                "text_guidance",
                "needs max_images=0 (the twin rows guide either text or images, not both)",
            ),
            (self.image_mode in IMAGE_MODES, "image_mode", f"use one of {IMAGE_MODES}"),
            (self.rolling_window >= 0, "rolling_window", "must be >= 0 (0 = the config's)"),
            (self.clip_x0 >= 0, "clip_x0", "must be >= 0 (0 = off)"),
        )
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"generate option {name}={getattr(self, name)!r}: {why}.")

    def resolved(self, cfg: Config) -> SampleOptions:
        """The options with every model-dependent default filled in, validated for `cfg`."""
        self.validate()
        mode = self.image_mode
        if mode == "auto":
            mode = modes.of(cfg.diffusion.mode).sampler
        rows = cfg.model.latent_size // cfg.model.patch_size
        window = min(self.rolling_window or cfg.diffusion.rolling_window, rows)
        if modes.windowed(mode) and cfg.model.patch_encoder != "linear":
            raise ConfigError(
                "image_mode=rolling needs model.patch_encoder=linear: the U-Net's convolutions "
                "would mix rows outside the window. Use image_mode=full."
            )
        steps = self.diffusion_steps or samplers.DEFAULT_STEPS[self.sampler]
        # Text guidance draws no image: its twins are image-free prompts, not image twins.
        guidance = None if self.text_guided else self.guidance_scale
        return dataclasses.replace(
            self,
            image_mode=mode,
            rolling_window=window,
            diffusion_steps=steps,
            guidance_scale=guidance,
        )


# ----------------------------------------------------------------------------- command line


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    return float(text)


def add_arguments(parser: argparse.ArgumentParser, defaults: SampleOptions | None = None) -> None:
    """Adds one flag per `SampleOptions` field, with its default shown in --help.

    Args:
      defaults: the command's own defaults (`eval` draws with other ones than `generate`).
    """
    group = parser.add_argument_group("sampling options")
    types = {"int": int, "float": float, "str": str, "float | None": _optional_float}
    for f in dataclasses.fields(SampleOptions):
        default = f.default if defaults is None else getattr(defaults, f.name)
        kw: dict[str, Any] = {"dest": f.name, "default": default, "type": types[f.type]}
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
        group.add_argument(_flag(f), help=f"{f.metadata['help']} (default: {default})", **kw)


def from_args(args: argparse.Namespace) -> SampleOptions:
    """The options `add_arguments` parsed."""
    return SampleOptions(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(SampleOptions)}
    )

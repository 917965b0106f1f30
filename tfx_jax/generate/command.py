"""`python -m tfx_jax generate` once the parameters are loaded: input images, prompts, outputs.

generate_cli(cfg, params, prompts, out_dir, options, input_images=...) -> written paths
plan_prompt_images(prompts, n)   which --image files go to which prompt (checked up front)
encode_image_files(d, vae, files)    --image files prepared as training prepared its images
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh

from tfx_jax import artifacts
from tfx_jax.config import Config, ConfigError, DataConfig
from tfx_jax.data.sources import RecordError
from tfx_jax.data.sources.images import read_image
from tfx_jax.diffusion import modes
from tfx_jax.generate.documents import write_documents
from tfx_jax.generate.options import SampleOptions
from tfx_jax.generate.sample import IMAGE_PLACEHOLDER, Prompt, generate
from tfx_jax.generate.stream import RowStream
from tfx_jax.models.vae import Codec


def generate_cli(
    cfg: Config,
    params: Any,
    prompts: Sequence[str],
    out_dir: str | epath.PathLike,
    options: SampleOptions = SampleOptions(),
    *,
    input_images: Sequence[str] = (),
    force_image: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, epath.Path]:
    """Everything `python -m tfx_jax generate` does once the parameters are loaded.

    Loads the tokenizer and the VAE from `data.data_dir`, generates, writes the documents and
    prints where they are.

    Args:
      cfg: the model's config.
      params: its parameters.
      prompts: prompt strings ("<image>" marks where an input image goes).
      out_dir: where samples.md, samples.html and images/ go.
      input_images: PNG/JPEG paths, resized to `data.image_size` and VAE-encoded; prompt i gets
        image i before its text (image to text), unless its text has "<image>" markers, which
        then take the next images in order.
      options: decoding and diffusion choices.
      force_image: every answer starts with an image (BOI is appended to each prompt).
      mesh: defaults to the config's mesh.

    Returns:
      {"markdown": path, "html": path, "images": [png paths]}, and in rolling mode "streams":
      the `RowStream` files (an animated PNG and a strip of the rows arriving, per image).
    """
    opts = options.resolved(cfg)  # bad options fail before anything is loaded
    tokenizer = artifacts.load_tokenizer(cfg)
    vae = artifacts.load_vae(cfg) if (artifacts.vae_dir(cfg) / "vae.json").exists() else None
    if input_images and vae is None:
        raise FileNotFoundError(
            f"input images need the VAE: none in {artifacts.vae_dir(cfg)} (python -m tfx_jax vae)"
        )
    plan = plan_prompt_images(prompts, len(input_images))
    lats = list(encode_image_files(cfg.data, vae, input_images)) if input_images else []
    reqs = []
    for text, k in plan:
        imgs, lats = tuple(lats[:k]), lats[k:]
        reqs.append(Prompt(text, imgs, force_image))
    stream = RowStream() if modes.windowed(opts.image_mode) else None
    results = generate(cfg, params, tokenizer, reqs, opts, vae=vae, mesh=mesh, on_row=stream)
    if jax.process_index() != 0:  # every process generated the same documents; one writes
        return {}
    paths = write_documents(results, out_dir)
    if stream is not None:  # rows as they arrived: an animated PNG and a strip per image
        paths["streams"] = stream.write(epath.Path(out_dir) / "images", vae)
        print(f"rows as they arrived (animated PNG + strip per image): {out_dir}/images/stream_*")
    for i, res in enumerate(results):
        n_img = len(res.images)
        print(f"[{i}] {res.prompt.text!r} -> {res.text!r} + {n_img} image(s) (stop: {res.stop})")
    print(f"wrote {paths['markdown']} and {paths['html']}")
    return paths


def plan_prompt_images(prompts: Sequence[str], num_images: int) -> list[tuple[str, int]]:
    """Which input images go to which prompt: each "<image>" marker takes the next image, and a
    prompt without markers takes one (image to text) while images are left; every image must be
    used and every marker filled.

    Returns:
      [(prompt text with its markers, number of images)] per prompt.

    Raises:
      ConfigError: more markers than images, or images that no prompt takes.
    """
    left, plan = num_images, []
    for text in prompts:
        k = text.count(IMAGE_PLACEHOLDER)
        if k == 0 and left > 0:
            text, k = f"{IMAGE_PLACEHOLDER} {text}".strip(), 1
        if k > left:
            raise ConfigError(
                f"prompt {text!r} has {k} {IMAGE_PLACEHOLDER} marker(s) but only {left} of the "
                f"{num_images} --image file(s) are left for it: give one --image per marker."
            )
        left -= k
        plan.append((text, k))
    if left:
        raise ConfigError(
            f"{left} of the {num_images} --image file(s) are not used by any prompt: add "
            f"{IMAGE_PLACEHOLDER} markers or prompts for them."
        )
    return plan


def encode_image_files(d: DataConfig, vae: Codec, files: Sequence[str]) -> np.ndarray:
    """The --image files prepared exactly as training prepared its images (`read_image`: RGB,
    16-bit scaled, transparency on white, centre crop, Lanczos resize; smaller than
    data.min_image_size refused), then VAE-encoded. A file that cannot be used: ConfigError."""
    size = d.image_size
    pix = []
    for f in files:
        try:
            pix.append(read_image(f, size, d.min_image_side))
        except RecordError as e:
            why = str(e).removeprefix(f"{f}: ")
            raise ConfigError(f"--image {f}: {why}") from e
    return np.asarray(Codec(*vae).encode(jnp.asarray(np.stack(pix))))

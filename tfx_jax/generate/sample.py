"""Generation: interleaved text and images from prompts, written out as Markdown and HTML.

    prompts ─encode─▶ prefill (text + clean prompt images, t = 0) ─▶ per row, in lockstep:
      text step: write the pending token, sample the next (greedy / temperature / top-k / top-p)
      a row that writes BOI gets an image block: I patches of noise at its next cache slots,
        denoised with the prefix cached (full block, or rolling rows top to bottom), written
        back clean (t = 0), then EOI; then text again until EOS or the token budget
    ─▶ results (text pieces, image latents, PNGs through the VAE) ─▶ write_documents

Many prompts run as one batch, padded to a multiple of the mesh's data-parallel size and
sharded over it; each row of the KV cache has its own write index, so rows that are busy with
different things (one runs an image while another writes text) never waste each other's slots.

Public API:
  generate(cfg, params, tokenizer, prompts, options, vae=None) -> list[GenerationResult]
  caption_images(cfg, params, tokenizer, images_uint8, vae, options) -> list[GenerationResult]
  write_documents(results, out_dir) -> {"markdown": path, "html": path} (generate.documents)
  generate_cli(...): the `generate` command around these (generate.command)
  RowStream(): an `on_row` callback that records rolling rows as they arrive (generate.stream)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tfx_jax import sharding
from tfx_jax.config import Config
from tfx_jax.data.tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID, PAD_ID, UNK_ID
from tfx_jax.diffusion import modes, rolling
from tfx_jax.generate.decode import CHUNK_KEYS, Decoder
from tfx_jax.generate.options import SampleOptions
from tfx_jax.generate.stream import RowStream  # noqa: F401 (re-exported: the `on_row` recorder)
from tfx_jax.models.vae import Codec

IMAGE_PLACEHOLDER = "<image>"  # where a prompt's images go (the data pipeline's marker)

# ----------------------------------------------------------------------------- types


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One generation request.

    Attributes:
      text: the prompt; each "<image>" marks where the next of `images` goes.
      images: scaled VAE latents [h, w, C] (as `models.vae.Codec.encode` gives), inserted as
        clean image blocks (t = 0): the model sees them as it saw images during training.
      force_image: end the prompt with BOI, so the first thing generated is an image.
    """

    text: str = ""
    images: tuple[np.ndarray, ...] = ()
    force_image: bool = False


@dataclasses.dataclass
class Piece:
    """A run of text or one image of a document.

    Attributes:
      kind: "text" or "image".
      text: the decoded text (text pieces).
      latents: [h, w, C] scaled latents (image pieces).
      image: uint8 [H, W, 3] decoded by the VAE (when one was given).
    """

    kind: str
    text: str = ""
    latents: np.ndarray | None = None
    image: np.ndarray | None = None


@dataclasses.dataclass
class GenerationResult:
    """What one prompt produced.

    Attributes:
      prompt: the request.
      prompt_pieces: the prompt as pieces (its text and its images).
      pieces: the generated continuation, in order.
      token_ids: every token the row wrote or sampled after the prompt (BOI/EOI/EOS included;
        image patches are not tokens).
      stop: "eos" or "max_new_tokens".
    """

    prompt: Prompt
    prompt_pieces: list[Piece]
    pieces: list[Piece]
    token_ids: list[int]
    stop: str

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces if p.kind == "text")

    @property
    def images(self) -> list[Piece]:
        return [p for p in self.pieces if p.kind == "image"]


# ----------------------------------------------------------------------------- prompts


def encode_prompt(
    prompt: Prompt, encode: Callable[[str], list[int]], num_patches: int
) -> tuple[list[int], list[int], list[np.ndarray]]:
    """Prompt -> (tokens, image ids, latents) in the training layout: BOS, text, and
    BOI, I patch slots, EOI per image (then BOI if `force_image`)."""
    parts = prompt.text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(prompt.images):
        raise ValueError(
            f"prompt {prompt.text!r} has {len(parts) - 1} {IMAGE_PLACEHOLDER} markers but "
            f"{len(prompt.images)} images"
        )
    tokens, image_ids = [BOS_ID], [0]
    for k, part in enumerate(parts):
        if part.strip():
            ids = encode(part.strip())
            tokens += ids
            image_ids += [0] * len(ids)
        if k < len(prompt.images):
            tokens += [BOI_ID] + [0] * num_patches + [EOI_ID]
            image_ids += [0] + [k + 1] * num_patches + [0]
    if prompt.force_image:
        tokens.append(BOI_ID)
        image_ids.append(0)
    return tokens, image_ids, [np.asarray(x, np.float32) for x in prompt.images]


def _prompt_pieces(prompt: Prompt) -> list[Piece]:
    out = []
    for k, part in enumerate(prompt.text.split(IMAGE_PLACEHOLDER)):
        if part.strip():
            out.append(Piece("text", text=part.strip()))
        if k < len(prompt.images):
            out.append(Piece("image", latents=np.asarray(prompt.images[k], np.float32)))
    return out


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass
class _Rows:
    """Host-side state of the B conditional rows (numpy, one entry per row)."""

    index: np.ndarray  # next free cache slot
    pos: np.ndarray  # next RoPE position
    pending: np.ndarray  # sampled, not yet written token (-1: none)
    need_image: np.ndarray  # wrote BOI: an image block comes next
    done: np.ndarray
    images: np.ndarray  # image ids used so far in the document (prompt images included)
    generated_images: np.ndarray
    sampled: np.ndarray  # text tokens sampled so far
    stop: list[str]
    token_ids: list[list[int]]
    text_ids: list[list[int]]  # the current run of text ids (flushed at an image and the end)
    pieces: list[list[Piece]]
    # Text guidance: the image-free twins' next cache slot and position (they write the same
    # tokens as their prompts, from a shorter prefix). None: the twins, if any, are image twins.
    twin_index: np.ndarray | None = None
    twin_pos: np.ndarray | None = None


def generate(
    cfg: Config,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    options: SampleOptions = SampleOptions(),
    *,
    vae: Codec | None = None,
    mesh: Mesh | None = None,
    on_row: Callable[[int, int, np.ndarray], None] | None = None,
) -> list[GenerationResult]:
    """Generates interleaved text and images for every prompt (one sharded batch).

    Args:
      cfg: the model's config.
      params: its parameters (any placement; they are sharded by their logical names).
      tokenizer: `encode(str) -> ids`, `decode(ids) -> str`, `vocab_size`.
      prompts: `Prompt`s or plain strings.
      options: decoding and diffusion choices.
      vae: the VAE's `models.vae.Codec` (or a (model, params, scale_factor) tuple); images are then
        decoded to uint8 pixels (else results hold latents only).
      mesh: defaults to the config's mesh over all devices.
      on_row: rolling mode only: called as on_row(prompt_index, row, latent_row [p, w, C]) the
        moment each patch row of an image is finished, top to bottom (for streaming viewers).

    Returns:
      One `GenerationResult` per prompt, in order.
    """
    prompts = [Prompt(p) if isinstance(p, str) else p for p in prompts]
    m = cfg.model
    I, g = m.num_patches, m.latent_size // m.patch_size
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    dec = Decoder(cfg, mesh, options)
    params = dec.put_params(params)
    n = len(prompts)
    B = math.ceil(n / dec.batch_parallel()) * dec.batch_parallel()
    R = 2 * B if dec.opts.twins else B
    rng = jax.random.key(options.seed)
    text_guided = dec.opts.text_guided
    if text_guided and any(pr.force_image for pr in prompts):
        raise ValueError("text_guidance draws no image: drop force_image (or text_guidance=1).")

    pad = [([BOS_ID], [0], [])] * (B - n)  # padding rows: a lone BOS, done at once
    encoded = [encode_prompt(pr, tokenizer.encode, I) for pr in prompts] + pad
    lens = np.array([len(e[0]) for e in encoded])
    twins = None
    if text_guided:  # each prompt without its images (the unconditional text model)
        twins = [
            encode_prompt(Prompt(pr.text.replace(IMAGE_PLACEHOLDER, " ")), tokenizer.encode, I)
            for pr in prompts
        ] + pad
    # Slots: prompt, sampled tokens, images with their EOI, and room for the padding chunks idle
    # rows write past their content while other rows run an image (or a rolling window).
    headroom = I + dec.window * g
    n_images = options.max_images + 1  # + a forced image
    S = int(lens.max()) + options.max_new_tokens + n_images * (I + 1) + headroom
    cache = dec.new_cache(R, S)
    allowed = _allowed_tokens(m.vocab_size, tokenizer.vocab_size)

    def allowed_now():  # BOI is banned once a row has generated its images
        rows = np.repeat(allowed[None], B, 0)
        rows[st.generated_images >= options.max_images, BOI_ID] = False
        return dec.put(rows)

    st = _Rows(
        index=lens.copy(),
        pos=lens.copy(),
        pending=np.full(B, -1),
        need_image=np.array([e[0][-1] == BOI_ID for e in encoded]),
        done=np.arange(B) >= n,
        images=np.array([len(e[2]) for e in encoded]),
        generated_images=np.zeros(B, int),
        sampled=np.zeros(B, int),
        stop=[""] * B,
        token_ids=[[] for _ in range(B)],
        text_ids=[[] for _ in range(B)],
        pieces=[[] for _ in range(B)],
    )
    if twins is not None:
        st.twin_index = np.array([len(e[0]) for e in twins])
        st.twin_pos = st.twin_index.copy()
    first, cache = dec.prefill(
        params,
        cache,
        dec.put(np.zeros(R, np.int32)),
        *_prefill_inputs(dec, encoded, R, twins),
        jax.random.fold_in(rng, 0),
        allowed_now(),
    )
    _take_samples(st, dec.fetch(first), ~st.need_image & ~st.done, options.max_new_tokens)

    step = 0
    while not st.done.all():
        step += 1
        key = jax.random.fold_in(rng, step)
        phase = st.need_image & ~st.done
        if phase.any():  # every row that wrote BOI gets its image now; the others idle
            cache, x0 = _image_phase(dec, params, cache, st, phase, R, key, on_row)
            for b in np.flatnonzero(phase):
                _flush_text(st, b, tokenizer)
                st.pieces[b].append(Piece("image", latents=x0[b, 0]))
                st.index[b] += I
                st.pos[b] += I
                st.need_image[b] = False
                st.images[b] += 1
                st.generated_images[b] += 1
                st.pending[b] = EOI_ID
            continue
        active = ~st.done
        chunk = {k: np.zeros((R, 1), np.int32) for k in CHUNK_KEYS}
        chunk["tokens"][:B, 0] = np.where(active, st.pending, 0)
        chunk["segment_ids"][:B, 0] = active
        chunk["positions"][:B, 0] = st.pos
        if text_guided:  # the twins write the same token at their own position
            chunk["tokens"][B:, 0] = chunk["tokens"][:B, 0]
            chunk["segment_ids"][B:, 0] = active
            chunk["positions"][B:, 0] = st.twin_pos
        nxt, cache = dec.text_step(
            params, cache, dec.put(_cache_index(st, R)), _put_chunk(dec, chunk), key, allowed_now()
        )
        wrote = st.pending.copy()
        st.index[active] += 1
        st.pos[active] += 1
        if text_guided:
            st.twin_index[active] += 1
            st.twin_pos[active] += 1
        for b in np.flatnonzero(active & (wrote == EOI_ID)):
            st.token_ids[b].append(EOI_ID)
        st.need_image |= active & (wrote == BOI_ID)
        _take_samples(st, dec.fetch(nxt), active & ~st.need_image, options.max_new_tokens)

    results = []
    for b in range(n):
        _flush_text(st, b, tokenizer)
        results.append(
            GenerationResult(
                prompts[b], _prompt_pieces(prompts[b]), st.pieces[b], st.token_ids[b], st.stop[b]
            )
        )
    if vae is not None:
        decode_images(results, vae)
    return results


def _prefill_inputs(dec: Decoder, encoded, R: int, twins=None) -> tuple:
    """(chunk, latents, last) of the prefill. Rows [0, B) hold the prompts; the unconditional
    twins [B, 2B) hold BOS, BOI (the caption-dropped layout), written once: every image block of
    a twin is rewritten right after them — or, with text guidance, `twins`: each prompt
    without its images. Prompt images are clean blocks; a model trained with
    rolling diffusion sees them row by row, as the rolling sampler leaves its own images."""
    m = dec.cfg.model
    B, g = len(encoded), dec.rows
    rows = encoded + (twins or [])
    Tp = max(len(e[0]) for e in rows)
    Mp = max(len(e[2]) for e in rows)
    chunk = {k: np.zeros((R, Tp), np.int32) for k in CHUNK_KEYS}
    latents = np.zeros((R, Mp, m.latent_size, m.latent_size, m.latent_channels), np.float32)
    last = np.zeros(R, np.int32)
    for b, (toks, imgs, lats) in enumerate(rows):
        L, img = len(toks), np.asarray(imgs)
        chunk["tokens"][b, :L], chunk["segment_ids"][b, :L] = toks, 1
        chunk["positions"][b, :L] = np.arange(L)
        chunk["image_ids"][b, :L] = img
        patch = np.arange(L) - np.maximum.accumulate(np.where(img > 0, 0, np.arange(L))) - 1
        attn = modes.of(dec.cfg.diffusion.mode).attention_ids(img, patch, g)
        chunk["attn_image_ids"][b, :L] = attn
        if lats:
            latents[b, : len(lats)] = np.stack(lats)
        last[b] = L - 1
    if R > B and twins is None:
        chunk["tokens"][B:, :2], chunk["segment_ids"][B:, :2] = [BOS_ID, BOI_ID], 1
        chunk["positions"][B:, :2] = [0, 1]
    return _put_chunk(dec, chunk), dec.put(latents), dec.put(last)


TWIN_INDEX = 2  # a twin's image block starts after its BOS, BOI


def _cache_index(st: _Rows, R: int) -> np.ndarray:
    B = len(st.index)
    twins = np.full(R - B, TWIN_INDEX) if st.twin_index is None else st.twin_index
    return np.concatenate([st.index, twins]).astype(np.int32)


def _allowed_tokens(model_vocab: int, tokenizer_vocab: int) -> np.ndarray:
    """Tokens text sampling may produce: not PAD/BOS/UNK/EOI, nor ids the tokenizer lacks."""
    allowed = np.arange(model_vocab) < tokenizer_vocab
    allowed[[PAD_ID, BOS_ID, UNK_ID, EOI_ID]] = False
    return allowed


def _put_chunk(dec: Decoder, chunk: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: dec.put(v) for k, v in chunk.items()}


def _take_samples(st: _Rows, sampled: np.ndarray, rows: np.ndarray, budget: int) -> None:
    """Records the tokens sampled for `rows`: EOS and the token budget end a row; BOI becomes
    the pending token (the next text step writes it, then an image follows); the rest is text."""
    for b in np.flatnonzero(rows & ~st.done):
        tok = int(sampled[b])
        st.sampled[b] += 1
        st.token_ids[b].append(tok)
        if tok == EOS_ID:
            st.done[b], st.stop[b] = True, "eos"
            continue
        if tok != BOI_ID:
            st.text_ids[b].append(tok)
        st.pending[b] = tok
        if st.sampled[b] >= budget:
            st.done[b], st.stop[b] = True, "max_new_tokens"


def _flush_text(st: _Rows, b: int, tokenizer) -> None:
    if st.text_ids[b]:
        st.pieces[b].append(Piece("text", text=tokenizer.decode(st.text_ids[b])))
        st.text_ids[b] = []


def _block_chunk(dec: Decoder, st: _Rows, phase, R: int, first: int, n: int, attn_id):
    """The chunk of patches [first, first + n) of the image of every row in `phase` (and of its
    twin); other rows are padding. Patches past the image (a window overhanging the last row)
    are padding too. `attn_id(k, patch_offsets)` gives the attention image ids.

    Returns:
      (chunk, cache index per row).
    """
    B, I = len(phase), dec.cfg.model.num_patches
    chunk = {k: np.zeros((R, n), np.int32) for k in CHUNK_KEYS}
    off = first + np.arange(n)
    exists = off < I
    for b in np.flatnonzero(phase):
        # The row's document continues at its position; a twin's image follows BOS, BOI and is
        # its image 1. Both rows share the latent, so both hold the same patches.
        for row, pos0, k in ((b, st.pos[b], st.images[b] + 1), (b + B, TWIN_INDEX, 1))[: R // B]:
            chunk["segment_ids"][row] = exists
            chunk["positions"][row] = pos0 + off
            chunk["image_ids"][row] = np.where(exists, k, 0)
            chunk["attn_image_ids"][row] = np.where(exists, attn_id(k, off), 0)
    return _put_chunk(dec, chunk), dec.put(_cache_index(st, R) + first)


def _image_phase(dec: Decoder, params, cache, st: _Rows, phase, R: int, rng, on_row):
    """Generates one image for every row in `phase`; returns (cache, x0 [B, 1, h, w, C]).

    Full mode: the whole block is denoised with the prefix cached (each step runs the block
    only; the cache is read, never kept), then written back clean (t = 0).
    Rolling mode: passes of the window over patch rows (`rolling.sampling_plan`); each finished
    row is written into the cache at t = 0 (the rows below attend to it) — or, with
    `diffusion.rolling_context_noise`, noised to that level as in training — handed clean to
    `on_row`, and the window shifts by one row of fresh noise. Only the window is held.
    """
    m = dec.cfg.model
    B, I, g, p = len(phase), m.num_patches, dec.rows, m.patch_size
    C, hw = m.latent_channels, m.latent_size
    noise_key, pass_key = jax.random.split(rng)
    if dec.opts.image_mode == "full":
        chunk, index = _block_chunk(dec, st, phase, R, 0, I, lambda k, off: np.full(off.shape, k))
        x_T = jax.random.normal(noise_key, (B, 1, hw, hw, C), jnp.float32)
        x0 = dec.image_full(params, cache, index, chunk, dec.put(np.asarray(x_T)), pass_key)
        cache = dec.commit(params, cache, index, chunk, x0)
        return cache, dec.fetch(x0)

    W = dec.window
    init_schedule = dec.cfg.diffusion.rolling_init_schedule  # as the checkpoint was trained
    plan = rolling.sampling_plan(
        g, W, max(dec.opts.diffusion_steps // W, 1), init_schedule=init_schedule
    )
    x_win = np.asarray(jax.random.normal(noise_key, (B, 1, W * p, hw, C), jnp.float32))
    finished = []
    for i, ps in enumerate(plan):
        r0 = ps.start_row
        window_id = lambda k, off: np.full(off.shape, rolling.block_id(k, g, g))  # noqa: B023
        chunk, index = _block_chunk(dec, st, phase, R, r0 * g, W * g, window_id)
        taus = jnp.asarray(ps.taus, jnp.float32)
        key = jax.random.fold_in(pass_key, i)
        x_win = dec.fetch(dec.rolling_pass(params, cache, index, chunk, dec.put(x_win), taus, key))
        row = np.ascontiguousarray(x_win[:, :, :p])  # row r0 is clean (τ = 0)
        row_id = lambda k, off: np.full(off.shape, rolling.block_id(k, r0, g))  # noqa: B023
        row_chunk, row_index = _block_chunk(dec, st, phase, R, r0 * g, g, row_id)
        if dec.context_level:  # context noise: the cache holds the row as training showed it
            ctx_key = jax.random.fold_in(key, 1 << 30)  # the pass's steps fold in 0 .. n-1
            cache = dec.commit_context(params, cache, row_index, row_chunk, dec.put(row), ctx_key)
        else:
            cache = dec.commit(params, cache, row_index, row_chunk, dec.put(row))
        finished.append(row)
        if on_row is not None:
            for b in np.flatnonzero(phase):
                on_row(int(b), r0, row[b, 0])
        fresh = jax.random.normal(jax.random.fold_in(noise_key, i + 1), (B, 1, p, hw, C))
        x_win = np.concatenate([x_win[:, :, p:], np.asarray(fresh)], axis=2)
    return cache, np.concatenate(finished, axis=2)


# ----------------------------------------------------------------------------- images


def decode_images(results: Sequence[GenerationResult], vae: Codec) -> None:
    """Fills `Piece.image` (uint8) for every image piece of the results, prompts included."""
    codec = Codec(*vae)
    for res in results:
        for piece in res.prompt_pieces + res.pieces:
            if piece.kind == "image" and piece.latents is not None:
                piece.image = np.asarray(codec.decode(piece.latents[None]))[0]


def caption_images(
    cfg: Config,
    params: Any,
    tokenizer: Any,
    images_uint8: np.ndarray,
    vae: Codec,
    options: SampleOptions = SampleOptions(),
    prefix: str = "",
    **kw: Any,
) -> list[GenerationResult]:
    """Image to text: VAE-encode each image, insert it as a clean image block (t = 0) after BOS,
    then decode text (optionally after `prefix`).

    Args:
      images_uint8: [N, H, W, 3] at `data.image_size`.
      vae: the VAE's `models.vae.Codec` (or a (model, params, scale_factor) tuple).
      prefix: text after the image that the caption continues.
      kw: passed to `generate` (mesh, on_row).
    """
    lat = np.asarray(Codec(*vae).encode(jnp.asarray(images_uint8)))
    prompts = [Prompt(f"{IMAGE_PLACEHOLDER} {prefix}".rstrip(), (lat[i],)) for i in range(len(lat))]
    return generate(cfg, params, tokenizer, prompts, options, vae=vae, **kw)

"""Compiled decoding steps over a KV cache: prefill, text tokens, image blocks (full or rolling).

Every function here is pure (params, cache, chunk, ...) -> arrays, jitted once per shape by
`Decoder`, which holds the model, the mesh and the static choices (sampler, steps, guidance).
`tfx_jax.generate.sample` drives them from the host.

  prefill      write the prompt (text and clean prompt images, t = 0); logits at each row's end
  text_step    write one token per row; sample the next (greedy / temperature / top-k / top-p)
  image_full   the reverse process over one image block: each step runs the transformer on the
               block only, attending to the cached prefix (the cache is read, never kept)
  rolling_pass one sweep of a rolling window of patch rows (tfx_jax.diffusion.rolling)
  commit       write clean latents (t = 0) into the cache: a finished image or image row
  commit_context  write a finished rolling row noised to the context level (training's view of
               the rows above the window, `diffusion.rolling_context_noise`)

Classifier-free guidance (Ho & Salimans 2022) doubles the batch: rows [0, B) are the prompts and
rows [B, 2B) their unconditional twins, whose cache holds only BOS, BOI and the image being
generated (what training with caption dropping shows the model). Both halves run as one batch
through the model; ε̂ = ε̂_u + s(ε̂_c − ε̂_u) updates one shared latent. Text guidance
(`text_guidance`, for captions) uses the twins the other way round: a twin holds its prompt
without the images and writes the same tokens, and l_u + s(l_c − l_u) picks them.

Legend: B rows (prompts), R cache rows (B, or 2B with guidance), T chunk length, S cache slots,
V vocab, W window rows, h/w/C latent grid.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tfx_jax import layout, sharding
from tfx_jax import params as params_lib
from tfx_jax.config import Config
from tfx_jax.data.tokenizer import EOS_ID
from tfx_jax.diffusion import ddpm, modes, rolling, samplers
from tfx_jax.generate.options import SampleOptions
from tfx_jax.models.kv_cache import KV_AXES, META_AXES, KVCache, init_cache
from tfx_jax.models.transformer import Transfusion
from tfx_jax.sharding import mesh_context

CHUNK_KEYS = ("tokens", "segment_ids", "positions", "image_ids", "attn_image_ids")
TEXT_GUIDANCE_ALPHA = 0.1  # text guidance picks among tokens with p_c >= α · max p_c


# ----------------------------------------------------------------------------- text sampling


def sample_tokens(
    logits_BV: jax.Array,
    rng: jax.Array,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    allowed_BV: jax.Array | None = None,
) -> jax.Array:
    """Next token per row: greedy (temperature 0), or sampled from the tempered softmax restricted
    to the top-k tokens and/or the top-p nucleus (Holtzman et al. 2020).

    Args:
      logits_BV: float logits.
      rng: key for sampling.
      temperature: 0 = argmax.
      top_k: keep the k most likely tokens (0 = all).
      top_p: keep the smallest set of tokens whose probability reaches p (1 = all).
      allowed_BV: bool, tokens that may be produced at all (None = every token).

    Returns:
      int32 [B] token ids.
    """
    logits = logits_BV.astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    if allowed_BV is not None:
        logits = jnp.where(allowed_BV, logits, neg)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth_B1, logits, neg)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token while the mass before it is < p: the first token is always kept.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < top_p
        cutoff_B1 = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff_B1, logits, neg)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- decoder


class Decoder:
    """The jitted decode functions of one model on one mesh.

    Args:
      cfg: the run's config (model, diffusion schedule, mesh rules).
      mesh: where the batch and the cache are sharded (batch over the data axes, kv heads over
        tensor, as the rules say).
      options: text and image sampling choices (resolved for `cfg`: steps, image mode and
        window are filled in; `self.opts` holds the result).
    """

    def __init__(self, cfg: Config, mesh: Mesh, options: SampleOptions = SampleOptions()):
        self.cfg, self.mesh = cfg, mesh
        self.opts = options.resolved(cfg)
        self.model = Transfusion(cfg.model)
        self.schedule = ddpm.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
        m = cfg.model
        self.rows = m.latent_size // m.patch_size  # g: rows of patches
        self.window = self.opts.rolling_window
        self.clip_x0 = self.opts.clip_x0 or None  # 0 = off
        self.timesteps = samplers.respaced_timesteps(
            self.schedule.num_timesteps,
            min(self.opts.diffusion_steps, self.schedule.num_timesteps),
        )
        self.prefill = self._jit(self._prefill)
        self.text_step = self._jit(self._text_step)
        self.image_full = self._jit(self._image_full)
        self.rolling_pass = self._jit(self._rolling_pass)
        self.commit = self._jit(self._commit)
        # Level of the rows above the rolling window, read from the checkpoint's config: the
        # sampler must show the model the context it was trained on (rolling module doc). A
        # model trained with standard diffusion saw clean context only.
        T, dc = self.schedule.num_timesteps, cfg.diffusion
        tau_ctx = modes.of(dc.mode).context_noise(dc)
        self.context_level = int(rolling.levels(np.float64(tau_ctx), T))
        self.commit_context = self._jit(self._commit_context)

    # -------------------------------------------------------------- placement

    def _jit(self, fn):
        jitted = jax.jit(fn)

        @functools.wraps(fn)
        def call(*args):
            with mesh_context(self.mesh, self.cfg):
                return jitted(*args)

        return call

    def batch_parallel(self) -> int:
        """Rows must be a multiple of this (the data-parallel ways of the mesh)."""
        return sharding.batch_parallel_size(self.mesh, self.cfg.mesh.rules)

    def put(self, x: np.ndarray) -> jax.Array:
        """A host array with a leading batch dim (the same on every process), sharded over the
        batch axes; each process writes only its own rows."""
        return sharding.put_host_array(
            x, sharding.batch_sharding(self.mesh, self.cfg.mesh.rules, np.ndim(x))
        )

    @staticmethod
    def fetch(x: jax.Array) -> np.ndarray:
        """A decode output back on every process's host (gathered across processes)."""
        return sharding.fetch(x)

    def put_params(self, params: Any) -> Any:
        """Parameters placed by their logical names (as the trainer shards them)."""
        return params_lib.put_params(self.cfg, params, self.mesh)

    def new_cache(self, rows: int, length: int) -> KVCache:
        """An empty cache of `length` slots for `rows` rows, created already sharded by the
        logical rules (never whole on one device, and across processes)."""
        m, rules = self.cfg.model, self.cfg.mesh.rules
        kv = sharding.logical_sharding(self.mesh, rules, KV_AXES)
        meta = sharding.logical_sharding(self.mesh, rules, META_AXES)
        make = functools.partial(
            init_cache, m.n_layers, rows, length, m.kv_heads, m.head_dim, jnp.dtype(m.dtype)
        )
        return jax.jit(make, out_shardings=KVCache(k=kv, v=kv, segment_ids=meta, image_ids=meta))()

    # -------------------------------------------------------------- model calls

    def _forward(self, params, cache, index_R, chunk, latents_RMhwC, t_RMI, with_logits):
        """One cached forward pass over a chunk: (logits, ε̂, cache)."""
        layout_RT = {k: chunk[k] for k in ("tokens", "segment_ids", "positions", "image_ids")}
        inputs = layout.ModelInputs.from_layout(
            layout_RT, latents_RMhwC, t_RMI, attn_image_ids_BT=chunk["attn_image_ids"]
        )
        out = self.model.apply(
            {"params": params}, inputs, cache=cache, index_B=index_R, with_logits=with_logits
        )
        return out.logits, out.eps, out.cache

    def _twin(self, x_B: jax.Array) -> jax.Array:
        """The latent of every cache row: the conditional rows' latent, again for the twins."""
        return jnp.concatenate([x_B, x_B]) if self.opts.guided else x_B

    def _eps(self, params, cache, index_R, chunk, x_BMhwC, t_RMI):
        """ε̂ for the B rows' latents: one batched pass, guided when the twins are present."""
        _, eps_RMhwC, _ = self._forward(
            params, cache, index_R, chunk, self._twin(x_BMhwC), t_RMI, False
        )
        if not self.opts.guided:
            return eps_RMhwC
        B = x_BMhwC.shape[0]
        return samplers.guided_eps(eps_RMhwC[:B], eps_RMhwC[B:], self.opts.guidance_scale)

    def _prefill(self, params, cache, index_R, chunk, latents_RMhwC, last_R, rng, allowed_BV):
        """Writes the prompts (clean prompt images at t = 0); samples each row's first token
        from the logits at its last prompt position `last_R`."""
        t_RMI = jnp.zeros(latents_RMhwC.shape[:2] + (self._patches(latents_RMhwC),), jnp.int32)
        logits_RTV, _, cache = self._forward(
            params, cache, index_R, chunk, latents_RMhwC, t_RMI, True
        )
        logits_RV = jnp.take_along_axis(logits_RTV, last_R[:, None, None], axis=1)[:, 0]
        return self._sample(self._text_logits(logits_RV, allowed_BV), rng, allowed_BV), cache

    def _text_logits(self, logits_RV, allowed_BV):
        """The B prompts' next-token logits; with text guidance, pushed away from what the
        image-free twins predict: l_u + s (l_c − l_u) (CFG for text, Sanchez et al. 2023)."""
        B = allowed_BV.shape[0]
        if not self.opts.text_guided:
            return logits_RV[:B]
        cond = jax.nn.log_softmax(logits_RV[:B].astype(jnp.float32))
        uncond = jax.nn.log_softmax(logits_RV[B:].astype(jnp.float32))
        guided = uncond + self.opts.text_guidance * (cond - uncond)
        # EOS keeps its conditional score: the twin's context (BOS, no image) never ends a
        # document, so guidance would make "stop here" win wherever the prompt allows it.
        guided = guided.at[:, EOS_ID].set(cond[:, EOS_ID])
        # Only tokens the prompt itself finds plausible (p_c >= α max p_c, the plausibility
        # constraint of contrastive decoding, Li et al. 2023): without it, a token the
        # image-free twin never expects here (EOS right after BOS) wins by its tiny p_u alone.
        plausible = cond >= cond.max(axis=-1, keepdims=True) + jnp.log(TEXT_GUIDANCE_ALPHA)
        return jnp.where(plausible, guided, jnp.finfo(jnp.float32).min)

    def _sample(self, logits_BV, rng, allowed_BV):
        o = self.opts
        return sample_tokens(logits_BV, rng, o.temperature, o.top_k, o.top_p, allowed_BV)

    def _patches(self, latents_RMhwC) -> int:
        p = self.cfg.model.patch_size
        return (latents_RMhwC.shape[2] // p) * (latents_RMhwC.shape[3] // p)

    def _text_step(self, params, cache, index_R, chunk, rng, allowed_BV):
        m = self.cfg.model
        R = chunk["tokens"].shape[0]
        none = jnp.zeros((R, 0, m.latent_size, m.latent_size, m.latent_channels), jnp.float32)
        t_none = jnp.zeros((R, 0, m.num_patches), jnp.int32)
        logits_RTV, _, cache = self._forward(params, cache, index_R, chunk, none, t_none, True)
        return self._sample(
            self._text_logits(logits_RTV[:, -1], allowed_BV), rng, allowed_BV
        ), cache

    def _image_full(self, params, cache, index_R, chunk, x_T_BMhwC, rng):
        """The reverse process over a whole image block; the cache is only read."""
        R, I = chunk["tokens"].shape[0], self.cfg.model.num_patches

        def denoise(x_BMhwC, t):
            t_RMI = jnp.full((R, 1, I), t, jnp.int32)
            return self._eps(params, cache, index_R, chunk, x_BMhwC, t_RMI)

        return samplers.sample(
            denoise,
            x_T_BMhwC,
            self.schedule,
            self.timesteps,
            self.opts.sampler,
            rng,
            self.clip_x0,
        )

    def _rolling_pass(self, params, cache, index_R, chunk, x_BMhwC, taus_NW, rng):
        """One sweep of the rolling window (`rolling.Pass.taus` [n + 1, W]); returns the window.

        Each step moves every window row from its level to the next one with the chosen sampler
        (rows whose level does not change are left as they are).
        """
        p, c = self.cfg.model.patch_size, self.rows
        R = chunk["tokens"].shape[0]
        T = self.schedule.num_timesteps
        abar = jnp.asarray(rolling.alpha_bars(self.schedule), jnp.float32)
        lev_NW = rolling.levels(taus_NW, T)

        def rows_to_latent(v_W):  # per window row -> broadcast over [B, 1, W·p, w, C]
            return jnp.repeat(v_W, p)[None, None, :, None, None]

        def body(x, j):
            lev_t, lev_s = lev_NW[j], lev_NW[j + 1]
            t_I = jnp.repeat(rolling.model_timesteps(lev_t), c)  # raster order: row-major
            t_RMI = jnp.broadcast_to(t_I, (R, 1, t_I.shape[0]))
            eps = self._eps(params, cache, index_R, chunk, x, t_RMI)
            a_t, a_s = rows_to_latent(abar[lev_t]), rows_to_latent(abar[lev_s])
            key = jax.random.fold_in(rng, j)
            moved = samplers.step(self.opts.sampler, x, eps, a_t, a_s, key, self.clip_x0)
            return jnp.where(rows_to_latent(lev_t != lev_s), moved, x), None

        x_BMhwC, _ = jax.lax.scan(body, x_BMhwC, jnp.arange(lev_NW.shape[0] - 1))
        return x_BMhwC

    def _commit(self, params, cache, index_R, chunk, x0_BMhwC, t=0):
        """Writes latents at model timestep `t` (default 0: clean) into the cache: what later
        positions attend to."""
        R = chunk["tokens"].shape[0]
        t_RMI = jnp.full((R, 1, self._patches(x0_BMhwC)), t, jnp.int32)
        _, _, cache = self._forward(
            params, cache, index_R, chunk, self._twin(x0_BMhwC), t_RMI, False
        )
        return cache

    def _commit_context(self, params, cache, index_R, chunk, x0_BMhwC, rng):
        """Writes a finished rolling row as training shows the rows above the window: q-sampled
        to level L = `context_level` with fresh noise from `rng`, at model timestep max(L − 1, 0)
        (rolling module doc, "Context noise"). Both halves of a guided batch get the same row."""
        t = int(rolling.model_timesteps(self.context_level))
        eps = jax.random.normal(rng, x0_BMhwC.shape, jnp.float32)
        x_t = ddpm.q_sample(self.schedule, x0_BMhwC.astype(jnp.float32), jnp.int32(t), eps)
        return self._commit(params, cache, index_R, chunk, x_t, t)

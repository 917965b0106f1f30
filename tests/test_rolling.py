"""Rolling diffusion over patch rows: the schedule, training inputs, and the sampler's view."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import forward

from tfx_jax import layout
from tfx_jax.diffusion import ddpm, rolling
from tfx_jax.models import kv_cache
from tfx_jax.models.transformer import Transfusion

T = 1000


def test_local_time_formulas():
    # Rolling (§3.2): τ = clip((w + t) / W); init (§3.3): τ = clip(w / W + t).
    w = np.arange(-1, 5)
    np.testing.assert_allclose(
        rolling.local_times(0.5, w, 0, 4), [0, 0.125, 0.375, 0.625, 0.875, 1]
    )
    np.testing.assert_allclose(
        rolling.local_times(0.5, w, 0, 4, init=True), [0, 0.5, 0.75, 1, 1, 1]
    )
    # The "joint" init schedule: τ = t + (1 - t) w / W, every row leaves pure noise at once.
    joint = rolling.local_times(0.5, w, 0, 4, init=True, init_schedule="joint")
    np.testing.assert_allclose(joint, [0, 0.5, 0.625, 0.75, 0.875, 1])
    for t in (0.0, 1.0):  # both init schedules run from all-noise to the staircase w / W
        np.testing.assert_allclose(
            rolling.local_times(t, w, 0, 4, init=True, init_schedule="joint"),
            rolling.local_times(t, w, 0, 4, init=True),
        )
    with pytest.raises(ValueError, match="init_schedule='stair'"):
        rolling.local_times(0.5, w, 0, 4, init=True, init_schedule="stair")
    np.testing.assert_allclose(
        rolling.local_times(0.0, w + 2, 2, 4), rolling.local_times(0.0, w, 0, 4)
    )
    # Level 0 is clean data (ᾱ = 1); level n >= 1 is schedule index n - 1.
    lev = rolling.levels(np.array([0.0, 0.0004, 0.0006, 0.5, 1.0]), T)
    np.testing.assert_array_equal(lev, [0, 0, 1, 500, 1000])
    np.testing.assert_array_equal(rolling.model_timesteps(lev), [0, 0, 0, 499, 999])
    sched = ddpm.make_schedule("cosine", T)
    abar = rolling.alpha_bars(sched)
    assert abar[0] == 1.0 and abar[1] == sched.alphas_cumprod[0] and abar[T] < 1e-6


@pytest.mark.parametrize("init_schedule", rolling.INIT_SCHEDULES)
@pytest.mark.parametrize("rows,window,steps", [(4, 2, 3), (16, 4, 5), (5, 5, 2), (6, 1, 4)])
def test_sampling_schedule_properties(rows, window, steps, init_schedule):
    plan = rolling.sampling_plan(rows, window, steps, init_schedule=init_schedule)
    tau = rolling.row_times(plan, rows)  # [steps + 1, rows]
    assert len(plan) == rows and plan[0].init and not any(p.init for p in plan[1:])
    # Local times stay in [0, 1].
    assert tau.min() >= 0.0 and tau.max() <= 1.0
    # Each row goes from pure noise to clean exactly once: starts at 1, never rises, ends at 0,
    # and is 0 from the end of its own pass on (pass k emits row k).
    assert (tau[0] == 1.0).all() and (tau[-1] == 0.0).all()
    assert (np.diff(tau, axis=0) <= 1e-12).all()
    ends = np.cumsum([len(p.taus) - 1 for p in plan])
    for r in range(rows):
        first_clean = int(np.argmax(tau[:, r] == 0.0))
        assert first_clean == ends[r], (r, first_clean, ends[r])
        assert (tau[first_clean:, r] == 0.0).all() and (tau[:first_clean, r] > 0).all()
    # Monotone along the window: rows further down are never less noisy.
    assert (np.diff(tau, axis=1) >= -1e-12).all()
    # A pass's end is the next pass's start (shifted by a row): the window rolls without jumps.
    for a, b in zip(plan[:-1], plan[1:], strict=True):
        k = min(window, rows) - 1
        np.testing.assert_allclose(
            a.taus[-1][1:][: rows - b.start_row], b.taus[0][:k][: rows - b.start_row]
        )


@pytest.mark.parametrize("rows,window", [(4, 4), (8, 4), (8, 2), (16, 4), (5, 5)])
def test_default_init_share_is_the_init_pass_share_of_model_calls(rows, window):
    # The default trains each pass as often as the sampler runs the model in it (module doc).
    calls = [len(p.taus) - 1 for p in rolling.sampling_plan(rows, window, 3)]
    share = rolling.resolve_init_prob(rolling.AUTO_INIT, rows, window)
    np.testing.assert_allclose(share, calls[0] / sum(calls))
    np.testing.assert_allclose(share, rolling.init_share(rows, window))
    assert rolling.resolve_init_prob(0.25, rows, window) == 0.25  # an explicit share is kept


def test_training_uses_the_default_init_share(tiny_config):
    from tfx_jax.config import DiffusionConfig, validate

    assert DiffusionConfig().rolling_init_prob == rolling.AUTO_INIT  # the default is the share
    validate(tiny_config(None, ["diffusion.mode=rolling", "diffusion.rolling_init_prob=-1"]))
    B, M = 256, 1
    x0 = jnp.zeros((B, M, 8, 8, 4))
    img = np.zeros((B, 18), np.int32)
    img[:, 1:17] = 1
    seg = np.ones((B, 18), np.int32)
    slot, start, _ = layout.image_slots(jnp.asarray(seg), jnp.asarray(img), M)
    sched = ddpm.make_schedule("cosine", T)
    weight = jax.jit(  # one compiled call: eager ops on 8 simulated devices are slow
        lambda k, *a: rolling.training_inputs(k, sched, *a, 2, 4, rolling.AUTO_INIT)["weight_BMI"]
    )(jax.random.key(0), x0, x0, jnp.asarray(img), slot, start)
    first_row_in_window = np.asarray(weight)[:, 0, 0] > 0  # only the init pass has row 0
    assert abs(first_row_in_window.mean() - 4 / 7) < 0.1


def tiny_model(tiny_config):
    from test_sample import init_params

    cfg = tiny_config(None, ["diffusion.mode=rolling", "diffusion.rolling_window=2"])
    model = Transfusion(cfg.model)
    params = init_params(cfg)
    return cfg, model, params


def _one_image_rows(m, rows: int, slots: int):
    """`rows` batch rows of BOS, BOI, 16 patches (8x8 latents, 2x2 patches), EOI, padding: the
    image arrays, slots and random latents/noise that `rolling.training_inputs` takes."""
    seg = np.zeros((rows, 24), np.int32)
    img = np.zeros((rows, 24), np.int32)
    seg[:, :19] = 1
    img[:, 2:18] = 1
    slot, start, _ = layout.image_slots(jnp.asarray(seg), jnp.asarray(img), slots)
    x0 = jax.random.normal(jax.random.key(1), (rows, slots, 8, 8, m.latent_channels))
    eps = jax.random.normal(jax.random.key(2), x0.shape)
    return jnp.asarray(img), slot, start, x0, eps


def test_training_inputs(tiny_config):
    cfg = tiny_config(None, ["diffusion.mode=rolling"])
    m = cfg.model
    g, c = 4, 4
    sched = ddpm.make_schedule("cosine", T)
    img, slot, start, x0, eps = _one_image_rows(m, rows=6, slots=2)
    out = rolling.training_inputs(
        jax.random.key(5), sched, x0, eps, jnp.asarray(img), slot, start, m.patch_size, 2, 0.3
    )
    t_BMI, w_BMI = np.asarray(out["t_BMI"])[:, 0], np.asarray(out["weight_BMI"])[:, 0]
    attn = np.asarray(out["attn_image_ids_BT"])[:, 2:18].reshape(6, g, c)
    xt = np.asarray(out["xt_BMhwC"])[:, 0]
    for b in range(6):
        t_rows = t_BMI[b].reshape(g, c)
        assert (t_rows == t_rows[:, :1]).all()  # one level per patch row
        window = np.flatnonzero(w_BMI[b].reshape(g, c)[:, 0])
        assert len(window) in (1, 2) and (np.diff(window) == 1).all()
        r0 = window[0]
        # Before the window: clean context (index 0), one attention block per row.
        assert (t_rows[:r0] == 0).all()
        ids = attn[b][:, 0]
        assert len(set(ids[:r0].tolist())) == r0 and (attn[b] == attn[b][:, :1]).all()
        # The window shares one block; rows after it share another, at pure noise.
        assert len(set(ids[window].tolist())) == 1 and ids[window[0]] not in ids[:r0]
        after = np.arange(window[-1] + 1, g)
        assert (t_rows[after] == T - 1).all() and len(set(ids[after].tolist())) <= 1
        if len(after):
            assert ids[after[0]] not in ids[: window[-1] + 1]
        # Noise levels rise along the window, and noisy rows really are noised at that level.
        assert (np.diff(t_rows[:, 0]) >= 0).all()
        abar = sched.alphas_cumprod[t_rows[-1, 0]]
        want = (
            np.sqrt(abar) * np.asarray(x0)[b, 0, 6:] + np.sqrt(1 - abar) * np.asarray(eps)[b, 0, 6:]
        )
        np.testing.assert_allclose(xt[b, 6:], want, rtol=1e-4, atol=1e-4)
    # The windowed loss averages only window patches.
    eps_hat = eps + jnp.asarray(np.repeat(np.arange(4.0), 2)[None, None, :, None, None])
    loss, per_image, n = rolling.windowed_diffusion_loss(
        eps_hat, eps, out["weight_BMI"], jnp.ones((6, 2), bool), m.patch_size, out["norm_BM"]
    )
    rows_sq = np.arange(4.0) ** 2
    for b in range(6):
        win = np.flatnonzero(w_BMI[b].reshape(g, c)[:, 0])
        np.testing.assert_allclose(float(per_image[b, 0]), rows_sq[win].mean(), rtol=1e-6)
    # loss_norm="full": the same sums over a full window's patches (W·c = 8), so a window that
    # hangs past the last row (one row here) weighs that row as a full window would.
    full = rolling.training_inputs(
        jax.random.key(5), sched, x0, eps, img, slot, start, m.patch_size, 2, 0.3,
        loss_norm="full",
    )  # fmt: skip
    np.testing.assert_array_equal(full["weight_BMI"], out["weight_BMI"])
    np.testing.assert_array_equal(full["norm_BM"], np.full((6, 2), 2 * c))
    _, per_image_full, _ = rolling.windowed_diffusion_loss(
        eps_hat, eps, full["weight_BMI"], jnp.ones((6, 2), bool), m.patch_size, full["norm_BM"]
    )
    for b in range(6):
        win = np.flatnonzero(w_BMI[b].reshape(g, c)[:, 0])
        np.testing.assert_allclose(float(per_image_full[b, 0]), rows_sq[win].sum() / 2, rtol=1e-6)
    assert {len(np.flatnonzero(w_BMI[b].reshape(g, c)[:, 0])) for b in range(6)} == {1, 2}


def test_cached_window_equals_training_forward(tiny_config):
    """What the rolling sampler computes (finished rows in the cache, written one row at a time
    at t = 0; the model run on the window only) equals the training forward pass over the whole
    image with the rolling attention ids — with pure-noise rows after the window (r0 = 1) and
    with the window at the bottom (r0 = 2)."""
    cfg, model, params = tiny_model(tiny_config)
    m, g, c, W = cfg.model, 4, 4, 2
    prefix = [1, 17, 23, 4]  # BOS, two words, BOI
    L = len(prefix) + 16 + 1
    tokens = np.array([prefix + [0] * 16 + [5]], np.int32)
    seg = np.ones((1, L), np.int32)
    pos = np.arange(L)[None].astype(np.int32)
    img = np.zeros((1, L), np.int32)
    img[0, 4:20] = 1
    row = np.zeros((1, L), np.int32)
    row[0, 4:20] = np.arange(16) // c
    lat = np.asarray(jax.random.normal(jax.random.key(0), (1, 1, 8, 8, m.latent_channels)))
    slot, start, _ = layout.image_slots(jnp.asarray(seg), jnp.asarray(img), 1)
    fwd = jax.jit(lambda *a: forward(model, params, *a)[1])

    @jax.jit
    def write(cache, a, tok_c, seg_c, pos_c, img_c, attn_c, lat_in, t_in):
        s, st, _ = layout.image_slots(seg_c, img_c, lat_in.shape[1])
        return forward(
            model,
            params,
            tok_c,
            seg_c,
            pos_c,
            attn_c,
            s,
            st,
            lat_in,
            t_in,
            cache=cache,
            index_B=a[None],
        )

    for r0 in (1, 2):
        attn = np.asarray(rolling.attention_image_ids(jnp.asarray(img), jnp.asarray(row), r0, W, g))
        t_rows = np.array([0] * r0 + [300, 700][: g - r0] + [999] * max(g - r0 - W, 0))[:g]
        t_BMI = jnp.asarray(np.repeat(t_rows, c)[None, None])
        eps_full = fwd(tokens, seg, pos, attn, slot, start, lat, t_BMI)

        def chunk(a, n, latents, t, attn=attn):
            sl = slice(a, a + n)
            return (
                jnp.int32(a),
                tokens[:, sl],
                seg[:, sl],
                pos[:, sl],
                img[:, sl],
                attn[:, sl],
                latents,
                t,
            )

        cache = kv_cache.init_cache(m.n_layers, 1, 48, m.kv_heads, m.head_dim, jnp.float32)
        no_img = (jnp.zeros((1, 0, 8, 8, m.latent_channels)), jnp.zeros((1, 0, 16), jnp.int32))
        _, _, cache = write(cache, *chunk(0, 4, *no_img))
        for r in range(r0):  # finished rows, committed one at a time, clean (t = 0)
            row_lat = lat[:, :, 2 * r : 2 * r + 2]
            _, _, cache = write(
                cache, *chunk(4 + r * c, c, row_lat, jnp.zeros((1, 1, c), jnp.int32))
            )
        a = 4 + r0 * c
        win_lat = lat[:, :, 2 * r0 : 2 * (r0 + W)]
        _, eps_win, _ = write(cache, *chunk(a, W * c, win_lat, t_BMI[:, :, r0 * c : (r0 + W) * c]))
        want = np.asarray(eps_full)[:, :, 2 * r0 : 2 * (r0 + W)]
        np.testing.assert_allclose(np.asarray(eps_win), want, rtol=1e-4, atol=1e-5)


def test_rolling_generation_streams_rows_top_to_bottom(tiny_config, tmp_path, monkeypatch):
    """Rows reach `on_row` top to bottom, each once; `sample.RowStream` (the streaming API)
    records them, builds one frame per row (that row's pixels shown, grey below) and writes an
    animated PNG and a strip per image. The sampler runs the init pass with the schedule the
    checkpoint's config names (here "joint")."""
    import dataclasses

    from PIL import Image

    from tfx_jax.data.tokenizer import Tokenizer, train_tokenizer
    from tfx_jax.generate import sample

    cfg, _, params = tiny_model(tiny_config)
    cfg = dataclasses.replace(
        cfg, diffusion=dataclasses.replace(cfg.diffusion, rolling_init_schedule="joint")
    )
    plans = []
    plan_fn = rolling.sampling_plan
    monkeypatch.setattr(
        rolling, "sampling_plan", lambda *a, **k: plans.append(plan_fn(*a, **k)) or plans[-1]
    )
    tok = Tokenizer(train_tokenizer([f"shape number {i} is red" for i in range(50)], 300))
    seen = []
    stream = sample.RowStream(on_row=lambda b, r, x: seen.append((b, r, np.array(x))))
    opts = sample.SampleOptions(
        max_new_tokens=2, diffusion_steps=4, sampler="ddpm", guidance_scale=None, seed=1
    )
    prompts = [sample.Prompt("a red", force_image=True), sample.Prompt("blue", force_image=True)]
    res = sample.generate(cfg, params, tok, prompts, opts, on_row=stream)
    for b in range(2):
        rows = [(r, x) for bb, r, x in seen if bb == b]
        assert [r for r, _ in rows] == [0, 1, 2, 3]  # top to bottom, each row once
        image = res[b].pieces[0]
        assert image.kind == "image" and image.latents.shape == (8, 8, 4)
        np.testing.assert_array_equal(np.concatenate([x for _, x in rows]), image.latents)
        np.testing.assert_array_equal(np.concatenate(stream.rows[(b, 0)]), image.latents)
        assert np.isfinite(image.latents).all()
    assert [(b, r) for b, _, r in stream.arrivals] == [(b, r) for b, r, _ in seen]
    joint = rolling.local_times(np.linspace(1, 0, 5)[:, None], np.arange(2), 0, 2, True, "joint")
    np.testing.assert_allclose(plans[0][0].taus, joint)  # 4 steps: W = 2 rows x 2 a row

    frames = stream.frames((0, 0))  # no VAE: latent previews, 4x the latent
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)
    for k, f in enumerate(frames):  # after row k: pixel rows [0, 8(k + 1)) shown, grey below
        assert (f[8 * (k + 1) :] == 128).all() and (f[: 8 * (k + 1)] != 128).any()
    paths = stream.write(tmp_path)
    want = {f"stream_{b}_0{s}.png" for b in (0, 1) for s in ("", "_strip")}
    assert {p.name for p in paths} == want
    with Image.open(tmp_path / "stream_0_0.png") as im:
        assert im.n_frames == 4 and im.size == (32, 32)  # an animated PNG, a frame per row
    with Image.open(tmp_path / "stream_0_0_strip.png") as im:
        assert im.size == (4 * 32 + 3 * sample.RowStream.GAP, 32)


def test_context_noise_training_inputs(tiny_config):
    """`context_tau` (issue 15, exposure bias) puts the rows above the window at level
    round(τ_ctx·T), noised by q, still with weight 0; the window and the rows after it are the
    same as with clean context."""
    m = tiny_config(None, ["diffusion.mode=rolling"]).model
    g, c = 4, 4
    sched = ddpm.make_schedule("cosine", T)
    img, slot, start, x0, eps = _one_image_rows(m, rows=16, slots=1)
    args = (jax.random.key(5), sched, x0, eps, jnp.asarray(img), slot, start, m.patch_size, 2, 0.3)
    clean = jax.tree.map(np.asarray, rolling.training_inputs(*args))
    noisy = jax.tree.map(np.asarray, rolling.training_inputs(*args, context_tau=0.1))
    ctx_t = round(0.1 * T) - 1  # level 100 -> schedule index 99
    np.testing.assert_array_equal(noisy["weight_BMI"], clean["weight_BMI"])
    np.testing.assert_array_equal(noisy["attn_image_ids_BT"], clean["attn_image_ids_BT"])
    seen_context = 0
    for b in range(16):
        t_c, t_n = clean["t_BMI"][b, 0].reshape(g, c), noisy["t_BMI"][b, 0].reshape(g, c)
        r0 = int(np.flatnonzero(clean["weight_BMI"][b, 0].reshape(g, c)[:, 0])[0])
        seen_context += r0
        assert (t_c[:r0] == 0).all() and (t_n[:r0] == ctx_t).all()
        np.testing.assert_array_equal(t_n[r0:], t_c[r0:])  # window and after: unchanged
        np.testing.assert_array_equal(
            noisy["xt_BMhwC"][b, 0, 2 * r0 :], clean["xt_BMhwC"][b, 0, 2 * r0 :]
        )
        abar = sched.alphas_cumprod[ctx_t]
        want = np.sqrt(abar) * np.asarray(x0)[b, 0, : 2 * r0]
        want = want + np.sqrt(1 - abar) * np.asarray(eps)[b, 0, : 2 * r0]
        np.testing.assert_allclose(noisy["xt_BMhwC"][b, 0, : 2 * r0], want, rtol=1e-4, atol=1e-4)
    assert seen_context > 0  # some images were drawn with rows above the window


def test_context_noise_config_range(tiny_config):
    from tfx_jax.config import ConfigError, validate

    for bad in ("0.7", "-0.1"):
        cfg = tiny_config(
            None, ["diffusion.mode=rolling", f"diffusion.rolling_context_noise={bad}"]
        )
        with pytest.raises(ConfigError, match=rf"diffusion.rolling_context_noise={bad} must be"):
            validate(cfg)
    validate(tiny_config(None, ["diffusion.mode=rolling", "diffusion.rolling_context_noise=0.5"]))
    # The sampler shows a model the context it was trained on: the checkpoint's level in rolling
    # mode (0.1 by default), clean for a model trained with standard diffusion.
    from tfx_jax.generate.decode import Decoder
    from tfx_jax.sharding import make_mesh

    for sets, level in ((["diffusion.mode=rolling"], 100), ([], 0)):
        cfg = tiny_config(None, sets)
        assert Decoder(cfg, make_mesh(cfg.mesh)).context_level == level
    for key, bad in (("rolling_init_schedule", "stairs"), ("rolling_loss_norm", "mean")):
        cfg = tiny_config(None, ["diffusion.mode=rolling", f"diffusion.{key}={bad}"])
        with pytest.raises(ConfigError, match=rf"diffusion.{key}='{bad}': "):
            validate(cfg)


def test_rolling_generation_with_context_noise(tiny_config, monkeypatch):
    """With `rolling_context_noise` the sampler writes each finished row into the cache noised
    to the context level (a different cache than the clean commit), while the rows it returns
    and streams stay the clean x0: finite, row 0 (before any context exists) as without
    context noise, the rows below it conditioned on the noisier context."""
    from tfx_jax.data.tokenizer import Tokenizer, train_tokenizer
    from tfx_jax.generate import sample

    _, _, params = tiny_model(tiny_config)
    sets = ["diffusion.mode=rolling", "diffusion.rolling_window=2"]
    cfg0 = tiny_config(None, [*sets, "diffusion.rolling_context_noise=0"])
    cfg = tiny_config(None, [*sets, "diffusion.rolling_context_noise=0.1"])
    tok = Tokenizer(train_tokenizer([f"shape number {i} is red" for i in range(50)], 300))
    opts = sample.SampleOptions(
        max_new_tokens=2, diffusion_steps=4, sampler="ddpm", guidance_scale=None, seed=1
    )
    prompts = [sample.Prompt("a red", force_image=True)]
    commits = []

    class SpyDecoder(sample.Decoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.commit_context = self._spy(self.commit_context)

        def _spy(self, commit_context):
            def call(params, cache, index, chunk, row, key):
                out = commit_context(params, cache, index, chunk, row, key)
                clean = self.commit(params, cache, index, chunk, row)
                commits.append((np.asarray(out.k), np.asarray(clean.k)))
                return out

            return call

    def latents(c, decoder):
        monkeypatch.setattr(sample, "Decoder", decoder)
        seen = []
        res = sample.generate(c, params, tok, prompts, opts, on_row=lambda b, r, x: seen.append(x))
        image = res[0].pieces[0]
        assert image.kind == "image"
        np.testing.assert_array_equal(np.concatenate(seen), image.latents)  # streamed = returned
        return image.latents

    base = latents(cfg0, sample.Decoder)
    ctx = latents(cfg, SpyDecoder)
    assert len(commits) == 4  # one per row of the 4-row image
    for noisy_k, clean_k in commits:
        assert not np.array_equal(noisy_k, clean_k)
    assert np.isfinite(ctx).all()
    np.testing.assert_array_equal(ctx[:2], base[:2])  # row 0: the init pass, no context yet
    assert not np.array_equal(ctx[2:], base[2:])


def test_training_step_reads_the_rolling_options(tiny_config):
    """`forward_losses` passes `rolling_loss_norm` and `rolling_init_schedule` through. With the
    same key (same noise, starts and times), "full" divides each image's summed window loss by
    W·c: on rolling-pass images it is "window"'s loss scaled by the share of the window inside
    the image; on init-pass images (row 0 in the window) the joint schedule changes the levels."""
    from test_sample import init_params

    from tfx_jax.data.sources import synthetic
    from tfx_jax.train.steps import forward_losses

    sets = ["diffusion.mode=rolling", "diffusion.rolling_window=2", "data.global_batch_size=16"]
    new = ["diffusion.rolling_loss_norm=full", "diffusion.rolling_init_schedule=joint"]
    cfg = tiny_config(None, sets)
    batch = synthetic.config_batch(cfg, np.random.default_rng(0))
    params, sched = init_params(cfg), ddpm.make_schedule("cosine", cfg.diffusion.num_timesteps)
    model = Transfusion(cfg.model)
    out = []
    for c in (cfg, tiny_config(None, [*sets, *new])):
        fn = jax.jit(
            lambda p, c=c: forward_losses(p, model, c, sched, batch, jax.random.key(3), True)
        )
        out.append(jax.tree.map(np.asarray, fn(params)[1]))
    old, new = out
    valid, rows_in = old["valid_BM"], old["row_weight_BMR"]
    share = rows_in.sum(-1) / 2  # window rows inside the image / W
    init = valid & (rows_in[..., 0] > 0)
    roll = valid & ~init
    # (1e-3: an init-pass image earlier in the same row is attended to, and it changed)
    np.testing.assert_allclose(new["per_image_BM"][roll], (old["per_image_BM"] * share)[roll], 1e-3)
    assert (share[roll] < 1).any() and (share[roll] == 1).any() and init.any()
    assert not np.allclose(new["per_image_BM"][init], old["per_image_BM"][init])


def test_a_checkpoint_from_before_context_noise_keeps_clean_context(tiny_config):
    """Checkpoints written before `rolling_context_noise` existed were trained with clean
    context: their saved config, which lacks the key, reads back as 0, not today's 0.1."""
    from tfx_jax.checkpoint import saved_config

    d = tiny_config(None, ["diffusion.mode=rolling"]).to_dict()
    assert saved_config({"config": d}).diffusion.rolling_context_noise == 0.1  # saved: kept
    del d["diffusion"]["rolling_context_noise"]
    assert saved_config({"config": d}).diffusion.rolling_context_noise == 0.0
    assert "rolling_context_noise" not in d["diffusion"]  # the caller's dict is left alone

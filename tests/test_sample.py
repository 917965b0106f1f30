"""Generation: the KV-cache decode path against the training forward pass, greedy decoding
against uncached decoding, guidance, end-to-end documents, and the training switches that
sampling relies on (caption dropping for CFG, the image-first noise limit)."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fast_compiles
from model_helpers import forward

from tfx_jax import layout, sharding
from tfx_jax.config import ConfigError, load_config
from tfx_jax.data import encoded, sequence
from tfx_jax.data.tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID, Tokenizer, train_tokenizer
from tfx_jax.diffusion import ddpm, samplers
from tfx_jax.generate import command, sample
from tfx_jax.generate.decode import TEXT_GUIDANCE_ALPHA, Decoder
from tfx_jax.generate.documents import write_documents
from tfx_jax.generate.options import SampleOptions
from tfx_jax.layout import ModelInputs
from tfx_jax.models import kv_cache
from tfx_jax.models.transformer import Transfusion

REPO = pathlib.Path(__file__).resolve().parent.parent

# Every test here compiles many small programs and runs each a few times, and compares results
# made within the test (or checks them with tolerances).
pytestmark = pytest.mark.usefixtures("fast_compile")


def make(arg=None, overrides=()):
    return load_config(f"{REPO / 'experiments' / 'tiny.py'}{':' + arg if arg else ''}", overrides)


# The weights depend on the model's settings alone (the dummy inputs' shapes are fixed here), and
# no test writes into them: one init (one compile) per model config and seed serves every test.
_PARAMS = {}


def init_params(cfg, seed=0):
    if (cfg.model, seed) not in _PARAMS:
        model = Transfusion(cfg.model)
        inputs = ModelInputs.dummy(cfg, length=8, images=1)
        init = jax.jit(lambda key: nn.meta.unbox(model.init(key, inputs)["params"]))
        _PARAMS[cfg.model, seed] = init(jax.random.key(seed))
    return _PARAMS[cfg.model, seed]


@pytest.fixture(scope="module")
def tiny():
    cfg = make()
    return cfg, init_params(cfg)


@pytest.fixture(scope="module")
def tokenizer():
    words = ["red", "blue", "green", "circle", "square", "top", "left", "a", "small", "big"]
    texts = [" ".join(words[(i * k) % 10] for k in range(1, 6)) for i in range(60)]
    return Tokenizer(train_tokenizer(texts, 300))


# ----------------------------------------------------------------------------- the decode path


def two_documents(m, T=44):
    """Two rows: text, an image block, more text; the second row is shorter (padding after)."""
    rng = np.random.default_rng(0)
    I = m.num_patches
    tok = rng.integers(6, m.vocab_size, (2, T)).astype(np.int32)
    seg = np.ones((2, T), np.int32)
    seg[1, 37:] = 0
    img = np.zeros((2, T), np.int32)
    img[0, 5 : 5 + I] = 1
    img[1, 9 : 9 + I] = 1
    pos = np.broadcast_to(np.arange(T), (2, T)).astype(np.int32)
    lat = jnp.asarray(rng.normal(size=(2, 1, 8, 8, m.latent_channels)), jnp.float32)
    t = jnp.asarray(np.array([300, 40])[:, None, None] * np.ones((1, 1, I), int))
    return tok, seg, pos, img, lat, t


@pytest.mark.parametrize("arg", [None, "unet"])
def test_cached_decoding_equals_uncached_forward(arg):
    """Prefill, an image block as one chunk and then one token at a time, each row at its own
    cache index, give the training forward pass's logits (text) and ε̂ (image block)."""
    cfg = make(arg)
    m = cfg.model
    params = init_params(cfg)
    model = Transfusion(m)
    tok, seg, pos, img, lat, t = two_documents(m)
    slot, start, _ = layout.image_slots(jnp.asarray(seg), jnp.asarray(img), 1)
    full_forward = jax.jit(lambda *args: forward(model, params, *args))
    logits_full, eps_full = full_forward(tok, seg, pos, img, slot, start, lat, t)

    # Row 0 caches [0, 5) then its image [5, 21); row 1 caches [0, 9) then its image [9, 25):
    # one call per chunk for both rows, different offsets per row.
    cache = kv_cache.init_cache(m.n_layers, 2, 64, m.kv_heads, m.head_dim, jnp.float32)
    first = np.array([5, 9])
    I = m.num_patches

    def apply(cache, index, tok_c, seg_c, pos_c, img_c, lat_in, t_in):
        s, st, _ = layout.image_slots(seg_c, img_c, lat_in.shape[1])
        return forward(
            model,
            params,
            tok_c,
            seg_c,
            pos_c,
            img_c,
            s,
            st,
            lat_in,
            t_in,
            cache=cache,
            index_B=index,
        )

    # Jitted: one compile per chunk shape costs less than running the model op by op.
    jit_apply = jax.jit(apply)

    def call(cache, a, n, with_image, active=(True, True)):
        """Writes positions [a_b, a_b + n) of each row at cache slot a_b (inactive rows write
        padding there, as idle rows do during generation)."""
        take = lambda x: np.stack([x[b, a[b] : a[b] + n] for b in range(2)])
        seg_c = take(seg) * np.asarray(active)[:, None]
        lat_in = lat if with_image else jnp.zeros((2, 0, 8, 8, m.latent_channels))
        t_in = t if with_image else jnp.zeros((2, 0, I), jnp.int32)
        return jit_apply(
            cache, jnp.asarray(a), take(tok), seg_c, take(pos), take(img), lat_in, t_in
        )

    full = np.asarray(logits_full)
    l_pre, _, cache = call(cache, np.array([0, 0]), 5, False)
    np.testing.assert_allclose(np.asarray(l_pre), full[:, :5], atol=2e-5)
    l_more, _, cache = call(cache, np.array([5, 5]), 4, False, active=(False, True))
    np.testing.assert_allclose(np.asarray(l_more[1]), full[1, 5:9], atol=2e-5)
    _, eps_img, cache = call(cache, first, I, True)
    np.testing.assert_allclose(np.asarray(eps_img), np.asarray(eps_full), rtol=1e-4, atol=1e-6)
    for step in range(tok.shape[1] - first.min() - I):
        idx = first + I + step
        live = idx < tok.shape[1]
        l_tok, _, cache = call(cache, np.minimum(idx, tok.shape[1] - 1), 1, False, tuple(live))
        for b in np.flatnonzero(live):
            np.testing.assert_allclose(np.asarray(l_tok[b, 0]), full[b, idx[b]], atol=2e-5)


@pytest.mark.parametrize("image_attention", ["bidirectional", "causal"])
def test_image_sampling_with_prefix_cache_equals_uncached_sampling(tiny, image_attention):
    """DDIM over an image block with the prefix cached (the block alone per step) gives the same
    image as running the whole sequence through the training forward pass at every step — with
    causal image attention too, where the block denoised as one chunk is causal inside."""
    cfg, params = tiny  # the mask has no parameters: the same weights serve both
    if image_attention != "bidirectional":
        cfg = make(None, [f"model.image_attention={image_attention}"])
    m = cfg.model
    I = m.num_patches
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    dec = Decoder(cfg, mesh, SampleOptions(sampler="ddim", diffusion_steps=5, guidance_scale=None))
    model = Transfusion(m)
    prefix = np.array([[BOS_ID, 40, 41, 42, 43, 44, BOI_ID]], np.int32)
    P = prefix.shape[1]
    x_T = jax.random.normal(jax.random.key(4), (1, 1, 8, 8, m.latent_channels))

    cache = dec.new_cache(1, 64)
    chunk = {
        k: jnp.asarray(v)
        for k, v in dict(
            tokens=prefix,
            segment_ids=np.ones_like(prefix),
            positions=np.arange(P)[None],
            image_ids=np.zeros_like(prefix),
            attn_image_ids=np.zeros_like(prefix),
        ).items()
    }
    allowed = jnp.ones((1, m.vocab_size), bool)
    _, cache = dec.prefill(
        params,
        cache,
        jnp.zeros(1, jnp.int32),
        chunk,
        jnp.zeros((1, 0, 8, 8, 4)),
        jnp.array([P - 1]),
        jax.random.key(0),
        allowed,
    )
    block = {
        "tokens": np.zeros((1, I)),
        "segment_ids": np.ones((1, I)),
        "positions": P + np.arange(I)[None],
        "image_ids": np.ones((1, I)),
        "attn_image_ids": np.ones((1, I)),
    }
    block = {k: jnp.asarray(v, jnp.int32) for k, v in block.items()}
    x0_cached = dec.image_full(params, cache, jnp.array([P]), block, x_T, jax.random.key(1))

    seq = {
        "tokens": np.concatenate([prefix, np.zeros((1, I), np.int32)], 1),
        "segment_ids": np.ones((1, P + I), np.int32),
        "positions": np.arange(P + I)[None].astype(np.int32),
        "image_ids": np.concatenate([np.zeros((1, P)), np.ones((1, I))], 1).astype(np.int32),
    }
    slot, start, _ = layout.image_slots(seq["segment_ids"], seq["image_ids"], 1)

    def denoise(x, t):
        t_BMI = jnp.full((1, 1, I), t, jnp.int32)
        args = (seq["tokens"], seq["segment_ids"], seq["positions"], seq["image_ids"])
        return forward(model, params, *args, slot, start, x, t_BMI)[1]

    sched = ddpm.make_schedule("cosine", 1000)
    x0_full = samplers.sample(
        denoise, x_T, sched, dec.timesteps, "ddim", jax.random.key(1), dec.clip_x0
    )
    np.testing.assert_allclose(np.asarray(x0_cached), np.asarray(x0_full), rtol=1e-4, atol=1e-4)


def greedy_uncached(cfg, params, prompt_ids, n_new, tokenizer_vocab, T=32):
    """Brute force: the full forward pass over the whole sequence for every new token (the row
    is padded to T; padding after the last token cannot change its logits)."""
    model = Transfusion(cfg.model)
    allowed = sample._allowed_tokens(cfg.model.vocab_size, tokenizer_vocab)
    allowed[BOI_ID] = False
    full_logits = jax.jit(
        lambda x, seg: forward(
            model,
            params,
            x,
            seg,
            jnp.arange(T)[None],
            jnp.zeros_like(x),
            jnp.zeros_like(x) - 1,
            jnp.zeros((1, 1), jnp.int32),
            jnp.zeros((1, 1, 8, 8, 4)),
            jnp.zeros((1, 1, 16), jnp.int32),
        )[0]
    )
    ids = list(prompt_ids)
    out = []
    for _ in range(n_new):
        x = np.zeros((1, T), np.int32)
        x[0, : len(ids)] = ids
        logits = full_logits(x, (np.arange(T) < len(ids))[None].astype(np.int32))
        nxt = int(np.argmax(np.where(allowed, np.asarray(logits[0, len(ids) - 1]), -np.inf)))
        out.append(nxt)
        if nxt == EOS_ID:
            break
        ids.append(nxt)
    return out


def test_greedy_generation_equals_uncached_greedy_decoding(tiny, tokenizer):
    """Three prompts of different lengths, batched and sharded on the 8-device mesh (padded to
    8 rows), decode exactly what token-by-token uncached argmax decoding gives."""
    cfg, params = tiny
    prompts = ["red circle", "a small blue square at the top left", "green"]
    opts = sample.SampleOptions(max_new_tokens=5, max_images=0, guidance_scale=None)
    results = sample.generate(cfg, params, tokenizer, prompts, opts)
    assert len(results) == 3
    for prompt, res in zip(prompts, results, strict=True):
        ids = [BOS_ID] + tokenizer.encode(prompt)
        want = greedy_uncached(cfg, params, ids, 5, tokenizer.vocab_size)
        assert res.token_ids == want, (prompt, res.token_ids, want)
        assert res.stop == ("eos" if want[-1] == EOS_ID else "max_new_tokens")
        assert res.images == []


def test_cache_and_batch_are_sharded_over_the_data_axis(tiny):
    cfg, _ = tiny
    dec = Decoder(cfg, sharding.make_mesh(cfg.mesh))
    assert dec.batch_parallel() == 8
    cache = dec.new_cache(8, 16)
    assert len(cache.k.addressable_shards) == 8
    assert cache.k.addressable_shards[0].data.shape == (cfg.model.n_layers, 1, 16, 4, 16)
    assert dec.put(np.zeros((8, 3), np.int32)).addressable_shards[0].data.shape == (1, 3)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_vae():
    from tfx_jax.models.vae import VAE

    model = VAE(latent_channels=4, downsample=4, channels=(8, 16))
    init = jax.jit(lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, 32, 32, 3)))["params"]))
    with fast_compiles():  # a module fixture: set up before the tests' `fast_compile`
        params = init(jax.random.key(0))
    return model, params, 1.0


def test_generate_writes_markdown_and_html_with_pngs(tiny, tokenizer, tiny_vae, tmp_path):
    cfg, params = tiny
    lat = np.asarray(jax.random.normal(jax.random.key(2), (8, 8, 4)))
    prompts = [
        sample.Prompt("a red circle", force_image=True),  # text to image
        sample.Prompt("<image> a", images=(lat,)),  # image to text
        "blue square",
    ]
    opts = sample.SampleOptions(
        max_new_tokens=4,
        diffusion_steps=3,
        temperature=1.0,
        top_k=50,
        top_p=0.9,
        sampler="ddpm",
        guidance_scale=None,
        seed=3,
    )
    results = sample.generate(cfg, params, tokenizer, prompts, opts, vae=tiny_vae)
    forced = results[0]
    assert forced.pieces[0].kind == "image" and forced.pieces[0].image.shape == (32, 32, 3)
    assert forced.pieces[0].image.dtype == np.uint8
    assert forced.token_ids[0] == EOI_ID  # EOI follows the image, then text
    for res in results:
        assert sum(t not in (BOI_ID, EOI_ID) for t in res.token_ids) <= 4
        assert len(res.images) <= 1
        assert res.stop in ("eos", "max_new_tokens")
    assert results[1].prompt_pieces[0].kind == "image"
    assert results[1].prompt_pieces[0].image.shape == (32, 32, 3)

    paths = write_documents(results, tmp_path)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert md.count("## Sample") == 3 and "<img" in page and "](images/" in md
    assert len(paths["images"]) >= 2
    for png in paths["images"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"images/{png.name}" in md and f"images/{png.name}" in page


def test_causal_image_model_generates(tiny, tokenizer):
    """A causal-image model (`model.image_attention=causal`) draws an image for a forced prompt
    and captions a prompt image through `generate`, with guidance; the same weights and seed
    draw a different image than with bidirectional attention."""
    cfg, params = tiny
    causal = make(None, ["model.image_attention=causal"])
    lat = np.asarray(jax.random.normal(jax.random.key(2), (8, 8, 4)))
    prompts = [sample.Prompt("a red circle", force_image=True), sample.Prompt("<image> a", (lat,))]
    opts = sample.SampleOptions(
        max_new_tokens=3, temperature=0.0, diffusion_steps=3, guidance_scale=3.0, clip_x0=0
    )
    drawn, captioned = sample.generate(causal, params, tokenizer, prompts, opts)
    x = drawn.images[0].latents
    assert x.shape == (8, 8, 4) and np.isfinite(x).all()
    assert captioned.prompt_pieces[0].kind == "image" and captioned.token_ids
    bidirectional = sample.generate(cfg, params, tokenizer, prompts[:1], opts)[0]
    assert np.abs(bidirectional.images[0].latents - x).max() > 1e-3


def test_guidance_scale_one_equals_the_conditional_prediction(tiny, tokenizer):
    """With s = 1 the unconditional twins run in the same batch but ε̂ = ε̂_c: the same image
    and the same text as no guidance; s = 4 changes the image."""
    cfg, params = tiny
    prompts = [sample.Prompt("red", force_image=True), sample.Prompt("a blue", force_image=True)]

    def run(scale):
        # No x̂_0 clipping: random weights saturate it, hiding the guidance difference.
        opts = sample.SampleOptions(
            max_new_tokens=3, temperature=0.0, diffusion_steps=4, guidance_scale=scale, clip_x0=0
        )
        return sample.generate(cfg, params, tokenizer, prompts, opts)

    plain, one, four = run(None), run(1.0), run(4.0)
    for a, b, c in zip(plain, one, four, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.images[0].latents, b.images[0].latents, rtol=1e-4, atol=1e-5)
        assert np.abs(a.images[0].latents - c.images[0].latents).max() > 1e-3


def test_text_guidance(tiny, tokenizer):
    """Text guidance (captions): without images a prompt's twin is the prompt itself, so any
    scale decodes what plain greedy does — the twins' cache slots and positions track their
    prompts'; the guided scores are l_u + s (l_c − l_u) over the plausible tokens, EOS unguided;
    an image prompt decodes; and asking for images too is refused by name."""
    cfg, params = tiny
    prompts = ["red circle", "a small blue square at the top left", "green"]

    def opts(scale):
        return sample.SampleOptions(
            max_new_tokens=6, max_images=0, guidance_scale=None, text_guidance=scale
        )

    plain = sample.generate(cfg, params, tokenizer, prompts, opts(1.0))
    guided = sample.generate(cfg, params, tokenizer, prompts, opts(3.0))
    assert [r.token_ids for r in guided] == [r.token_ids for r in plain]

    dec = Decoder(cfg, sharding.make_mesh(cfg.mesh), opts(3.0))
    V = cfg.model.vocab_size
    logits = jax.random.normal(jax.random.key(1), (4, V)) * 4  # rows: 2 prompts, 2 twins
    out = np.asarray(dec._text_logits(logits, jnp.ones((2, V), bool)))
    c, u = (np.asarray(jax.nn.log_softmax(x)) for x in (logits[:2], logits[2:]))
    want = u + 3.0 * (c - u)
    want[:, EOS_ID] = c[:, EOS_ID]
    plausible = c >= c.max(-1, keepdims=True) + np.log(TEXT_GUIDANCE_ALPHA)
    np.testing.assert_allclose(out[plausible], want[plausible], rtol=1e-5, atol=1e-5)
    assert (out[~plausible] == np.finfo(np.float32).min).all() and (~plausible).any()

    latent = np.random.default_rng(0).normal(size=(8, 8, cfg.model.latent_channels))
    with_image = sample.Prompt(f"{sample.IMAGE_PLACEHOLDER} red", (latent,))
    (res,) = sample.generate(cfg, params, tokenizer, [with_image], opts(3.0))
    assert res.token_ids and res.images == []
    with pytest.raises(ConfigError, match="text_guidance.*max_images=0"):
        sample.SampleOptions(text_guidance=2.0).validate()


# ----------------------------------------------------------------------------- training switches


def encode(text):
    return [10 + len(w) for w in text.split()]


def to_seq(example, rng, spec):
    """The one sequence `sequence.to_sequence` makes of a short raw example (tokenized as
    `data encode` would)."""
    (seq,) = sequence.to_sequence(encoded.encode_example(example, encode, (4, 4, 2)), rng, spec)
    return seq


def test_caption_dropping():
    ex = {"kind": "caption", "text": "a red dot", "latents": np.ones((1, 4, 4, 2), np.float32)}
    drop = sequence.SequenceSpec(24, 2, 2, caption_drop_prob=1.0)
    seq = to_seq(ex, np.random.default_rng(0), drop)
    assert seq["tokens"].tolist() == [BOS_ID, BOI_ID, 0, 0, 0, 0, EOI_ID, EOS_ID]
    assert seq["image_ids"].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    # p = 0 draws nothing extra: the same sequence as a spec without the field.
    rngs = [np.random.default_rng(s) for s in range(2)]
    a = to_seq(ex, rngs[0], sequence.SequenceSpec(24, 2, 2))
    b = to_seq(ex, rngs[1], sequence.SequenceSpec(24, 2, 2, caption_drop_prob=0.0))
    c = to_seq(ex, np.random.default_rng(0), sequence.SequenceSpec(24, 2, 2))
    assert a["tokens"].tolist() == c["tokens"].tolist()
    assert b is not None
    # p = 0.3: about 30% of caption examples lose their caption; other kinds never do.
    spec = sequence.SequenceSpec(24, 2, 2, caption_drop_prob=0.3)
    rng = np.random.default_rng(1)
    dropped = [len(to_seq(ex, rng, spec)["tokens"]) == 8 for _ in range(2000)]
    assert 0.27 < np.mean(dropped) < 0.33
    inter = {"kind": "interleaved", "text": "one <image> two", "latents": np.ones((1, 4, 4, 2))}
    always = sequence.SequenceSpec(24, 2, 2, caption_drop_prob=1.0)
    seq = to_seq(inter, rng, always)
    assert seq["tokens"].tolist() == [BOS_ID, 13, BOI_ID, 0, 0, 0, 0, EOI_ID, 13, EOS_ID]


def test_image_first_flag():
    ex = {"kind": "caption", "text": "a red dot", "latents": np.ones((1, 4, 4, 2), np.float32)}
    for first_prob, mark, want in [(0.0, True, 1), (1.0, True, 0), (0.0, False, 0)]:
        spec = sequence.SequenceSpec(24, 2, 2, caption_first_prob=first_prob, mark_image_first=mark)
        seq = to_seq(ex, np.random.default_rng(0), spec)
        img = seq["image_ids"]
        assert (seq["tokens"][img > 0] == want).all() and (seq["tokens"][img == 0] != 1).sum() >= 0
        seg = jnp.ones((1, len(img)), jnp.int32)
        _, start, _ = layout.image_slots(seg, jnp.asarray(img)[None], 1)
        flag = layout.image_first(jnp.asarray(seq["tokens"])[None], jnp.asarray(img)[None], start)
        assert bool(flag[0, 0]) == bool(want)


@pytest.mark.parametrize("limit", [False, True])
def test_noise_limit_for_images_before_their_caption(limit):
    """With the switch on, images flagged image-first train with t <= 500 of 1000; unflagged
    images and the switch off keep the full range."""
    from tfx_jax.data.sources import synthetic
    from tfx_jax.train.steps import forward_losses

    cfg = make(None, [f"diffusion.noise_limit_image_first={limit}", "data.global_batch_size=16"])
    m = cfg.model
    batch = synthetic.config_batch(cfg, np.random.default_rng(0))
    flagged = np.arange(16) % 2 == 0  # flag every image of the even rows
    batch["tokens"] = np.where(flagged[:, None] & (batch["image_ids"] > 0), 1, batch["tokens"])
    params = init_params(cfg)
    sched = ddpm.make_schedule("cosine", 1000)
    losses = jax.jit(
        lambda key: forward_losses(
            params, Transfusion(m), cfg, sched, batch, key, with_details=True
        )[1]
    )
    t_all, flags = [], []
    for seed in range(6):
        met = losses(jax.random.key(seed))
        valid = np.asarray(met["valid_BM"])
        t_all.append(np.asarray(met["t_BM"])[valid])
        flags.append(np.broadcast_to(flagged[:, None], valid.shape)[valid])
        assert np.isfinite(float(met["loss"]))
    t, f = np.concatenate(t_all), np.concatenate(flags)
    assert f.any() and (~f).any()
    assert t[~f].max() > 500
    assert (t[f].max() <= 500) == limit


def test_generate_cli(tiny, tokenizer, tmp_path):
    """What `python -m tfx_jax generate` runs once params are loaded: tokenizer from the data
    dir, no VAE there (latent previews stand in), documents written."""
    cfg, params = tiny
    cfg = load_config(str(REPO / "experiments" / "tiny.py"), [f"data.data_dir={tmp_path}"])
    tokenizer.save(tmp_path / "tokenizer.model")
    paths = command.generate_cli(
        cfg,
        params,
        ["red", "blue circle"],
        tmp_path / "out",
        SampleOptions(max_new_tokens=2, diffusion_steps=2),
        force_image=True,
    )
    md = paths["markdown"].read_text()
    assert md.count("## Sample") == 2 and md.count("](images/") == 2
    assert paths["html"].exists() and len(paths["images"]) == 2
    with pytest.raises(ConfigError, match="generate option top_p=1.5"):
        command.generate_cli(cfg, params, ["red"], tmp_path / "out", SampleOptions(top_p=1.5))

"""FLOP counting: parameter counts against the real model, attention by hand, XLA's own count."""

import dataclasses
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO

from tfx_jax.config import load_config
from tfx_jax.layout import ModelInputs
from tfx_jax.models.transformer import Transfusion
from tfx_jax.observability import flops


def _paper(size):
    return load_config(f"{REPO / 'experiments' / 'transfusion.py'}:{size}")


def _real_matmul_params(cfg) -> dict[str, int]:
    """Kernel sizes of the initialised model, grouped like `flops.matmul_params`."""
    model = Transfusion(cfg.model)
    abstract = jax.eval_shape(
        lambda r: nn.meta.unbox(model.init(r, ModelInputs.dummy(cfg))), jax.random.key(0)
    )["params"]
    out: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        names = [p.key for p in path]
        if names[0] == "embed" or names[-1] in ("scale", "bias"):
            continue  # the lookup table, norms and biases are not matmul weights
        group = {"layers": {"attn": "attention"}.get(names[1], names[1])}.get(names[0], names[0])
        out[group] = out.get(group, 0) + int(np.prod(leaf.shape))
    return out


@pytest.mark.parametrize("size", ["0.16b", "7b"])
def test_six_n_matches_real_parameter_count(size):
    cfg = _paper(size)
    real = _real_matmul_params(cfg)
    counted = flops.matmul_params(cfg.model)
    # Every component, U-Net convolutions included (7b), is counted exactly.
    assert counted == real, "matmul_params disagrees with the model's kernels: a layer changed?"

    per_token = flops.flops_per_token(cfg.model, cfg.data.seq_len)
    six_n = 6 * (real["attention"] + real["mlp"] + real["lm_head"])
    dense = per_token["attention_proj"] + per_token["mlp"] + per_token["lm_head"]
    assert dense == pytest.approx(six_n, rel=0.01)
    if cfg.model.patch_encoder == "linear":
        # Linear patch layers and the timestep MLP run once per patch.
        I = cfg.model.num_patches
        per_image = flops.flops_per_image(cfg.model)
        assert per_image["patch_in"] == 6 * real["patch_in"] * I
        assert per_image["patch_out"] == 6 * real["patch_out"] * I
        assert per_image["time_embed"] == 6 * real["time_embed"] * I


def test_attention_flops_hand_computed(tiny_config):
    m = tiny_config().model  # 2 layers, 4 heads of 16
    assert (m.n_layers, m.n_heads, m.head_dim) == (2, 4, 16)
    T = 128
    # Full square: (QK^T + AV) = 4·T·H FLOPs per query per head forward, x3 for training.
    full = 3 * 4 * 2 * 128 * 16 * 4
    assert full == 196_608
    assert flops.flops_per_token(m, T, attention="full")["attention"] == full
    assert flops.flops_per_token(m, T, attention="causal")["attention"] == full / 2
    with pytest.raises(ValueError, match="attention="):
        flops.flops_per_token(m, T, attention="sliding")


def test_grouped_query_heads_shrink_kv_projections(tiny_config):
    m = tiny_config().model
    gqa = dataclasses.replace(m, n_kv_heads=1)
    D, H, L = m.d_model, m.head_dim, m.n_layers
    assert flops.matmul_params(m)["attention"] == L * D * H * (4 + 4 + 4 + 4)
    assert flops.matmul_params(gqa)["attention"] == L * D * H * (4 + 1 + 1 + 4)


def test_tied_head_still_counts_its_matmul(tiny_config):
    m = tiny_config().model
    tied = dataclasses.replace(m, tie_embeddings=True)
    assert flops.flops_per_token(tied, 128) == flops.flops_per_token(m, 128)


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_forward_flops_match_xla_cost_analysis(tiny_config, encoder):
    """An independent count: XLA's cost analysis of the compiled forward pass.

    Layers are unrolled (XLA counts a scanned loop body once) and the XLA attention computes the
    whole masked square, so the comparison uses attention="full". XLA adds elementwise FLOPs
    (softmax, norms) and skips the zero padding of 3x3 convolutions, hence a tolerance.
    """
    cfg = tiny_config(
        overrides=[
            f"model.patch_encoder={encoder}",
            "model.d_model=256",
            "model.n_kv_heads=2",
            "model.mlp_dim=512",
            "model.vocab_size=2048",
            "model.scan_layers=false",
            "model.attention_impl=xla",
            "data.seq_len=512",
        ]
    )
    B, T = 2, cfg.data.seq_len
    model = Transfusion(cfg.model)
    inputs = ModelInputs.dummy(cfg, batch=B)
    params = jax.eval_shape(lambda r: nn.meta.unbox(model.init(r, inputs)), jax.random.key(0))
    xla = jax.jit(model.apply).lower(params, inputs).compile().cost_analysis()["flops"]
    per_token = flops.flops_per_token(cfg.model, T, attention="full")["total"]
    per_image = flops.flops_per_image(cfg.model)["total"]
    ours_forward = (B * T * per_token + B * cfg.max_images_per_row * per_image) / 3
    assert xla == pytest.approx(ours_forward, rel=0.03)


def test_train_flops_per_step(tiny_config):
    cfg = tiny_config()
    B, T, M = cfg.data.global_batch_size, cfg.data.seq_len, cfg.max_images_per_row
    tok = flops.flops_per_token(cfg.model, T)["total"]
    img = flops.flops_per_image(cfg.model)["total"]
    assert flops.train_flops_per_step(cfg) == pytest.approx(B * T * tok + B * M * img)
    assert flops.train_flops_per_step(cfg, images_per_step=3) == pytest.approx(
        B * T * tok + 3 * img
    )
    full = flops.train_flops_per_step(cfg, attention="full")
    assert full > flops.train_flops_per_step(cfg)
    # Gradient accumulation splits the same global batch: same FLOPs per optimizer step.
    accum = dataclasses.replace(
        cfg, optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=2)
    )
    assert flops.train_flops_per_step(accum) == flops.train_flops_per_step(cfg)


def test_visible_pairs_count_the_masks_allowed_pairs(tiny_config):
    """`visible_pairs` equals the dense mask's allowed (query, key) pairs over real queries, and
    the per-pair count reproduces the causal half-square's attention FLOPs on one-document rows."""
    from tfx_jax.data.sources import synthetic
    from tfx_jax.models.mask import attention_mask

    cfg = tiny_config()
    batch = synthetic.config_batch(cfg, np.random.default_rng(0))
    seg, img = batch["segment_ids"], batch["image_ids"]
    for image_attention in ("bidirectional", "causal"):
        dense = np.asarray(attention_mask(seg, seg, img, img, image_attention=image_attention))
        want = int((dense.reshape(dense.shape[0], seg.shape[1], -1) & (seg > 0)[..., None]).sum())
        assert flops.visible_pairs(seg, img, image_attention) == want
    # By hand: a 5-token document with a 2-patch image, a 3-token one, one pad.
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0]])
    img = np.array([[0, 0, 1, 1, 0, 0, 0, 0, 0]])
    assert flops.visible_pairs(seg, img) == 15 + 1 + 6
    assert flops.visible_pairs(seg, img, "causal") == 15 + 6
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    causal = B * T * (T + 1) // 2  # one document per row
    by_pairs = flops.train_flops_per_step(cfg, images_per_step=0, attention_pairs=causal)
    halves = flops.train_flops_per_step(cfg, images_per_step=0)
    assert by_pairs == pytest.approx(halves, rel=2 / T)  # n(n+1)/2 vs the n^2/2 convention
    assert by_pairs > halves


def test_paper_mix_is_half_text_in_long_tailed_documents():
    """Transfusion §4.1's mix for the step benchmark: half the tokens text, 256-patch images
    whole (BOI ... EOI inside one document), full rows, some text documents long."""
    from tfx_jax.data.sources import synthetic
    from tfx_jax.data.tokenizer import BOI_ID, EOI_ID

    B, T, I = 8, 4096, 256
    b = synthetic.paper_mix_batch(np.random.default_rng(0), B, T, 32000, 32, 8, 2, 15)
    seg, img, tok = b["segment_ids"], b["image_ids"], b["tokens"]
    assert (seg > 0).all()  # rows filled
    assert 0.45 <= (img > 0).mean() <= 0.55
    lengths = []
    for r in range(B):
        starts = np.flatnonzero(img[r, 1:] > img[r, :-1]) + 1
        for s in starts:  # every image whole: BOI, 256 patches, EOI, one document
            assert tok[r, s - 1] == BOI_ID and tok[r, s + I] == EOI_ID
            assert (img[r, s : s + I] > 0).all() and len(set(seg[r, s - 1 : s + I + 1])) == 1
        assert np.abs(b["patches"][r][img[r] == 0]).sum() == 0
        _, n = np.unique(seg[r][img[r] == 0], return_counts=True)
        lengths += n.tolist()
    assert max(lengths) > T / 2 and np.median(lengths) < 600


def test_paper_sizes_are_plausible():
    # 0.16b: 6N with N = 138.7M matmul params plus causal attention 6·L·T·D = 302M.
    tok = flops.flops_per_token(_paper("0.16b").model, 4096)
    assert tok["attention"] == 6 * 16 * 4096 * 768
    assert tok["total"] == pytest.approx(6 * 137_822_208 + 6 * 16 * 4096 * 768)
    # 7b: ~6.6B matmul params in the backbone -> ~40 GFLOP per token before attention.
    tok7 = flops.flops_per_token(_paper("7b").model, 4096)
    assert 39e9 < tok7["total"] - tok7["attention"] < 40e9


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("cpu", 1e11),
    ],
)
def test_peak_lookup(kind, peak):
    assert flops.lookup_peak_flops(kind) == peak


def test_peak_unknown_and_override(caplog):
    assert flops.lookup_peak_flops("TPU v4 lite") is None  # not "TPU v4": no prefix matches
    assert flops.lookup_peak_flops("Some NPU") is None

    class Device:
        device_kind = "Some NPU"

    with caplog.at_level(logging.WARNING, logger="tfx_jax"):
        assert flops.peak_flops_per_device(0.0, Device()) is None
    assert "train.peak_tflops" in caplog.text
    assert flops.peak_flops_per_device(100.0, Device()) == 100e12
    assert flops.peak_flops_per_device(0.0) == 1e11  # the test devices are CPUs


def test_mfu_arithmetic():
    # 4 devices x 100 TFLOP/s for 2 s = 800 TFLOP available; 400 TFLOP used -> 50%.
    assert flops.mfu(400e12, 2.0, 4, 100e12) == pytest.approx(0.5)
    assert flops.mfu(0.0, 1.0, 1, 1e12) == 0.0
    with pytest.raises(ValueError):
        flops.mfu(1e12, 0.0, 1, 1e12)

"""Model FLOPs per training step, counted from the config, and model FLOPs utilisation (MFU).

Counting rules (the usual "model FLOPs" of Kaplan et al. 2020 / PaLM App. B / MaxText):

- A matmul with a weight of `n` parameters costs 2n FLOPs per row in the forward pass and 4n in
  the backward pass (gradient w.r.t. the input and w.r.t. the weight): 6n per row for training.
  Rematerialisation is not counted (this is MFU, not hardware FLOPs utilisation).
- Only matmuls and convolutions count; norms, activations, softmax, RoPE and bias adds do not.
- The token-embedding lookup is a gather, not a matmul, and is excluded, as is standard. The LM
  head is counted (`D·V` per position) whether or not it is tied to the embedding.
- The transformer and the LM head run on every one of the `seq_len` positions of a row, text and
  image alike; the patch layers (linear projections or U-Net) and the timestep MLP run once per
  image slot. The compiled step processes every slot, filled or empty (`cfg.max_images_per_row`
  per row), which is the default image count; pass the real number to count only useful work.

Attention scores and values (QKᵀ and AV) cost 4·T·H·N forward FLOPs per query position per layer
for full attention over T keys, i.e. 12·L·T·H·N per token for training. The Transfusion mask is
causal apart from small bidirectional image blocks, so about half of that square is needed.
`attention="causal"` (the default) counts half the square (6·L·T·H·N); `"full"` counts all of it.
Why causal: it is the work a block-skipping kernel (cuDNN, splash, tokamax) actually has to do;
it is what current MaxText counts (`causal_attention_flops = noncausal_attention_flops / 2` in
`calculate_tflops_training_per_device`; older MaxText releases and PaLM's 6N + 12·L·H·Q·T count
the full square); and it reproduces the MFU measured for a plain-JAX causal Llama step on an
H100 on 2026-11-23 (0.16B: 263k tok/s x 1.13 GFLOP/token = 30% of 989 TFLOP/s; the full square
would claim 38%), so numbers stay comparable. Use "full" to compare with PaLM-style MFU.

Legend: L layers, D d_model, N query heads, K kv heads, H head dim, F mlp hidden, V vocab,
T sequence length, I patches per image, P patch dim, C latent channels, E timestep features.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from tfx_jax.config import Config
from tfx_jax.models.config import ModelConfig
from tfx_jax.models.mask import key_ranges
from tfx_jax.models.patch import TimestepEmbedding

log = logging.getLogger("tfx_jax")

ATTENTION_MODES = ("causal", "full")

# Forward + backward: 2 FLOPs per multiply-add forward, 4 backward (input and weight gradients).
_TRAIN_FLOPS_PER_MAC = 6


# ----------------------------------------------------------------------------- parameters


def _unet_stages(m: ModelConfig) -> list[tuple[int, int]]:
    """(channels, resolution) of each U-Net stage: stage k runs at latent_size / 2^k."""
    return [(c, m.latent_size // 2**k) for k, c in enumerate(m.unet_channels)]


def matmul_params(m: ModelConfig) -> dict[str, int]:
    """Weights that enter matmuls or convolutions, by component (no embedding, norms, biases).

    Args:
      m: the model config.

    Returns:
      {"attention": q/k/v/o projections of all layers (grouped-query k/v), "mlp": SwiGLU
      gate/up/down of all layers, "lm_head": D·V (the embedding matrix when tied: the matmul
      still happens), "time_embed": the timestep MLP, "patch_in", "patch_out": the linear patch
      projections or the U-Net encoder/decoder convolutions and dense layers}. Matches the kernel
      sizes of `Transfusion(m).init(...)` exactly.
    """
    D, N, K, H, F = m.d_model, m.n_heads, m.kv_heads, m.head_dim, m.hidden_dim
    E = TimestepEmbedding.freq_dim
    out = {
        "attention": m.n_layers * D * H * (2 * N + 2 * K),  # q, o: N heads; k, v: K heads
        "mlp": m.n_layers * 3 * D * F,  # gate, up, down
        "lm_head": D * m.vocab_size,
        "time_embed": E * D + D * D,  # fc1, fc2
    }
    if m.patch_encoder == "linear":
        out["patch_in"] = m.patch_dim * D
        out["patch_out"] = D * m.patch_dim
        return out
    C, chans = m.latent_channels, m.unet_channels
    enc = 9 * C * chans[0] + chans[-1] * D  # conv_in, proj
    dec = D * chans[-1] + 9 * chans[0] * C  # proj, conv_out
    for k, c in enumerate(chans):
        res = 9 * c * c + D * c + 9 * c * c  # ResBlock(c -> c): conv1, temb, conv2
        enc += res + (9 * chans[k - 1] * c if k > 0 else 0)  # + strided down conv
        # Decoder ResBlock sees [x, skip] = 2c channels: conv1 2c->c, a 1x1 skip 2c->c.
        dec += res + 9 * c * c + 2 * c * c + (9 * c * chans[k - 1] if k > 0 else 0)  # + up conv
    out["patch_in"] = enc
    out["patch_out"] = dec
    return out


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(m: ModelConfig, seq_len: int, attention: str = "causal") -> dict[str, float]:
    """Training FLOPs (forward + backward) per sequence position, by component.

    Args:
      m: the model config.
      seq_len: T, the packed row length (attention cost grows with it).
      attention: "causal" counts half the T x T score square, "full" all of it (module docstring).

    Returns:
      {"attention_proj", "mlp", "lm_head": 6 x their matmul parameters; "attention": the
      score/value matmuls; "total": their sum}. The embedding lookup is excluded.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r}: use one of {ATTENTION_MODES}.")
    p = matmul_params(m)
    # QK^T and AV: 2·H FLOPs each per (query, key, head) forward; x3 for training.
    full = 3 * 4 * m.n_layers * seq_len * m.head_dim * m.n_heads
    out = {
        "attention_proj": float(_TRAIN_FLOPS_PER_MAC * p["attention"]),
        "mlp": float(_TRAIN_FLOPS_PER_MAC * p["mlp"]),
        "lm_head": float(_TRAIN_FLOPS_PER_MAC * p["lm_head"]),
        "attention": full / 2 if attention == "causal" else float(full),
    }
    out["total"] = sum(out.values())
    return out


def _unet_macs(m: ModelConfig) -> tuple[int, int]:
    """Forward multiply-adds of the U-Net encoder and decoder for one image.

    Every tap of each 3x3 'SAME' window counts, zero padding included (what the hardware runs);
    XLA's cost analysis skips padded taps and reports ~2-4% fewer conv FLOPs at 32x32 / 16x16.
    """
    D, C, g = m.d_model, m.latent_channels, m.latent_size // m.patch_size
    stages = _unet_stages(m)
    c0, h = stages[0]
    enc = 9 * C * c0 * h * h + stages[-1][0] * D * g * g  # conv_in at h, proj on the patch grid
    dec = D * stages[-1][0] * g * g + 9 * c0 * C * h * h  # proj, conv_out at h
    for k, (c, r) in enumerate(stages):
        # The timestep embedding is upsampled to every pixel, so its dense layer runs per pixel.
        res = (9 * c * c + D * c + 9 * c * c) * r * r
        down = 9 * stages[k - 1][0] * c * r * r if k > 0 else 0  # stride 2: output at r
        enc += res + down
        # Decoder: conv1 and the 1x1 skip see 2c channels; the up conv runs at the next finer r.
        up = 9 * c * stages[k - 1][0] * stages[k - 1][1] ** 2 if k > 0 else 0
        dec += res + (9 * c * c + 2 * c * c) * r * r + up
    return enc, dec


def flops_per_image(m: ModelConfig) -> dict[str, float]:
    """Training FLOPs (forward + backward) of the per-image layers for one image slot.

    Args:
      m: the model config.

    Returns:
      {"time_embed": the timestep MLP (run for every patch: timesteps are per patch),
      "patch_in", "patch_out": linear projections (per patch) or U-Net encoder/decoder
      convolutions (per pixel of each stage), "total"}. The transformer's work on the image's
      positions is in `flops_per_token`.
    """
    p = matmul_params(m)
    I = m.num_patches
    out = {"time_embed": float(_TRAIN_FLOPS_PER_MAC * p["time_embed"] * I)}
    if m.patch_encoder == "linear":
        out["patch_in"] = float(_TRAIN_FLOPS_PER_MAC * p["patch_in"] * I)
        out["patch_out"] = float(_TRAIN_FLOPS_PER_MAC * p["patch_out"] * I)
    else:
        enc, dec = _unet_macs(m)
        out["patch_in"] = float(_TRAIN_FLOPS_PER_MAC * enc)
        out["patch_out"] = float(_TRAIN_FLOPS_PER_MAC * dec)
    out["total"] = sum(out.values())
    return out


def train_flops_per_step(
    cfg: Config,
    images_per_step: int | None = None,
    attention: str = "causal",
    attention_pairs: int | None = None,
) -> float:
    """Model FLOPs of one optimizer step over the global batch (all devices together).

    Gradient accumulation does not change it: the micro-batches add up to the global batch.

    Args:
      cfg: the run config; `data.global_batch_size` rows of `data.seq_len` positions.
      images_per_step: images in the global batch. None = every slot the step computes
        (`global_batch_size x cfg.max_images_per_row`, empty slots included); pass the real
        count (e.g. from the batch's image ids) to count only useful image work.
      attention: "causal" or "full" (see `flops_per_token`).
      attention_pairs: the (query, key) pairs the batch's mask lets attend, summed over the
        global batch (`visible_pairs`); when given, attention is counted on those pairs alone
        instead of by `attention` (the useful work of documents packed into a row).

    Returns:
      FLOPs per step (float).
    """
    B, T = cfg.data.global_batch_size, cfg.data.seq_len
    if images_per_step is None:
        images_per_step = B * cfg.max_images_per_row
    per_token = flops_per_token(cfg.model, T, attention)
    total = B * T * per_token["total"] + images_per_step * flops_per_image(cfg.model)["total"]
    if attention_pairs is not None:
        total += (
            attention_pairs * _attention_flops_per_pair(cfg.model) - B * T * per_token["attention"]
        )
    return total


def _attention_flops_per_pair(m: ModelConfig) -> float:
    """QKᵀ and AV of one (query, key) pair in every layer and head, for training (x3)."""
    return 3 * 4 * m.n_layers * m.head_dim * m.n_heads


def visible_pairs(segment_ids: Any, image_ids: Any, image_attention: str = "bidirectional") -> int:
    """(query, key) pairs the Transfusion mask lets attend in a batch ([B, T] ids), from the
    mask's own per-query key ranges (`models.mask.key_ranges`): causal inside each document,
    both ways inside each image (Zhou et al. 2024 §3.2). Padding queries (segment 0) count
    nothing: they attend only to themselves so that no softmax row is empty."""
    seg = np.asarray(segment_ids)
    k_start, k_end = key_ranges(seg, np.asarray(image_ids), image_attention)
    return int(np.where(seg > 0, np.asarray(k_end) - np.asarray(k_start), 0).sum())


# ----------------------------------------------------------------------------- MFU

# Dense bf16 FLOP/s per JAX device (= per chip for everything listed), matched in order against
# the lowercased `jax.Device.device_kind`. TPU kinds are the strings JAX reports (v5e reports
# "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite"; newer runtimes may report "TPU v5e" etc.), so
# they match whole; GPU kinds carry memory/form-factor suffixes, so they match by search, the
# PCIe / NVL parts (lower clocks) before the SXM part.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"tpu v4", 275e12),
    (r"tpu v5 ?lite|tpu v5e", 197e12),
    (r"tpu v5p?", 459e12),
    (r"tpu v6 ?lite|tpu v6e", 918e12),
    (r".*h100.*pcie.*", 756e12),
    (r".*h100.*nvl.*", 835e12),
    (r".*h100.*", 989e12),  # "NVIDIA H100 80GB HBM3" (SXM)
    (r".*h200.*nvl.*", 835e12),
    (r".*h200.*", 989e12),  # "NVIDIA H200", "NVIDIA GH200 480GB" (same Hopper SXM clocks)
    (r".*a100.*", 312e12),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", ...
    (r".*b200.*", 2250e12),
    # A rough order of magnitude for one CPU "device" (a few AVX-512 cores in fp32). MFU on CPU
    # only shows that the plumbing works; set train.peak_tflops for a real number.
    (r"cpu", 1e11),
)


def lookup_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 FLOP/s of one device of this kind, or None when the kind is not in the table.

    Args:
      device_kind: `jax.devices()[0].device_kind`, e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3".

    Returns:
      Peak FLOP/s per device, or None.
    """
    kind = device_kind.strip().lower()
    for pattern, peak in PEAK_FLOPS:
        if re.fullmatch(pattern, kind):
            return peak
    return None


def peak_flops_per_device(peak_tflops: float = 0.0, device: Any = None) -> float | None:
    """The per-device peak to divide by: `TrainConfig.peak_tflops` if set, else the table's.

    Args:
      peak_tflops: `cfg.train.peak_tflops` (TFLOP/s per device; 0 = look up the device kind).
      device: a `jax.Device`; default `jax.devices()[0]`.

    Returns:
      FLOP/s per device, or None (with a warning) for a device kind the table does not know:
      report MFU only when this is not None.
    """
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device is None:
        import jax

        device = jax.devices()[0]
    peak = lookup_peak_flops(device.device_kind)
    if peak is None:
        log.warning(
            "No peak FLOP/s known for device kind %r: MFU is not reported. "
            "Set train.peak_tflops to the dense bf16 TFLOP/s of one device.",
            device.device_kind,
        )
    return peak


def mfu(
    flops_per_step: float, step_seconds: float, num_devices: int, peak_flops_per_device: float
) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices.

    Args:
      flops_per_step: model FLOPs of one step over the global batch (`train_flops_per_step`).
      step_seconds: wall-clock seconds per step (average over a logging interval).
      num_devices: devices the step runs on (`jax.device_count()`, all processes).
      peak_flops_per_device: FLOP/s of one device (`peak_flops_per_device`).

    Returns:
      A fraction (0.4 = 40% MFU).
    """
    if step_seconds <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
        raise ValueError(
            f"mfu needs positive step_seconds={step_seconds}, num_devices={num_devices} and "
            f"peak_flops_per_device={peak_flops_per_device}."
        )
    return flops_per_step / (step_seconds * num_devices * peak_flops_per_device)


def describe(cfg: Config, attention: str = "causal") -> str:
    """One log line: parameters in matmuls, FLOPs per token and per step (for the run header).

    Args:
      cfg: the run config.
      attention: "causal" or "full".

    Returns:
      e.g. "matmul params 137.8M; 1.13 GFLOP/token (attention 27%); 2.37 PFLOP/step".
    """
    tok = flops_per_token(cfg.model, cfg.data.seq_len, attention)
    n = sum(matmul_params(cfg.model).values())
    step = train_flops_per_step(cfg, attention=attention)
    return (
        f"matmul params {n / 1e6:.1f}M; {tok['total'] / 1e9:.3g} GFLOP/token "
        f"(attention {tok['attention'] / tok['total']:.0%}, {attention}); "
        f"{step / 1e15:.3g} PFLOP/step"
    )

"""Exports trained parameters for evaluation and generation, without optimizer state.

Two layouts (paths may be local or gs://, through `etils.epath`):

    params-only: export_params / load_export          Hugging Face Llama: export_hf_llama
      config.json        Config.to_dict() + "export"    config.json            LlamaForCausalLM
      model.safetensors  "layers/attn/query", ...        model.safetensors      HF names, [out, in]
      tokenizer.model    the SentencePiece model         tokenizer.model        the same file
      vae/params.msgpack, vae/vae.json (if trained)      tokenizer_config.json  LlamaTokenizer

The params-only export holds the whole Transfusion model (text and image layers) in the param
tree's own layout: one safetensors entry per leaf, named by its tree path joined with "/"; with
scanned layers the leading layer axis stays. `load_export` rebuilds the tree and checks every key
and shape against `Transfusion(cfg.model).init`. The tokenizer and the VAE sit where
`tfx_jax.artifacts` puts them under `data.data_dir`, so pointing `data.data_dir` at an export
makes `artifacts.load_vae` and `artifacts.tokenizer_path` find them.

The Hugging Face export holds only the text backbone: with QK-norm off, the text path of
Transfusion (embed → pre-norm blocks of RoPE GQA attention and SwiGLU → RMSNorm → LM head) is
exactly Llama, so `transformers.LlamaForCausalLM` reproduces the model's text logits (tested to
1e-3 in fp32 in tests/test_export.py).

Legend: D d_model, N query heads, K kv heads, H head dim, F mlp hidden, V vocab, L layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from tfx_jax import artifacts
from tfx_jax import params as params_lib
from tfx_jax.config import Config, DataConfig, ModelConfig, from_dict
from tfx_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The same names as under `data.data_dir` (see tfx_jax.artifacts).
TOKENIZER_FILE = "tokenizer.model"
VAE_DIR = "vae"
VAE_FILES = ("params.msgpack", "vae.json")
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
# safetensors dtype tags -> numpy. safetensors.numpy.load has no BF16 reader, so files are read
# with `safetensors.deserialize` and this table.
_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
}
_MAX_LISTED = 8  # keys named per category in a tree-mismatch message


# ----------------------------------------------------------------------------- param trees


def _flatten(params: Any) -> dict[str, Any]:
    """Nested params (boxed or not, optionally wrapped in {"params": ...}) -> {"a/b/c": leaf}."""
    params = flax.core.unfreeze(nn.meta.unbox(params))
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]  # a whole `model.init` variables dict
    flat = flax.traverse_util.flatten_dict(params)
    return {"/".join(str(k) for k in path): leaf for path, leaf in flat.items()}


def param_template(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """The flat names, shapes and dtypes of `Transfusion(cfg.model).init` (nothing allocated).

    Args:
      cfg: the run's config.

    Returns:
      {"layers/attn/query": ShapeDtypeStruct, ...} with the keys `export_params` writes.
    """
    return _flatten(params_lib.abstract_params(cfg))


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def check_tree(
    flat_shapes: Mapping[str, tuple[int, ...]],
    cfg: Config,
    what: str,
    template: Mapping[str, jax.ShapeDtypeStruct] | None = None,
) -> None:
    """Raises ValueError unless `flat_shapes` has exactly the keys and shapes of the model.

    Args:
      flat_shapes: {"layers/attn/query": shape, ...}.
      cfg: the config the parameters should belong to.
      what: how to call the checked parameters in the message (e.g. a file name).
      template: `param_template(cfg)` when the caller has it already.

    Raises:
      ValueError: naming every missing key, unexpected key and wrong shape (up to a few each).
    """
    template = param_template(cfg) if template is None else template
    missing = sorted(set(template) - set(flat_shapes))
    unexpected = sorted(set(flat_shapes) - set(template))
    wrong = [
        f"{k} {tuple(flat_shapes[k])} (expected {tuple(template[k].shape)})"
        for k in sorted(set(template) & set(flat_shapes))
        if tuple(flat_shapes[k]) != tuple(template[k].shape)
    ]
    if not (missing or unexpected or wrong):
        return
    m = cfg.model
    parts = [
        f"{what} do not match the parameters of this config (model.n_layers={m.n_layers}, "
        f"d_model={m.d_model}, n_heads={m.n_heads}, kv_heads={m.kv_heads}, "
        f"vocab_size={m.vocab_size}, scan_layers={m.scan_layers}, "
        f"tie_embeddings={m.tie_embeddings}, qk_norm={m.qk_norm}, "
        f"patch_encoder={m.patch_encoder!r})"
    ]
    if missing:
        parts.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong:
        parts.append(f"wrong shapes: {_listed(wrong)}")
    scanned_in_file = any(k.startswith("layers/") for k in flat_shapes)
    unscanned_in_file = any(k.startswith("layer_") for k in flat_shapes)
    if (scanned_in_file and not m.scan_layers) or (unscanned_in_file and m.scan_layers):
        parts.append(
            "the parameters were made with the other model.scan_layers setting "
            "('layers/...' is scanned, 'layer_{i}/...' is not)"
        )
    raise ValueError("; ".join(parts) + ".")


def _to_host(x: Any) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        # Collective: every process must reach this line (see export_params).
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _host_params(cfg: Config, params: Any) -> dict[str, np.ndarray]:
    """Checks `params` against the config and brings every leaf to this host as float32."""
    flat = _flatten(params)
    check_tree({k: np.shape(v) for k, v in flat.items()}, cfg, "the given parameters")
    return {k: _to_host(v).astype(np.float32, copy=False) for k, v in flat.items()}


# ----------------------------------------------------------------------------- files


def _dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    # safetensors wants C-contiguous buffers; transposed HF weights are views until copied.
    return safetensors.numpy.save(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata
    )


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a safetensors file (local or remote) into numpy arrays, bfloat16 included.

    Args:
      path: the file.

    Returns:
      {name: array} with the stored dtypes (bfloat16 as `jnp.bfloat16`, i.e. ml_dtypes).
    """
    out = {}
    for name, info in safetensors.deserialize(epath.Path(path).read_bytes()):
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        out[name] = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
    return out


def _resolve_tokenizer(cfg: Config, tokenizer_path: str | os.PathLike | None) -> Tokenizer | None:
    """The explicit tokenizer (must exist), else the data dir's one when present, else None."""
    if tokenizer_path is None:
        default = artifacts.tokenizer_path(cfg)
        if not default.exists():
            return None
        tokenizer_path = default
    tokenizer = Tokenizer.from_file(tokenizer_path)  # FileNotFoundError / reserved-id check
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer {os.fspath(tokenizer_path)} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={cfg.model.vocab_size}: it is not this model's tokenizer."
        )
    return tokenizer


def _resolve_vae(cfg: Config, vae_dir: str | os.PathLike | None) -> epath.Path | None:
    """The explicit VAE folder (must hold the VAE files), else the data dir's one when trained."""
    if vae_dir is None:
        default = artifacts.vae_dir(cfg)
        return default if all((default / f).exists() for f in VAE_FILES) else None
    folder = epath.Path(vae_dir)
    absent = [f for f in VAE_FILES if not (folder / f).exists()]
    if absent:
        raise FileNotFoundError(f"vae_dir={os.fspath(vae_dir)} has no {', '.join(absent)}.")
    return folder


# ----------------------------------------------------------------------------- params-only


def export_params(
    cfg: Config,
    params: Any,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    tokenizer_path: str | os.PathLike | None = None,
    vae_dir: str | os.PathLike | None = None,
) -> epath.Path:
    """Writes the params-only export (see the module docstring for the layout).

    In a multi-host run every process must call this (sharded parameters are gathered with a
    collective); process 0 writes. `config.json` is written last, so a folder that has it holds a
    complete export. Files of an earlier export that this one does not write (e.g. an old vae/)
    are left alone; `config.json["export"]` says which files belong to this export.

    Args:
      cfg: the run's resolved config (it is stored, and checked against `params`).
      params: the parameter tree (e.g. `TrainState.params`; boxed, sharded or `{"params": ...}`
        are fine).
      out_dir: the export folder (local or gs://), created if needed.
      dtype: "bfloat16" (half the size; eval at bf16 precision) or "float32" (bit-exact).
      tokenizer_path: the SentencePiece model to copy in; None = `artifacts.tokenizer_path(cfg)`
        when that file exists (else the export has no tokenizer).
      vae_dir: a folder with the VAE's params.msgpack and vae.json; None = `artifacts.vae_dir(cfg)`
        when the VAE was trained (else the export has no VAE).

    Returns:
      The export folder.

    Raises:
      ValueError: an unknown dtype, parameters that do not match the config (naming the keys),
        or a tokenizer with more pieces than `model.vocab_size`.
      FileNotFoundError: an explicit tokenizer_path or vae_dir that does not exist.
    """
    np_dtype = _dtype(dtype)
    host = _host_params(cfg, params)
    tokenizer = _resolve_tokenizer(cfg, tokenizer_path)
    vae = _resolve_vae(cfg, vae_dir)
    out = epath.Path(out_dir)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(np_dtype) for k, v in host.items()}
    meta = {"tfx_jax_format_version": str(FORMAT_VERSION), "dtype": dtype}
    (out / WEIGHTS_FILE).write_bytes(_safetensors_bytes(weights, meta))
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_FILE)
    if vae is not None:
        (out / VAE_DIR).mkdir(parents=True, exist_ok=True)
        for name in VAE_FILES:
            (out / VAE_DIR / name).write_bytes((vae / name).read_bytes())
    export = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "weights": WEIGHTS_FILE,
        "tokenizer": TOKENIZER_FILE if tokenizer is not None else None,
        "vae": VAE_DIR if vae is not None else None,
    }
    (out / CONFIG_FILE).write_text(
        json.dumps({**cfg.to_dict(), "export": export}, indent=2, sort_keys=True)
    )
    return out


def load_export(path: str | os.PathLike) -> tuple[Config, dict[str, Any]]:
    """Loads a params-only export for generation or evaluation (no optimizer state).

    Args:
      path: the folder `export_params` wrote (local or gs://).

    Returns:
      (cfg, params): the stored config and the nested parameter tree, with the structure of
      `nn.meta.unbox(Transfusion(cfg.model).init(...)["params"])`, as numpy arrays of the model's
      `param_dtype` (float32 by default; a bf16 export is widened exactly). The tokenizer and the
      VAE, when exported, are `path/tokenizer.model` and `path/vae/`.

    Raises:
      FileNotFoundError: no config.json or weights file in `path`.
      ValueError: not a params-only export, a newer format, or weights that do not match the
        stored config (naming the missing / unexpected keys and wrong shapes).
    """
    root = epath.Path(path)
    config_file = root / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{os.fspath(path)} has no {CONFIG_FILE}: not an export folder.")
    stored = json.loads(config_file.read_text())
    export = stored.pop("export", None)
    if not isinstance(export, dict) or "format_version" not in export:
        raise ValueError(
            f"{config_file} has no 'export' section: not a tfx_jax params-only export (a Hugging "
            "Face export loads with transformers, not load_export)."
        )
    if export["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{config_file} is export format {export['format_version']}; this tfx_jax reads up "
            f"to {FORMAT_VERSION}: update tfx_jax."
        )
    cfg = from_dict(stored)
    weights_file = root / export.get("weights", WEIGHTS_FILE)
    if not weights_file.exists():
        raise FileNotFoundError(f"{weights_file} is missing: the export is incomplete.")
    tensors = read_safetensors(weights_file)
    template = param_template(cfg)
    shapes = {k: v.shape for k, v in tensors.items()}
    check_tree(shapes, cfg, f"the weights in {weights_file}", template)
    flat = {tuple(k.split("/")): v.astype(template[k].dtype) for k, v in tensors.items()}
    return cfg, flax.traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- Hugging Face


def hf_llama_incompatibilities(model: ModelConfig) -> list[str]:
    """Why the text backbone of `model` has no exact Llama equivalent (empty when it has one).

    Llama and our text path share everything else: pre-norm RMSNorm blocks, rotate-half RoPE with
    `rope_theta`, grouped-query attention with kv head n // (N/K) serving query head n, a 1/√H
    scale, bias-free SwiGLU, a final RMSNorm, an untied or tied LM head, unscaled embeddings.
    """
    reasons = []
    if model.qk_norm:
        reasons.append(
            "model.qk_norm=True: Llama's attention has no RMSNorm on queries and keys, so "
            "LlamaForCausalLM cannot hold the query_norm/key_norm scales and would compute "
            "different logits"
        )
    return reasons


def _layer_param(host: dict[str, np.ndarray], model: ModelConfig, i: int, name: str) -> np.ndarray:
    if model.scan_layers:
        return host[f"layers/{name}"][i]
    return host[f"layer_{i}/{name}"]


def hf_llama_tensors(model: ModelConfig, host: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps our flat float params to Hugging Face Llama tensor names and layouts.

    Our Dense kernels are [in, out] and q/k/v kernels [D, heads, H]; HF Linear weights are
    [out, in] with the head axis major in `out` (q_proj output is viewed as [heads, H]). RoPE needs
    no permutation: `layers.rope` rotates the halves (x[:H/2], x[H/2:]) like HF's `rotate_half`.

    Args:
      model: the model config (scan_layers, tie_embeddings, sizes).
      host: `{"layers/attn/query": array, ...}` as `export_params` names them.

    Returns:
      {"model.embed_tokens.weight": [V, D], ..., "lm_head.weight": [V, D]}; `lm_head.weight` is
      left out with tied embeddings (HF ties it to the embedding on load).
    """
    D, N, K, H = model.d_model, model.n_heads, model.kv_heads, model.head_dim
    out = {"model.embed_tokens.weight": host["embed/embedding"]}
    for i in range(model.n_layers):
        get = lambda name, i=i: _layer_param(host, model, i, name)
        pre = f"model.layers.{i}."
        out[pre + "self_attn.q_proj.weight"] = get("attn/query").reshape(D, N * H).T
        out[pre + "self_attn.k_proj.weight"] = get("attn/key").reshape(D, K * H).T
        out[pre + "self_attn.v_proj.weight"] = get("attn/value").reshape(D, K * H).T
        out[pre + "self_attn.o_proj.weight"] = get("attn/out").reshape(N * H, D).T
        out[pre + "mlp.gate_proj.weight"] = get("mlp/gate/kernel").T
        out[pre + "mlp.up_proj.weight"] = get("mlp/up/kernel").T
        out[pre + "mlp.down_proj.weight"] = get("mlp/down/kernel").T
        out[pre + "input_layernorm.weight"] = get("attn_norm/scale")
        out[pre + "post_attention_layernorm.weight"] = get("mlp_norm/scale")
    out["model.norm.weight"] = host["final_norm/scale"]
    if not model.tie_embeddings:
        out["lm_head.weight"] = host["lm_head/kernel"].T
    return out


def hf_llama_config(cfg: Config, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of the equivalent `LlamaForCausalLM`.

    Args:
      cfg: the run's config.
      dtype: the dtype the weights are stored in ("float32" or "bfloat16").

    Returns:
      A JSON-able dict. `max_position_embeddings` is the training context `data.seq_len` (RoPE
      has no position table; it is what the model has seen).
    """
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.d_model,
        "intermediate_size": m.hidden_dim,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "num_hidden_layers": m.n_layers,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "max_position_embeddings": cfg.data.seq_len,
        "initializer_range": 0.02,
        "use_cache": True,
        # transformers >= 4.56 reads "dtype", older versions "torch_dtype".
        "torch_dtype": dtype,
        "dtype": dtype,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def hf_tokenizer_config(d: DataConfig) -> dict[str, Any]:
    """A minimal `tokenizer_config.json` for HF's SentencePiece `LlamaTokenizer`.

    `add_bos_token` because every training document starts with BOS (tfx_jax.data.sequence);
    `legacy=True` makes `LlamaTokenizer` call SentencePiece's plain `encode`, which is what
    `tfx_jax.data.tokenizer.Tokenizer.encode` does.
    """
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": d.seq_len,
        "sp_model_kwargs": {},
    }


def export_hf_llama(
    cfg: Config,
    params: Any,
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
) -> epath.Path:
    """Writes the text backbone as a Hugging Face `LlamaForCausalLM` folder.

    Only the text path is exported: the image layers (time embedding, patch encoder/decoder) are
    not, so the HF model scores and generates text only. Its logits equal ours on text-only input
    (one document per row, positions 0, 1, ...); after a BOI token our model expects image
    patches, which the HF model cannot produce. `from_pretrained(out_dir)` loads the weights and
    `LlamaTokenizer.from_pretrained(out_dir)` the tokenizer. In a multi-host run every process
    must call this; process 0 writes.

    Args:
      cfg: the run's config.
      params: the parameter tree (as for `export_params`).
      out_dir: the folder (local or gs://), created if needed.
      tokenizer_path: the SentencePiece model; None = `artifacts.tokenizer_path(cfg)` when it exists
        (else no tokenizer files are written).
      dtype: "float32" or "bfloat16" storage (and the config's `torch_dtype`).

    Returns:
      The export folder.

    Raises:
      ValueError: the architecture has no Llama equivalent (the message says why: QK-norm), an
        unknown dtype, parameters that do not match the config, or a tokenizer that is too big.
    """
    reasons = hf_llama_incompatibilities(cfg.model)
    if reasons:
        raise ValueError(
            "cannot export this model as a Hugging Face Llama: " + "; ".join(reasons) + "."
        )
    np_dtype = _dtype(dtype)
    host = _host_params(cfg, params)
    tokenizer = _resolve_tokenizer(cfg, tokenizer_path)
    out = epath.Path(out_dir)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.astype(np_dtype) for k, v in hf_llama_tensors(cfg.model, host).items()}
    # "pt" is the format tag transformers requires in the safetensors header.
    (out / WEIGHTS_FILE).write_bytes(_safetensors_bytes(tensors, {"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_FILE)
        (out / HF_TOKENIZER_CONFIG_FILE).write_text(
            json.dumps(hf_tokenizer_config(cfg.data), indent=2, sort_keys=True)
        )
    (out / CONFIG_FILE).write_text(
        json.dumps(hf_llama_config(cfg, dtype), indent=2, sort_keys=True)
    )
    return out

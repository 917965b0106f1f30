"""Export for evaluation: the params-only round trip, and the Hugging Face Llama export.

The HF test loads the export with the real `transformers` library in the separate PyTorch venv
(`make .venv-hf`, which `make test` builds) and compares its logits with our forward pass.
"""

import json
import pathlib

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import run_subprocess

from tfx_jax import export
from tfx_jax.data import tokenizer as tok
from tfx_jax.layout import ModelInputs
from tfx_jax.models.transformer import Transfusion

REPO = pathlib.Path(__file__).resolve().parent.parent

HF_PYTHON = REPO / ".venv-hf" / "bin" / "python"
HF_SCRIPT = REPO / "tests" / "hf_logits.py"
TEXTS = ["a large red circle at the top left", "naïve café — 日本語 🎨", "two  spaces, end."]


def random_params(cfg, seed=0):
    """Parameters of the model's exact tree with O(1) activations and non-trivial norm scales.

    Drawn from `export.param_template` (no init forward pass, which takes seconds on CPU). Norm
    scales away from 1 so that swapping two norms in the HF mapping changes the logits; embeddings
    of unit scale so that tied-embedding logits are O(1) and a 1e-3 tolerance means something.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for key, spec in export.param_template(cfg).items():
        if key.endswith("scale"):
            value = rng.uniform(0.5, 1.5, spec.shape)
        elif key.endswith("embedding"):
            value = rng.normal(0.0, 1.0, spec.shape)
        else:
            value = rng.normal(0.0, 0.1, spec.shape)
        flat[tuple(key.split("/"))] = value.astype(np.float32)
    return flax.traverse_util.unflatten_dict(flat)


def our_logits(cfg, params, ids_BT):
    """The project's own LM logits on text-only input: one document per row, no images."""
    B, T = ids_BT.shape
    m = cfg.model
    M = 1  # text-only: the image inputs do not reach the logits, any slot count works
    text = {
        "tokens": ids_BT,
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
        "image_ids": np.zeros((B, T), np.int32),  # no image positions
    }
    noisy = np.zeros((B, M, m.latent_size, m.latent_size, m.latent_channels), np.float32)
    inputs = ModelInputs.from_layout(text, noisy, np.zeros((B, M, m.num_patches), np.int32))
    logits = jax.jit(Transfusion(cfg.model).apply)({"params": params}, inputs).logits
    return np.asarray(logits)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    words = [
        (s, c, sh) for s in ("large", "small") for c in ("red", "blue") for sh in ("circle", "box")
    ]
    texts = [f"a {s} {c} {sh} at the top left" for s, c, sh in words] * 20 + TEXTS
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tok.Tokenizer(tok.train_tokenizer(texts, vocab_size=400)).save(path)
    return path


def _vae_folder(root):
    vae = root / "vae_src"
    vae.mkdir()
    (vae / "params.msgpack").write_bytes(b"\x81\xa3not really msgpack params")
    (vae / "vae.json").write_text(json.dumps({"latent_channels": 4, "scale_factor": 0.7}))
    return vae


def _leaves(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): x
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


# ----------------------------------------------------------------------------- params-only


@pytest.mark.parametrize("scan", [True, False])
def test_params_round_trip_fp32_is_bit_exact(tiny_config, tokenizer_file, tmp_path, scan):
    cfg = tiny_config(overrides=[f"model.scan_layers={scan}", "model.n_kv_heads=2"])
    params = random_params(cfg)
    vae = _vae_folder(tmp_path)
    given = params
    if scan:  # what a Trainer holds: arrays sharded over the 8 devices, and a variables dict
        mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        given = {
            "params": {
                **params,
                "embed": {"embedding": jax.device_put(params["embed"]["embedding"], rows)},
            }
        }
        assert len(given["params"]["embed"]["embedding"].addressable_shards) == 8
    out = export.export_params(
        cfg, given, tmp_path / "export", "float32", tokenizer_path=tokenizer_file, vae_dir=vae
    )

    stored = json.loads((out / "config.json").read_text())
    assert stored["export"]["format_version"] == export.FORMAT_VERSION
    assert stored["export"]["dtype"] == "float32"
    assert (out / "tokenizer.model").read_bytes() == tokenizer_file.read_bytes()
    for name in ("params.msgpack", "vae.json"):
        assert (out / "vae" / name).read_bytes() == (vae / name).read_bytes()
    # Flat keys are the tree paths; the scanned layer axis stays.
    weights = export.read_safetensors(out / "model.safetensors")
    if scan:
        assert weights["layers/attn/query"].shape == (2, 64, 4, 16)
    else:
        assert weights["layer_1/attn/key"].shape == (64, 2, 16)

    loaded_cfg, loaded = export.load_export(out)
    assert loaded_cfg == cfg
    model = Transfusion(cfg.model)
    init = jax.eval_shape(lambda: model.init(jax.random.key(0), ModelInputs.dummy(cfg)))
    init_tree = nn.meta.unbox(init["params"])
    assert jax.tree.structure(loaded) == jax.tree.structure(init_tree)
    want, got = _leaves(params), _leaves(loaded)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == np.float32, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_params_round_trip_bf16(tiny_config, tmp_path):
    cfg = tiny_config()
    params = random_params(cfg)
    out = export.export_params(cfg, params, tmp_path / "bf16", "bfloat16")
    raw = export.read_safetensors(out / "model.safetensors")
    assert raw["embed/embedding"].dtype == np.dtype(jax.numpy.bfloat16)
    size = len((out / "model.safetensors").read_bytes())
    assert size < 0.55 * sum(x.nbytes for x in jax.tree.leaves(params))
    _, loaded = export.load_export(out)
    want, got = _leaves(params), _leaves(loaded)
    for key in want:
        assert got[key].dtype == np.float32, key
        # Exactly the bf16 rounding of each weight (8 mantissa bits: relative error <= 2^-9).
        rounded = want[key].astype(jax.numpy.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got[key], rounded, err_msg=key)
        np.testing.assert_allclose(got[key], want[key], rtol=2**-8, atol=0, err_msg=key)


def test_export_finds_tokenizer_and_vae_in_data_dir(tiny_config, tokenizer_file, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    vae = _vae_folder(tmp_path)
    vae.rename(data_dir / "vae")
    cfg = tiny_config(overrides=[f"data.data_dir={data_dir}"])
    out = export.export_params(cfg, random_params(cfg), tmp_path / "a")
    meta = json.loads((out / "config.json").read_text())["export"]
    assert meta["tokenizer"] == "tokenizer.model" and meta["vae"] == "vae"
    assert (out / "vae" / "vae.json").exists() and (out / "tokenizer.model").exists()

    bare = tiny_config(overrides=[f"data.data_dir={tmp_path / 'empty'}"])
    out = export.export_params(bare, random_params(bare), tmp_path / "b")
    meta = json.loads((out / "config.json").read_text())["export"]
    assert meta["tokenizer"] is None and meta["vae"] is None
    with pytest.raises(FileNotFoundError, match="tokenizer model file not found"):
        export.export_params(bare, random_params(bare), tmp_path / "c", tokenizer_path="/nope")
    with pytest.raises(FileNotFoundError, match="vae.json"):
        export.export_params(bare, random_params(bare), tmp_path / "c", vae_dir=tmp_path)


def test_mismatched_trees_fail_naming_the_keys(tiny_config, tmp_path):
    cfg = tiny_config()
    params = random_params(cfg)

    missing = flax.core.unfreeze(params)
    del missing["lm_head"]
    with pytest.raises(ValueError, match=r"missing keys: lm_head/kernel"):
        export.export_params(cfg, missing, tmp_path / "x")

    gqa = random_params(tiny_config(overrides=["model.n_kv_heads=2"]))
    with pytest.raises(ValueError, match=r"wrong shapes: layers/attn/key \(2, 64, 2, 16\) "):
        export.export_params(cfg, gqa, tmp_path / "x")

    # An export whose config.json no longer matches its weights (edited, or a scan mismatch).
    out = export.export_params(cfg, params, tmp_path / "scanned", "float32")
    stored = json.loads((out / "config.json").read_text())
    stored["model"]["scan_layers"] = False
    (out / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError) as err:
        export.load_export(out)
    msg = str(err.value)
    assert "missing keys: layer_0/attn/key" in msg
    assert "unexpected keys: layers/attn/key" in msg
    assert "other model.scan_layers setting" in msg

    with pytest.raises(ValueError, match="dtype='float16'"):
        export.export_params(cfg, params, tmp_path / "y", "float16")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export.load_export(tmp_path / "nothing")


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_export_refuses_qk_norm(tiny_config, tmp_path):
    cfg = tiny_config(overrides=["model.qk_norm=true"])
    with pytest.raises(ValueError, match="qk_norm=True: Llama's attention has no RMSNorm"):
        export.export_hf_llama(cfg, random_params(cfg), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _hf_python():
    if not HF_PYTHON.exists():
        pytest.fail(
            f"{HF_PYTHON} is missing: run `make .venv-hf` (the PyTorch + transformers venv that "
            "loads the Hugging Face export; `make test` builds it)."
        )
    return str(HF_PYTHON)


HF_CASES = {
    # name: (overrides, export dtype)
    "scanned_untied_gqa": (["model.n_kv_heads=2"], "float32"),
    "unscanned_tied_gqa": (
        ["model.scan_layers=false", "model.tie_embeddings=true", "model.n_kv_heads=2"],
        "float32",
    ),
    "scanned_tied_mha": (["model.tie_embeddings=true"], "float32"),
    "unscanned_untied_bf16": (["model.scan_layers=false", "model.n_kv_heads=1"], "bfloat16"),
}


def test_hf_llama_logits_match_ours(tiny_config, tokenizer_file, tmp_path):
    """transformers' LlamaForCausalLM on the export gives our text logits (fp32, < 1e-3)."""
    hf_python = _hf_python()
    rng = np.random.default_rng(0)
    ids_BT = rng.integers(tok.NUM_RESERVED, 512, size=(2, 48)).astype(np.int32)
    ids_BT[:, 0] = tok.BOS_ID
    np.save(tmp_path / "ids.npy", ids_BT)
    ours, pairs = {}, []
    for i, (name, (overrides, dtype)) in enumerate(HF_CASES.items()):
        cfg = tiny_config(overrides=overrides)
        params = random_params(cfg, seed=i)
        out = export.export_hf_llama(
            cfg, params, tmp_path / name, tokenizer_path=tokenizer_file, dtype=dtype
        )
        hf_cfg = json.loads((out / "config.json").read_text())
        assert hf_cfg["num_key_value_heads"] == cfg.model.kv_heads
        assert hf_cfg["tie_word_embeddings"] == cfg.model.tie_embeddings
        if dtype == "bfloat16":  # HF upcasts the stored bf16 exactly: compare with rounded params
            params = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16).astype(np.float32), params)
        ours[name] = our_logits(cfg, params, ids_BT)
        pairs += [str(out), str(tmp_path / f"{name}.npy")]
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))

    cmd = [hf_python, str(HF_SCRIPT), "--ids", str(tmp_path / "ids.npy"), *pairs]
    cmd += ["--texts", str(tmp_path / "texts.json"), "--tokens-out", str(tmp_path / "tok.json")]
    run = run_subprocess(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stderr[-4000:]}"

    for name in HF_CASES:
        hf = np.load(tmp_path / f"{name}.npy")
        assert hf.shape == ours[name].shape, name
        diff = float(np.abs(hf - ours[name]).max())
        scale = float(ours[name].std())
        print(f"{name}: max |HF - ours| = {diff:.2e} (logit std {scale:.2f})")
        assert scale > 0.5, f"{name}: logits too small for the tolerance to mean anything"
        assert diff < 1e-3, (
            f"{name}: HF Llama logits differ from ours by {diff:.2e}: check the weight mapping "
            "in export.hf_llama_tensors (transposes, head order, norm names) and the RoPE layout."
        )

    # HF's tokenizers read the copied SentencePiece model: the same ids as ours, with BOS, both
    # the SentencePiece LlamaTokenizer and AutoTokenizer's default (converted) fast tokenizer.
    tokens = json.loads((tmp_path / "tok.json").read_text())
    ours_tok = tok.Tokenizer.from_file(tokenizer_file)
    assert tokens["auto"]["class"] == "LlamaTokenizerFast"
    for kind in ("slow", "auto"):
        assert tokens[kind]["ids"] == [ours_tok.encode(t, add_bos=True) for t in TEXTS], kind
        assert tokens[kind]["decoded"] == TEXTS, kind

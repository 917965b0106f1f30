"""Loads Hugging Face Llama exports with `transformers` and writes their logits (and token ids).

Runs in the separate PyTorch venv (`make .venv-hf`), never in .venv: tests/test_export.py calls

    .venv-hf/bin/python tests/hf_logits.py --ids ids.npy EXPORT_DIR OUT.npy [EXPORT_DIR OUT.npy ...]
        [--texts texts.json --tokens-out tokens.json]

so torch and transformers are imported once for every export. Each EXPORT_DIR is loaded with
`LlamaForCausalLM.from_pretrained(EXPORT_DIR, torch_dtype=torch.float32)` (spelled `dtype=` on
transformers >= 4.56) and run on the int ids [B, T] (no attention mask: one document per row,
positions 0..T-1); OUT.npy gets the float32 logits [B, T, V]. With --texts (a JSON list of
strings), the first export's `LlamaTokenizer` and `AutoTokenizer` encode them, and --tokens-out
gets {"slow" | "auto": {"class": ..., "ids": [[...], ...], "decoded": [...]}}.

Any missing or unexpected weight name fails the run: transformers would otherwise only log a
warning and leave that weight randomly initialised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaTokenizer


def logits(export_dir: str, ids_BT: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of the export on `ids_BT`."""
    # transformers 4.56 renamed `torch_dtype` to `dtype` (the old name still works, with a warning).
    new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    dtype_kw = {"dtype" if new else "torch_dtype": torch.float32}
    model, info = LlamaForCausalLM.from_pretrained(export_dir, output_loading_info=True, **dtype_kw)
    bad = {k: v for k, v in info.items() if v}  # missing/unexpected/mismatched keys, errors
    if bad:
        raise SystemExit(f"{export_dir}: weights do not load cleanly into LlamaForCausalLM: {bad}")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids_BT.astype(np.int64)))
    return out.logits.float().numpy()


def tokenize(export_dir: str, texts: list[str]) -> dict[str, dict[str, list]]:
    """Ids (with the configured BOS) and round-trip decodes of `texts` by the export's tokenizer.

    Both the SentencePiece `LlamaTokenizer` and what `AutoTokenizer` gives by default (the fast
    tokenizer converted from tokenizer.model, which evaluation harnesses use).
    """
    if not os.path.exists(os.path.join(export_dir, "tokenizer.model")):
        # LlamaTokenizer's own error for this case blames a missing protobuf install.
        raise SystemExit(f"{export_dir} has no tokenizer.model: export with a tokenizer_path.")
    out = {}
    for name, tok in (
        ("slow", LlamaTokenizer.from_pretrained(export_dir)),
        ("auto", AutoTokenizer.from_pretrained(export_dir)),
    ):
        ids = [tok(t)["input_ids"] for t in texts]
        decoded = [tok.decode(i, skip_special_tokens=True) for i in ids]
        out[name] = {"class": type(tok).__name__, "ids": ids, "decoded": decoded}
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", required=True, help=".npy of int token ids [B, T]")
    parser.add_argument("pairs", nargs="+", help="EXPORT_DIR OUT.npy, repeated")
    parser.add_argument("--texts", help="JSON list of strings to tokenize with the first export")
    parser.add_argument("--tokens-out", help="where to write the tokenizer's ids (JSON)")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("positional arguments must be EXPORT_DIR OUT.npy pairs")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stderr)
    ids_BT = np.load(args.ids)
    for export_dir, out in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        np.save(out, logits(export_dir, ids_BT))
    if args.texts:
        with open(args.texts) as f:
            texts = json.load(f)
        with open(args.tokens_out, "w") as f:
            json.dump(tokenize(args.pairs[0], texts), f)


if __name__ == "__main__":
    main(sys.argv[1:])

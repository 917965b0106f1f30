"""Positional model calls for tests that build the layout arrays by hand."""

from tfx_jax.layout import ModelInputs


def forward(model, params, tok, seg, pos, img, slot, start, lat, t, **kw):
    """`model.apply` on `ModelInputs(tok, ..., t)`: (logits, ε̂), plus the cache when decoding."""
    inputs = ModelInputs(tok, seg, pos, img, slot, start, lat, t)
    out = model.apply({"params": params}, inputs, **kw)
    return (out.logits, out.eps) if out.cache is None else (out.logits, out.eps, out.cache)

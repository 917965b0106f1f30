"""Named rematerialisation policies: what the backward pass may keep instead of recomputing.

`model.remat_policy` names one of these; `tfx_jax.models.transformer` wraps each block with it
and `tfx_jax.models.config` validates the name against this table.
"""

from __future__ import annotations

import jax

# What an attention kernel names among its custom-VJP residuals (`checkpoint_name`): its output
# and log-sum-exp. A policy that saves them lets the backward skip re-running the forward
# kernel inside the rematerialised block (`pallas_gpu` names them; other kernels do not).
ATTENTION_RESIDUALS = ("attention_out", "attention_lse")

_policies = jax.checkpoint_policies

REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation (fastest, most memory)
    "full": _policies.nothing_saveable,  # recompute the whole block
    "dots": _policies.checkpoint_dots,  # keep matmul outputs
    # keep weight matmuls (the usual best trade-off for transformers)
    "dots_no_batch": _policies.dots_with_no_batch_dims_saveable,
    # ... and the attention kernel's output + log-sum-exp: no forward attention in the backward
    # (per layer B·T·N·H activations + B·N·T fp32 more memory)
    "dots_no_batch_attention": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable,
        _policies.save_only_these_names(*ATTENTION_RESIDUALS),
    ),
}

"""Named rematerialisation policies: what the backward pass may keep instead of recomputing.

`model.remat_policy` names one of these; `tfx_jax.models.transformer` wraps each block with it
and `tfx_jax.models.config` validates the name against this table.
"""

from __future__ import annotations

import jax

REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    # keep weight matmuls (the usual best trade-off for transformers)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

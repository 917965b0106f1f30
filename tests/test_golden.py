"""Golden numbers of one train step, and a step with no implicit host<->device transfers.

The golden test (nanodo style) pins what one step of the tiny config computes on the 8-device
mesh: the synthetic batch, the initial parameters, the losses and gradient norm of the step, and
the parameters after the update. Any change to the numerics moves one of them; the failure says
which group moved and what to check. Update GOLDEN only when the change is intended (and say so
in the commit): run this file, copy the `got` values it prints.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tfx_jax import artifacts, sharding
from tfx_jax.train.loop import Trainer

# The tiny config (experiments/tiny.py) with everything the numbers depend on pinned here.
# warmup_steps=0: the first step runs at the peak learning rate (with warmup it is 0 and the
# update would be invisible).
OVERRIDES = (
    "train.seed=0",
    "data.seed=0",
    "optimizer.warmup_steps=0",
    "mesh.data=-1",
    "mesh.fsdp=1",
    "mesh.tensor=1",
)

RTOL = 1e-5

# What each group of numbers depends on, in the order to check them.
WHAT_TO_CHECK = {
    "batch": "the data stream: the synthetic source, data.seed, packing, the batch layout",
    "init": "model init: parameter shapes, initializers, rng splitting (train.seed), ModelConfig "
    "defaults",
    "step": "the forward/backward pass: attention/mask, loss terms and weighting (λ, z-loss), "
    "diffusion schedule and noise rng, dtypes",
    "update": "the optimizer: learning-rate schedule, AdamW, clipping, weight-decay mask",
}

# key -> (group, value). Integers are exact; floats within RTOL.
GOLDEN = {
    "batch/tokens_sum": ("batch", 86019),
    "batch/segment_ids_sum": ("batch", 2150),
    "batch/image_ids_sum": ("batch", 608),
    "batch/patches_sum": ("batch", 2.0967382593953516),
    "text_tokens": ("batch", 355),
    "images": ("batch", 28),
    "init/params_abs_sum": ("init", 13594.37943809931),
    "loss": ("step", 11.824186325073242),
    "lm_loss": ("step", 6.772656440734863),
    "diffusion_loss": ("step", 1.0103058815002441),
    "grad_norm": ("step", 5.708720684051514),
    "lr": ("update", 0.003000000026077032),
    "params_abs_sum": ("update", 13594.259918915035),
    "update_abs_sum": ("update", 459.41821005393285),
}


def _abs_sum(tree) -> float:
    """sum |x| over every leaf, in float64 on the host."""
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(tree)))


def _one_step(tiny_config) -> dict[str, float]:
    cfg = tiny_config(overrides=OVERRIDES)
    trainer = Trainer(cfg)
    assert trainer.mesh.size == 8, "the golden numbers are for the 8-device test mesh"
    batch = next(artifacts.batches(cfg))
    got = {f"batch/{k}_sum": np.asarray(batch[k], np.float64).sum() for k in batch}
    init = jax.device_get(trainer.state.params)
    got["init/params_abs_sum"] = _abs_sum(init)
    metrics = jax.device_get(trainer.train_step(batch))
    got.update({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    after = jax.device_get(trainer.state.params)
    got["params_abs_sum"] = _abs_sum(after)
    got["update_abs_sum"] = _abs_sum(jax.tree.map(lambda a, b: a - b, after, init))
    return got


def test_one_step_matches_golden_numbers(tiny_config):
    got = _one_step(tiny_config)
    moved = []
    for key, (group, want) in GOLDEN.items():
        value = got[key]
        ok = value == want if isinstance(want, int) else np.isclose(value, want, rtol=RTOL, atol=0)
        if not ok:
            moved.append((group, key, value, want))
    if moved:
        groups = [g for g in WHAT_TO_CHECK if any(m[0] == g for m in moved)]
        lines = [f"  {k}: got {v!r}, golden {w!r} ({g})" for g, k, v, w in moved]
        hint = [f"  {g}: {WHAT_TO_CHECK[g]}" for g in groups]
        pytest.fail(
            "One train step of the tiny config no longer gives the golden numbers "
            f"(rtol {RTOL}):\n" + "\n".join(lines) + "\nThe first group that moved is the first "
            "place to look (later groups follow from earlier ones):\n" + "\n".join(hint) + "\n"
            "  all of them at once: the mesh/sharding, the jax/XLA version, or the platform.\n"
            "A numerics change that is intended: update GOLDEN in tests/test_golden.py with the "
            "`got` values above. Otherwise it is a bug.",
            pytrace=False,
        )


def test_train_step_makes_no_implicit_transfers(tiny_config):
    """With the batch and the rng already on the devices and the step compiled, the step itself
    moves nothing between host and device or between devices (big_vision style): no host value
    uploaded per call, no metric fetched, no input resharded. Metrics are fetched after the guard.

    `Trainer.step_rng` is made replicated on the mesh; a key on one device would be copied to the
    mesh at every call (a device-to-device transfer the guard refuses, checked below).
    """
    cfg = tiny_config(overrides=OVERRIDES)
    trainer = Trainer(cfg)
    compiled = trainer.compile()
    host = next(artifacts.batches(cfg))
    batch = trainer.put_batch(host)
    assert trainer.step_rng.sharding.is_equivalent_to(sharding.replicated(trainer.mesh), 1)
    one_device_rng = jax.random.key(0)
    jax.block_until_ready((batch, trainer.step_rng, one_device_rng))
    with jax.transfer_guard("disallow"):
        metrics = trainer.train_step(batch)
        metrics = trainer.train_step(batch)  # the second call runs on the donated state's buffers
        # The guard is live: an implicit upload or reshard is refused (before anything runs).
        with pytest.raises(Exception, match="Disallowed host-to-device"):
            compiled(trainer.state, host, trainer.step_rng)
        with pytest.raises(Exception, match="Disallowed device-to-device"):
            compiled(trainer.state, batch, one_device_rng)
    assert int(trainer.state.step) == 2
    assert np.isfinite(float(metrics["loss"]))

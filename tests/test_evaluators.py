"""A failing evaluator never costs a checkpoint or the step's metrics (train.strict_eval)."""

import json

import pytest

from tfx_jax.checkpoint import Checkpointer
from tfx_jax.train import evaluators, loop


def _broken_evaluate(*args, **kw):
    raise RuntimeError("evaluator exploded")


def _run(tiny_config, workdir, strict: bool):
    cfg = tiny_config(
        overrides=[
            "train.steps=4",
            "train.log_every=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "checkpoint.every_steps=2",
            f"train.strict_eval={strict}",
        ]
    )
    return loop.train(cfg, workdir)


def test_failing_evaluator_is_reported_and_training_goes_on(
    tiny_config, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(evaluators, "evaluate", _broken_evaluate)
    history = _run(tiny_config, tmp_path, strict=False)
    assert [h["step"] for h in history] == [2, 4]
    assert [h["eval/failures"] for h in history] == [1.0, 2.0]
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False, create=False)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x and x["step"] == 2 for x in lines)
    failed = [r.getMessage() for r in caplog.records if "evaluator failed" in r.getMessage()]
    assert len(failed) == 2 and "RuntimeError: evaluator exploded" in failed[0]


def test_strict_eval_stops_but_keeps_the_checkpoint(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluators, "evaluate", _broken_evaluate)
    with pytest.raises(RuntimeError, match="evaluator exploded"):
        _run(tiny_config, tmp_path, strict=True)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False, create=False)
    assert ckpt.latest_step() == 2
    ckpt.close()

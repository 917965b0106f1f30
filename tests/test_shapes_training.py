"""The whole data path feeds the trainer: TFDS build → tokenizer → VAE → latents → Grain packing
→ sharded train steps → eval with a sample grid scored by the judge → TensorBoard image."""

import json
import shutil

import numpy as np
import pytest
from conftest import REPO, compilation_cache
from test_multihost import run_processes

from tfx_jax import artifacts
from tfx_jax.checkpoint import Checkpointer
from tfx_jax.config import load_config
from tfx_jax.train.loop import train


@pytest.fixture
def shapes_cache(shapes_run):
    """The compilation cache the session's reference run filled: the 1-process resume below
    reuses its compiles (the 2-process jobs compile afresh: `run_processes`)."""
    with compilation_cache(shapes_run.cache):
        yield


@pytest.mark.slow
def test_shapes_pipeline_trains_and_evaluates(tmp_path, shapes_run, shapes_cache):
    # The data stages and the one-process reference run (to step 6) are the session's
    # `shapes_run` (conftest.py), shared with tests/test_evaluation.py.
    overrides = shapes_run.overrides
    cfg = load_config(REPO / "experiments/demo.py", overrides)
    assert artifacts.vae_is_current(cfg)
    summary = json.loads((artifacts.vae_dir(cfg) / "vae.json").read_text())
    assert summary["heldout_psnr_db"] > 0 and summary["scale_factor"] > 0

    batch = next(artifacts.batches(cfg))
    assert batch["tokens"].shape == (8, 128) and batch["patches"].shape == (8, 128, 16)
    assert (batch["image_ids"] > 0).any() and (batch["segment_ids"] > 0).mean() > 0.8

    # One process, uninterrupted, to step 6: the reference for the runs below.
    ref_cfg = load_config(REPO / "experiments/demo.py", [*overrides, "train.steps=6"])
    reference = shapes_run.reference
    history = [reference[2], reference[4]]
    assert sorted(reference) == [2, 4, 6]
    last = history[-1]
    assert np.isfinite(last["loss"]) and last["images"] > 0
    assert 0.0 <= last["eval/judge_fraction"] <= 1.0 and last["eval/perplexity"] > 1
    assert any(k.startswith("eval/diffusion_loss_t") for k in last)
    assert list((shapes_run.run / "tensorboard").iterdir()), "no TensorBoard events"
    ckpt = Checkpointer(shapes_run.run / "checkpoints", async_save=False, create=False)
    assert ckpt.all_steps() == [4, 6]
    meta = ckpt.read_meta(4)
    ckpt.close()
    assert meta["tokenizer"] == str(artifacts.tokenizer_path(cfg))
    assert meta["vae"] == str(artifacts.vae_dir(cfg)) and meta["config"]["name"] == "demo"

    # The same run as a 2-process job (4 CPU devices each) on the data built above: training,
    # perplexity, the sample grid (generation on every process) and the judge all work, and the
    # step's checkpoint and metrics are written.
    sets = [x for o in overrides for x in ("--set", o)]
    run_processes(
        ["train", "--config", str(REPO / "experiments/demo.py"), "--workdir", str(tmp_path / "two")]
        + sets,
        2,
    )
    lines = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/perplexity" in x]
    assert [x["step"] for x in evals] == [4]
    assert 0.0 <= evals[0]["eval/judge_fraction"] <= 1.0 and evals[0]["eval/failures"] == 0
    ckpt = Checkpointer(tmp_path / "two/checkpoints", async_save=False, create=False)
    assert ckpt.all_steps() == [4]
    ckpt.close()
    data_files = sorted(p.name for p in (tmp_path / "two/checkpoints/4/data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    # Every process plans the same global batches, so two processes train on exactly the data
    # of one, and evaluate on it: the same losses and eval metrics.
    for x in lines:
        if x["step"] in reference and "loss" in x:
            np.testing.assert_allclose(x["loss"], reference[x["step"]]["loss"], rtol=1e-5)
    for key in ("eval/perplexity", "eval/diffusion_loss"):
        np.testing.assert_allclose(evals[0][key], reference[4][key], rtol=1e-5)

    # Elastic data position: the 2-process checkpoint resumes in one process (and the
    # 1-process one in two) exactly where it stopped: step 6 equals the uninterrupted run's.
    history = train(ref_cfg, tmp_path / "two")
    assert [h["step"] for h in history] == [6]
    np.testing.assert_allclose(history[0]["loss"], reference[6]["loss"], rtol=1e-5)
    shutil.copytree(shapes_run.run, tmp_path / "one_to_two")
    shutil.rmtree(tmp_path / "one_to_two/checkpoints/6")
    run_processes(
        ["train", "--config", str(REPO / "experiments/demo.py")]
        + ["--workdir", str(tmp_path / "one_to_two"), *sets, "--set", "train.steps=6"],
        2,
    )
    lines = [
        json.loads(x) for x in (tmp_path / "one_to_two/metrics.jsonl").read_text().splitlines()
    ]
    (last,) = [x for x in lines if x["step"] == 6 and "loss" in x][-1:]
    np.testing.assert_allclose(last["loss"], reference[6]["loss"], rtol=1e-5)

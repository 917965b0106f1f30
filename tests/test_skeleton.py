"""The loop skeleton both trainers run (`train/skeleton.py`): its cadence and exits on a toy job,
its config-mismatch rule on its own, and the same rule through both trainers — a transformer
rerun with a changed experiment key and a VAE rerun with changed settings are refused with the
same one line, and with checkpoint.on_config_mismatch=restart both move the old checkpoints to
checkpoints.stale/ and start fresh."""

import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from test_vae import _run_cfg, _synthetic_images

from tfx_jax.checkpoint import Checkpointer
from tfx_jax.config import CheckpointConfig, ConfigError
from tfx_jax.observability.metric_writers import NullWriter
from tfx_jax.train import loop, skeleton
from tfx_jax.train import vae_trainer as vt
from tfx_jax.train.preemption import Preemption

# The one line of a refused resume, whichever trainer: the keys, then both fixes.
REFUSAL = re.compile(
    r"checkpoint (?P<dir>\S+) step (?P<step>\d+) was made with other settings \((?P<diffs>.+)\): "
    r"resuming it would change the run\. Use (?P<elsewhere>[^,]+), or --set "
    r"checkpoint\.on_config_mismatch=restart to move these checkpoints to (?P<stale>\S+) and "
    r"start fresh\."
)


def _steps(directory) -> list[int]:
    ckpt = Checkpointer(directory, async_save=False, create=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- a toy job


def _toy_job(events: list, batches, preempt: Preemption, signal_at: int = 0, steps: int = 5):
    state = {"w": jnp.zeros((), jnp.float32)}

    def train_step(step, batch):
        state["w"] = state["w"] + batch
        events.append(("step", step))
        if step == signal_at:
            preempt.requested, preempt.signum = True, signal.SIGTERM
        return {"w": state["w"]}

    def log(step, metrics):
        events.append(("log", step))
        return {"w": float(jax.device_get(metrics["w"]))}

    def checkpoint(step):
        events.append(("save", step))
        return dict(state), None, {"step": step}

    def evaluate(step):
        events.append(("eval", step))
        return {"eval/w": float(state["w"])}

    return skeleton.Job(
        name="toy",
        steps=steps,
        log_every=2,
        checkpoint_every=2,
        batches=batches,
        train_step=train_step,
        checkpoint=checkpoint,
        log=log,
        line=lambda step, s: f"toy {step} w={s['w']}",
        postfix=str,
        eval_every=4,
        evaluate=evaluate,
        after_step=lambda step: events.append(("after", step)),
        say=lambda line: events.append(("say", line)),
    )


def _ones():
    while True:
        yield 1.0


def test_cadence_log_save_then_eval(tmp_path):
    events: list = []
    preempt = Preemption()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=10, async_save=False)
    out = skeleton.run(_toy_job(events, _ones(), preempt), ckpt, NullWriter(), preempt, 0)
    ckpt.close()
    assert not out.preempted and out.step == 5
    assert [h["step"] for h in out.history] == [2, 4, 5]  # every 2 steps and the last
    assert out.history[1] == {"step": 4, "w": 4.0, "eval/w": 4.0}  # eval merged into its record
    assert _steps(tmp_path / "checkpoints") == [2, 4, 5]
    at4 = [e for e in events if e[0] != "say" and e[1] == 4]
    assert at4 == [("step", 4), ("log", 4), ("save", 4), ("eval", 4), ("after", 4)]
    assert ("say", "toy 5 w=5.0") in events


def test_a_signal_saves_the_step_and_stops(tmp_path):
    events: list = []
    preempt = Preemption()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=10, async_save=True)
    job = _toy_job(events, _ones(), preempt, signal_at=3)
    out = skeleton.run(job, ckpt, NullWriter(), preempt, 0)
    ckpt.close()
    assert out.preempted and out.step == 3 and out.history[-1]["step"] == 3
    assert _steps(tmp_path / "checkpoints") == [2, 3]  # committed before `run` returned
    assert ("after", 3) not in events and ("eval", 3) not in events


def test_a_data_failure_commits_the_steps_done(tmp_path):
    def dying():
        yield 1.0
        yield 1.0
        raise RuntimeError("Worker process was terminated unexpectedly")

    preempt = Preemption()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=10, async_save=True)
    job = _toy_job([], dying(), preempt)
    job.checkpoint_every = 100
    job.data_hint = " (a hint)"
    with pytest.raises(skeleton.InputPipelineError, match=r"before step 3: Worker.*saved.* hint"):
        skeleton.run(job, ckpt, NullWriter(), preempt, 0)
    ckpt.close()
    assert _steps(tmp_path / "checkpoints") == [2]


# ----------------------------------------------------------------------------- the rule


def _saved(tmp_path, settings: dict) -> epath.Path:
    ckpt_dir = epath.Path(tmp_path) / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    ckpt.save(3, {"w": np.zeros(2, np.float32)}, None, {"settings": settings})
    ckpt.close()
    return ckpt_dir


def _diffs(current: dict):
    return lambda meta, step: [
        f"{k}: {v!r} -> {current[k]!r}" for k, v in meta["settings"].items() if current[k] != v
    ]


def test_matching_settings_resume_the_latest_step(tmp_path):
    ckpt_dir = _saved(tmp_path, {"lr": 1})
    assert (
        skeleton.resume_step(ckpt_dir, _diffs({"lr": 1}), "refuse", elsewhere="x", say=print) == 3
    )
    assert (
        skeleton.resume_step(tmp_path / "none", _diffs({}), "refuse", elsewhere="x", say=print)
        is None
    )


def test_other_settings_are_refused_in_one_line_naming_keys_and_fixes(tmp_path):
    ckpt_dir = _saved(tmp_path, {"lr": 1, "seed": 0})
    with pytest.raises(ConfigError) as e:
        skeleton.resume_step(
            ckpt_dir, _diffs({"lr": 2, "seed": 0}), "refuse", elsewhere="another dir", say=print
        )
    m = REFUSAL.fullmatch(str(e.value))
    assert m, str(e.value)
    assert m["diffs"] == "lr: 1 -> 2" and m["elsewhere"] == "another dir" and m["step"] == "3"
    assert m["stale"] == str(tmp_path / skeleton.STALE_DIR)
    assert _steps(ckpt_dir) == [3] and not (tmp_path / skeleton.STALE_DIR).exists()  # untouched


def test_restart_moves_them_aside_and_starts_fresh(tmp_path):
    (tmp_path / skeleton.STALE_DIR).mkdir()  # an older set, replaced
    (tmp_path / skeleton.STALE_DIR / "old").write_text("x")
    ckpt_dir = _saved(tmp_path, {"lr": 1})
    said = []
    got = skeleton.resume_step(
        ckpt_dir, _diffs({"lr": 2}), "restart", elsewhere="x", say=said.append
    )
    assert got is None
    assert _steps(tmp_path / skeleton.STALE_DIR) == [3]
    assert not (tmp_path / skeleton.STALE_DIR / "old").exists()
    assert not ckpt_dir.exists()
    assert len(said) == 1 and "lr: 1 -> 2" in said[0] and "starting fresh" in said[0]


def test_checkpoint_config_defaults_to_refuse():
    assert CheckpointConfig().on_config_mismatch == "refuse"


# ----------------------------------------------------------------------------- both trainers


def _transformer(tiny_config, workdir, *overrides):
    steps = ["train.steps=2", "train.log_every=1", "checkpoint.every_steps=1"]
    cfg = tiny_config(overrides=[*steps, *overrides])
    history = loop.train(cfg, workdir)
    return [h["step"] for h in history]


def _vae(workdir, *overrides):
    images = _synthetic_images(48, size=16, seed=0), _synthetic_images(12, size=16, seed=1)
    with jax.threefry_partitionable(False):  # as tests/test_vae.py: fast CPU compiles
        out = vt.run(
            _run_cfg("vae.steps=2", "vae.log_every=1", *overrides),
            *images,
            workdir,
            log=lambda _: None,
        )
    return [h["step"] for h in out["history"]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer, changed, key",
    [
        ("transformer", "train.seed=1", "train.seed: 0 -> 1"),  # an experiment key
        ("vae", "vae.kl_weight=0.001", "kl_weight: 1e-06 -> 0.001"),  # a VAE setting
    ],
)
def test_both_trainers_refuse_a_mismatch_then_restart_on_request(
    trainer, changed, key, tiny_config, tmp_path, monkeypatch, compile_cache, fast_compile
):
    calls = []

    def spy(name):
        real = getattr(skeleton, name)

        def called(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(skeleton, name, called)

    spy("resume_step")
    spy("run")

    def train(*overrides):
        if trainer == "transformer":
            return _transformer(tiny_config, tmp_path, *overrides)
        return _vae(tmp_path, *overrides)

    ckpt_dir, stale = tmp_path / "checkpoints", tmp_path / skeleton.STALE_DIR

    train()
    assert calls == ["resume_step", "run"]  # the trainer goes through the skeleton
    first = _steps(ckpt_dir)
    assert first and first[-1] == 2

    with pytest.raises(ConfigError) as e:  # the default: refused, nothing moved or trained
        train(changed)
    m = REFUSAL.fullmatch(str(e.value))
    assert m and key in m["diffs"] and m["stale"] == str(stale), str(e.value)
    assert _steps(ckpt_dir) == first and not stale.exists()

    logged = train(changed, "checkpoint.on_config_mismatch=restart")
    assert logged == [1, 2]  # fresh: every step trained again
    assert _steps(stale) == first  # the old checkpoints, kept aside
    assert _steps(ckpt_dir)[-1] == 2

    assert train(changed) == []  # the new ones resume (at train/vae steps: nothing to train)

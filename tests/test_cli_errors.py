"""Every user mistake is answered by exit code 2 and one line on stderr, never a traceback.

The table runs `cli.main` in-process (fast); one case runs the real `python -m tfx_jax` to show
the process itself prints one line. A property test throws random `--set` values of the wrong
type or range at the config and checks that only `ConfigError` ever comes back.
"""

import dataclasses
import sys
import typing

import pytest
from conftest import REPO, run_subprocess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfx_jax import cli
from tfx_jax.config import Config, ConfigError, load_config, validate

TINY = str(REPO / "experiments" / "tiny.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "syntax.py").write_text("def get_config(:\n    pass\n")
    (root / "imports.py").write_text("import not_a_module_anywhere\n")
    (root / "noarg.py").write_text(
        f"import runpy\n\ndef get_config():\n    return runpy.run_path({TINY!r})['get_config']()\n"
    )
    (root / "raises.py").write_text("def get_config(arg=None):\n    return {}['model']\n")
    (root / "not_image.txt").write_text("hello")
    return root


def _set(*pairs):
    return [x for p in pairs for x in ("--set", p)]


CASES = {
    "missing config file": (["config", "--config", "nope.py", "--workdir", "w"], "does not exist"),
    "config syntax error": (["config", "--config", "{d}/syntax.py", "--workdir", "w"], "line 1"),
    "config import error": (
        ["config", "--config", "{d}/imports.py", "--workdir", "w"],
        "not_a_module_anywhere",
    ),
    "FILE:arg without a parameter": (
        ["config", "--config", "{d}/noarg.py:big", "--workdir", "w"],
        "takes no argument",
    ),
    "get_config raises": (["config", "--config", "{d}/raises.py", "--workdir", "w"], "KeyError"),
    "unknown key": (
        ["config", "--config", TINY, "--workdir", "w", *_set("model.n_hedas=3")],
        "Did you mean 'model.n_heads'",
    ),
    "wrong type": (
        ["config", "--config", TINY, "--workdir", "w", *_set("data.seq_len=abc")],
        "data.seq_len='abc'",
    ),
    "log_every 0": (
        ["config", "--config", TINY, "--workdir", "w", *_set("train.log_every=0")],
        "train.log_every=0",
    ),
    "eval_batches 0": (
        ["config", "--config", TINY, "--workdir", "w"]
        + _set("train.eval_every=5", "train.eval_batches=0"),
        "train.eval_batches=0",
    ),
    "negative learning rate": (
        ["config", "--config", TINY, "--workdir", "w", *_set("optimizer.learning_rate=-1")],
        "optimizer.learning_rate=-1",
    ),
    "mixture weight inf": (
        ["config", "--config", TINY, "--workdir", "w"]
        + _set("data.source=mixture", "data.mixture=text inf source=text path=x"),
        "data.mixture entry 'text': weight 'inf' must be a finite number > 0",
    ),
    "max_examples 0": (
        ["data", "encode", "--config", TINY, *_set("data.max_examples=0")],
        "data.max_examples=0 must be >= 1 when set",
    ),
    # As `train` says it (artifacts.load_tokenizer), not "[Errno 2] ... tokenizer.model".
    "data encode before the tokenizer": (
        ["data", "encode", "--config", str(REPO / "experiments" / "demo.py")]
        + _set("data.data_dir={d}/no_data"),
        "no_data/tokenizer.model is missing: run `python -m tfx_jax data tokenizer`.",
    ),
    "mesh that does not fit": (
        ["config", "--config", TINY, "--workdir", "w", *_set("mesh.data=3")],
        "8 are available",
    ),
    "negative diffusion steps": (
        ["generate", "--workdir", "w", "--prompt", "p", "--diffusion-steps", "-3"],
        "diffusion_steps=-3",
    ),
    "top_p out of range": (
        ["generate", "--workdir", "w", "--prompt", "p", "--top-p", "0"],
        "top_p=0.0",
    ),
    "no checkpoint": (["generate", "--workdir", "{d}/none", "--prompt", "p"], "no complete"),
    "missing image": (
        ["generate", "--workdir", "w", "--prompt", "p", "--image", "{d}/nope.png"],
        "no such file",
    ),
    "image is a directory": (
        ["generate", "--workdir", "w", "--prompt", "p", "--image", "{d}"],
        "no such file",
    ),
    "two markers, one image": (
        ["generate", "--workdir", "w", "--prompt", "<image> and <image>"]
        + ["--image", "{d}/not_image.txt"],
        "2 <image> marker(s)",
    ),
    "two images, one marker": (
        ["generate", "--workdir", "w", "--prompt", "<image> what"]
        + ["--image", "{d}/not_image.txt", "--image", "{d}/not_image.txt"],
        "not used by any prompt",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(name, files, capsys):
    argv, needle = CASES[name]
    argv = [a.replace("{d}", str(files)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_the_real_process_prints_one_line(files):
    proc = run_subprocess(
        [sys.executable, "-m", "tfx_jax", "config", "--config", f"{files}/syntax.py"]
        + ["--workdir", "w"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "syntax error" in lines[0], proc.stderr


# ----------------------------------------------------------------------------- property


def _leaf_fields(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _leaf_fields(typ, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


KEYS = sorted(_leaf_fields())
VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "true", "none", "[1, 2]", "(3,)", "-1", "0", "1e40", "x,y", "nan"]),
    st.text(max_size=12),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_random_overrides_never_raise_anything_but_config_error(key, value):
    try:
        cfg = load_config(TINY, [f"{key}={value}"])
        validate(cfg, num_devices=8)
    except ConfigError as e:
        assert str(e)  # a message for the user

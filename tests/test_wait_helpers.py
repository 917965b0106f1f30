"""tests/conftest.py's limits on subprocesses: stretched by the machine's load, not fixed."""

import os
import sys
import time

import conftest
import pytest


def test_the_scale_follows_the_load_and_the_override(monkeypatch):
    monkeypatch.delenv("TFX_TEST_TIMEOUT_SCALE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0, 4.0, 1.0))
    assert conftest.timeout_scale() == 4.0 and conftest.scaled_timeout(400) == 1600
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.1, 0.0))
    assert conftest.timeout_scale() == 1.0  # idle: the bases as they are
    monkeypatch.setenv("TFX_TEST_TIMEOUT_SCALE", "3")
    assert conftest.scaled_timeout(10) == 30


def test_a_busy_machine_stretches_the_limit_and_a_hung_child_still_fails(monkeypatch):
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(2)"]
    monkeypatch.setenv("TFX_TEST_TIMEOUT_SCALE", "20")  # 1 s idle -> 20 s here
    done = conftest.run_subprocess(sleeper, timeout=1, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "up\n"
    monkeypatch.setenv("TFX_TEST_TIMEOUT_SCALE", "1")
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"limit 0.5 s x load scale 1.00(.|\n)*up"):
        conftest.run_subprocess(sleeper, timeout=0.5, capture_output=True, text=True)
    assert time.monotonic() - t0 < 2  # killed at the limit, not waited out


def test_a_finished_child_is_not_waited_on():
    t0 = time.monotonic()
    quick = conftest.run_subprocess([sys.executable, "-c", "pass"], timeout=600)
    assert quick.returncode == 0 and time.monotonic() - t0 < 5

"""The test fleet's zygote (torchx_diloco/_fleet/zygote.py): a forked trainer or lighthouse is what ``python -m``
would have started (its exit code, its log, its environment, its own session), and what it cannot be starts fresh."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from torchx_diloco._fleet import testing
from torchx_diloco._fleet.testing import PYTHON, Lighthouse, Proc, clean_env, cli_env, free_port
from torchx_diloco._fleet.zygote import ZYGOTE_ENV, ForkedProcess


@pytest.fixture(autouse=True)
def zygote_on(monkeypatch):
    monkeypatch.setenv(ZYGOTE_ENV, "1")


def test_a_forked_trainer_exits_logs_and_reads_its_environment_as_a_fresh_one(tmp_path):
    helped = Proc([PYTHON, "-m", "torchx_diloco.train", "--help"], tmp_path / "help.log")
    assert isinstance(helped.proc, ForkedProcess)
    assert helped.wait(60) == 0
    assert "--outer-steps" in helped.output() and "RuntimeWarning" not in helped.output(), helped.output()[-2000:]
    # its environment is the one asked for, not the zygote's: the trainer reads and refuses it
    env = clean_env(REPLICA_GROUP_ID="0", NUM_REPLICA_GROUPS="many", TORCHFT_LIGHTHOUSE="http://localhost:1")
    refused = Proc([PYTHON, "-m", "torchx_diloco.train", "--model", "nano"], tmp_path / "env.log", env=env)
    assert isinstance(refused.proc, ForkedProcess)
    assert refused.wait(60) == 2
    assert "NUM_REPLICA_GROUPS" in refused.output().strip().splitlines()[-1], refused.output()[-2000:]


def test_a_forked_lighthouse_has_its_own_session_and_dies_by_its_signal(tmp_path):
    lighthouse = Lighthouse(tmp_path)
    assert isinstance(lighthouse.proc, ForkedProcess)
    assert os.getsid(lighthouse.proc.pid) == lighthouse.proc.pid  # killpg reaches it and what it starts
    lighthouse.kill(signal.SIGKILL)
    assert lighthouse.proc.wait(10) == -signal.SIGKILL


def test_what_a_fork_cannot_be_starts_a_fresh_interpreter(tmp_path, monkeypatch):
    port = str(free_port())
    other_path = Proc(
        [PYTHON, "-m", "torchx_diloco.train", "--help"], tmp_path / "a.log", env=clean_env(PYTHONPATH=str(tmp_path))
    )
    other_module = Proc([PYTHON, "-c", "print('hello')"], tmp_path / "b.log")
    monkeypatch.setenv(ZYGOTE_ENV, "0")
    switched_off = Proc([PYTHON, "-m", "torchx_diloco.lighthouse", "--port", port], tmp_path / "c.log")
    try:
        for p in (other_path, other_module, switched_off):
            assert isinstance(p.proc, subprocess.Popen), p.argv
        assert other_path.wait(60) == 0 and other_module.wait(60) == 0
    finally:
        switched_off.kill()


@pytest.mark.parametrize("args", [["--help"], ["run", "diloco.diloco", "--outer_step", "3"]], ids=["help", "bad-flag"])
def test_a_torchx_call_is_forked_and_prints_what_the_script_prints(tmp_path, monkeypatch, args):
    """``run_cli`` of the ``torchx`` script forks TorchX's CLI from the zygote; its exit code, stdout and stderr
    (usage lines name the program: ``torchx``) are the script's own, from a fresh interpreter."""
    forks: list = []  # what the real maybe_fork returned: the wrapper only records it (nothing is replaced)
    fork = testing.maybe_fork
    monkeypatch.setattr(testing, "maybe_fork", lambda *a, **kw: forks.append(fork(*a, **kw)) or forks[-1])
    argv = ["torchx", *args]
    forked = testing.run_cli(argv, cwd=tmp_path, env=cli_env(), timeout=120)
    assert [type(f) for f in forks] == [ForkedProcess]
    fresh = subprocess.run(argv, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)

    def seen(out: subprocess.CompletedProcess) -> tuple:  # (its log lines' times aside)
        return out.returncode, *(
            re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<time>", t) for t in (out.stdout, out.stderr)
        )

    assert seen(forked) == seen(fresh)
    assert "torchx" in (fresh.stdout + fresh.stderr).splitlines()[0]

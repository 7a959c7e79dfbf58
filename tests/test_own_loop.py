"""Your own loop: the public API (``torchx_diloco.group_manager``, ``DiLoCo``, ``CheckpointStore``), the README's
Python API snippet run for real, the components' ``--script``/``--m``, and examples/own_loop under ``torchx run``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_until
from torchx_diloco._fleet.testing import BIN, PYTHON, REPO, Lighthouse, clean_env, cli_env, group_env, run_cli
from torchx_diloco.cluster import lighthouse_status, live_replicas
from torchx_diloco_components import diloco as component

EXAMPLE = "examples/own_loop/train.py"


def readme_python() -> str:
    """The ```python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    return re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)


# --- the package ---------------------------------------------------------------------------------------------


def test_the_public_api_is_lazy_and_complete():
    code = (
        "import sys, torchx_diloco as t\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported eagerly'\n"
        "assert set(t.__all__) <= set(dir(t))\n"
        "print([getattr(t, n).__name__ for n in ('DiLoCo', 'group_manager', 'CheckpointStore', 'UserError')])\n"
        "from torchx_diloco.cluster import MIN_REPLICAS_ENV\n"
        "print(MIN_REPLICAS_ENV)\n"
    )
    out = subprocess.run([PYTHON, "-c", code], env=clean_env(), capture_output=True, text=True, check=True).stdout
    assert "['DiLoCo', 'group_manager', 'CheckpointStore', 'UserError']" in out
    assert out.split()[-1] == component.MIN_REPLICAS_ENV  # the components cannot import cluster (it needs torch)


def test_the_readme_documents_the_api_and_stays_short():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text) < 12_000, len(text)
    code = readme_python()
    for name in ("group_manager", "DiLoCo", "CheckpointStore"):
        assert name in code


@pytest.mark.slow
def test_the_readme_python_api_snippet_runs_and_resumes(tmp_path):
    """The snippet as a script, against a real lighthouse, with the environment a component sets; run twice:
    the second run resumes at the last outer step and has nothing left to do."""
    (tmp_path / "snippet.py").write_text(readme_python())
    lighthouse = Lighthouse(tmp_path, min_replicas=1, idle_exit=60)
    try:
        env = group_env(0, 1, lighthouse.url, {"TORCHX_DILOCO_RUN_ID": "readme"})
        for _ in range(2):
            run = subprocess.run(
                [PYTHON, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
            )
            assert run.returncode == 0, run.stderr[-3000:]
            assert "group 0 done at outer step 3" in run.stdout
    finally:
        lighthouse.kill()
    assert sorted(p.name for p in (tmp_path / "checkpoints/my-loop").iterdir()) == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
    ]


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({}, {}, "TORCHFT_LIGHTHOUSE is not set"),
        ({}, {"NUM_REPLICA_GROUPS": "2"}, "REPLICA_GROUP_ID is not set"),
        ({"group_id": 2, "num_groups": 2}, {}, "REPLICA_GROUP_ID=2 is outside 0..1"),
        ({"lighthouse": "localhost:1"}, {}, "is not a lighthouse URL"),
    ],
    ids=["no-lighthouse", "no-group-id", "group-out-of-range", "not-a-url"],
)
def test_group_manager_says_what_is_missing(monkeypatch, kwargs, env, message):
    """In this process, with the environment a component sets emptied first (the check comes before any Manager)."""
    import torchx_diloco as t

    for name in ("TORCHFT_LIGHTHOUSE", "REPLICA_GROUP_ID", "NUM_REPLICA_GROUPS", "TORCHX_DILOCO_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(t.UserError) as e:
        t.group_manager(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_group_manager_refuses_a_lighthouse_of_another_run(tmp_path, monkeypatch):
    """A real lighthouse of another run (its own process, showing its run id): refused before any heartbeat."""
    import torchx_diloco as t

    for name in ("REPLICA_GROUP_ID", "NUM_REPLICA_GROUPS"):
        monkeypatch.delenv(name, raising=False)
    lighthouse = Lighthouse(tmp_path, extra=["--run-id", "someone-else"], idle_exit=60)
    try:  # once it shows its run on /status (its launcher's first look, half a second in)
        wait_until(
            "the run mark", lambda: "someone-else.lighthouse_0" in live_replicas(lighthouse_status(lighthouse.url)), []
        )
        monkeypatch.setenv("TORCHFT_LIGHTHOUSE", lighthouse.url)
        monkeypatch.setenv("TORCHX_DILOCO_RUN_ID", "mine")
        with pytest.raises(t.UserError) as e:
            t.group_manager().shutdown(wait=False)
    finally:
        lighthouse.kill()
    assert "serves another run" in str(e.value) and "not run mine" in str(e.value)


# --- the components: --script and --m ------------------------------------------------------------------------


def _torchrun_command(app) -> str:
    return app.roles[1].args[1] if app.roles[0].name == "lighthouse" else app.roles[0].args[1]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # a --script path is relative to the working directory


def test_script_runs_the_users_program_with_its_own_flags_and_the_same_environment(in_repo):
    app = component.diloco("--my-flag", "1", "--lr=3", script=EXAMPLE, min_replicas=2, replica_groups=3)
    for role in app.roles[1:]:
        cmd = role.args[1]
        assert cmd.endswith(f"--max_restarts 3 {EXAMPLE} --my-flag 1 --lr=3"), cmd
        assert "export TORCHFT_LIGHTHOUSE=" in cmd and "TORCHX_DILOCO_RUN_ID=" in cmd
        assert role.env["TORCHX_DILOCO_MIN_REPLICAS"] == "2" and role.env["NUM_REPLICA_GROUPS"] == "3"
    group = component.replica_group(
        "--x", m="my_pkg.train", lighthouse_url="http://localhost:29510", group=1, run_id="r1"
    )
    cmd = group.roles[0].args[1]
    assert cmd.endswith("--max_restarts 3 -m my_pkg.train --x") and "TORCHX_DILOCO_RUN_ID=r1" in cmd, cmd
    assert group.roles[0].env["REPLICA_GROUP_ID"] == "1"
    # our own trainer is unchanged
    assert _torchrun_command(component.diloco()).endswith("-m torchx_diloco.train --min-replicas 1")
    assert "TORCHX_DILOCO_MIN_REPLICAS" not in component.diloco().roles[1].env


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(script=EXAMPLE, m="my_pkg.train"), "--script and --m both given: pass one of them"),
        (dict(script="no/such/train.py"), "--script 'no/such/train.py' does not exist in"),
        (dict(m="my-pkg/train.py"), "is not a Python module name"),
        (dict(script=EXAMPLE, outer_steps=3, model="nano"), "--outer_steps, --model configure our trainer"),
        (dict(m="my_pkg.train", checkpoint_dir="c"), "--checkpoint_dir configure our trainer"),
        (dict(m="my_pkg.train", sync_every=5), "--sync_every configure our trainer"),
    ],
)
def test_script_and_m_are_refused_with_one_line(kwargs, message, in_repo):
    for build in (component.diloco, lambda **kw: component.replica_group(lighthouse_url="http://h:1", **kw)):
        with pytest.raises(component.ComponentError) as e:
            build(**kwargs)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_torchx_cli_refuses_a_missing_script_before_launch(tmp_path):
    argv = [str(BIN / "torchx"), "run", "-s", "local_cwd", "diloco.diloco", "--script", "train.py", "--", "--a", "1"]
    run = run_cli(argv, cwd=tmp_path, env=cli_env(), timeout=120)
    assert run.returncode != 0 and "--script 'train.py' does not exist in" in run.stderr + run.stdout


# --- examples/own_loop under torchx run ----------------------------------------------------------------------


def _run_example(tmp_path: Path, outer_steps: int, log_dir: str) -> str:
    cmd = [
        str(BIN / "torchx"),
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={tmp_path / log_dir}",
        "diloco.diloco",
        "--replica_groups",
        "2",
        "--max_restarts",
        "0",
        "--lighthouse_idle_exit",
        "1",
        "--script",
        EXAMPLE,
        "--",
        "--outer-steps",
        str(outer_steps),
        "--sync-every",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    run = subprocess.run(cmd, cwd=REPO, env=cli_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=150)
    assert run.returncode == 0 and "SUCCEEDED" in run.stderr + run.stdout, (run.stdout + run.stderr)[-4000:]
    logs = sorted((tmp_path / log_dir).glob("torchx/*/replica_group_*/0/stdout.log"))
    assert len(logs) == 2, logs
    return "\n".join(log.read_text() for log in logs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_own_loop_example_trains_a_hf_model_checkpoints_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    first = _run_example(tmp_path, 1, "logs1")
    assert "resumed" not in first
    for g in (0, 1):
        assert f"group {g} done at outer step 1" in first, first
    steps = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000001"], steps
    assert {p.name for p in (tmp_path / "ckpt/step_00000001").iterdir()} >= {
        "MANIFEST.global.json",
        "MANIFEST.replica_group_0.json",
        "MANIFEST.replica_group_1.json",
    }

    second = _run_example(tmp_path, 2, "logs2")
    for g in (0, 1):
        assert f"group {g} resumed from {tmp_path / 'ckpt'}/step_00000001" in second, second
        assert f"group {g}: outer step 2" in second and f"group {g}: outer step 1," not in second
        assert f"group {g} done at outer step 2" in second
    assert (tmp_path / "ckpt/step_00000002/MANIFEST.global.json").exists()

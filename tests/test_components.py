"""The TorchX components (components/diloco.py): lint, --help, the AppDefs they build, and what the real
local_cwd and Slurm schedulers make of them in dry runs. Fast: nothing is launched here (see test_run_e2e.py).

GPUs: this machine has none, so two things stand for an 8-GPU machine: TORCHX_DILOCO_GPUS=8 (the component's
documented override of its GPU count) and a fake ``nvidia-smi`` on PATH that lists 8 GPUs (the binary TorchX's
local scheduler asks before it sets CUDA_VISIBLE_DEVICES). Everything else is the real TorchX.
"""

from __future__ import annotations

import inspect
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from torchx.schedulers import get_scheduler_factories
from torchx.specs import file_linter, finder
from torchx.specs.api import InvalidRunConfigException

from torchx_diloco._fleet.testing import REPO, run_cli
from torchx_diloco.config import FLAG_DEFAULTS
from torchx_diloco.gpus import machine_gpus
from torchx_diloco_components import diloco as comp

COMPONENTS = ["diloco", "lighthouse", "replica_group"]
BIN = Path(sys.executable).parent


@pytest.fixture
def no_gpus(monkeypatch):
    """Pretend nothing about GPUs is known (the check is then skipped, as on a GPU-less login node)."""
    monkeypatch.delenv(comp.GPUS_ENV, raising=False)
    monkeypatch.setenv("PATH", str(BIN))  # no nvidia-smi (nor sinfo: the Slurm dry run assumes its default)


@pytest.fixture
def eight_gpus(monkeypatch, tmp_path):
    """An 8-GPU machine for both the component's check and TorchX's auto_set_cuda_visible_devices."""
    fake = tmp_path / "fakebin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: Fake GPU (UUID: GPU-fake-$i)"; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{BIN}:{os.environ['PATH']}")
    monkeypatch.setenv(comp.GPUS_ENV, "8")


def torchx_cli(*args: str, cwd: Path, env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    full_env.update(env or {})
    return run_cli([str(BIN / "torchx"), *args], cwd=cwd, env=full_env, timeout=120)


def local_dryrun(app, tmp_path, **cfg) -> Dict[str, List[Dict[str, str]]]:
    """role -> replica envs, as the real local_cwd scheduler would start them."""
    sched = get_scheduler_factories()["local_cwd"]("test")
    info = sched.submit_dryrun(app, dict(log_dir=str(tmp_path / "logs"), **cfg))
    return {role: [r.env for r in replicas] for role, replicas in info.request.role_params.items()}


def group_cmd(role) -> str:
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return role.args[1]


# --- lint, names, --help ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", COMPONENTS)
def test_components_pass_torchx_linter(fn):
    assert file_linter.validate(comp.__file__, fn) == []


def test_entry_point_names_and_builtins_stay_listed(tmp_path):
    """`pip install` registers diloco.* next to TorchX's own components (from any directory)."""
    for fn in COMPONENTS:
        found = finder.get_component(f"diloco.{fn}")
        assert found.fn is getattr(comp, fn) and found.validation_errors == []
    out = torchx_cli("builtins", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^\s*\d+\. (\S+)$", out.stdout, re.M))
    assert {
        "dist.ddp",
        "dist.torchrun",
        "utils.echo",
        "diloco.diloco",
        "diloco.lighthouse",
        "diloco.replica_group",
    } <= listed
    assert not any(name.split(".")[-1].startswith("_") for name in listed), "helpers must not be listed"


@pytest.mark.parametrize("fn", COMPONENTS)
def test_help_documents_every_parameter(fn, tmp_path):
    out = torchx_cli("run", f"diloco.{fn}", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    params = [p for p in inspect.signature(getattr(comp, fn)).parameters.values() if p.kind != p.VAR_POSITIONAL]
    # every option has text of its own from the docstring, not only argparse's default
    helps = dict(re.findall(r"^  (?:-\w+ \w+, )?--(\w+) \w+\s*(.*)$", out.stdout, re.M))
    for p in params:
        assert helps.get(p.name) and not helps[p.name].startswith("(default"), (p.name, out.stdout)
    assert "(required)" not in out.stdout.split("options:")[0], "the optional script_args are not required"


def option_helps(help_text: str) -> Dict[str, Tuple[str, str]]:
    """`torchx run COMPONENT --help` -> {parameter: (the type it shows, its whole help text on one line)}."""
    options = help_text.split("\noptions:\n", 1)[1]
    starts = list(re.finditer(r"^  (?:-\w+ \w+, )?--(\w+) (\w+)", options, re.M))
    ends = [m.start() for m in starts[1:]] + [len(options)]
    return {m[1]: (m[2], " ".join(options[m.end() : end].split())) for m, end in zip(starts, ends, strict=True)}


@pytest.mark.parametrize("fn", COMPONENTS)
def test_help_types_numbers_as_numbers_and_says_each_default_once(fn, tmp_path):
    """The trainer's parameters show the trainer's own defaults (config.FLAG_DEFAULTS), typed; no "(default:
    None)" after a default the docstring already told."""
    out = torchx_cli("run", f"diloco.{fn}", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    options = option_helps(out.stdout)
    for p in inspect.signature(getattr(comp, fn)).parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            continue
        shown_type, text = options[p.name]
        assert text.count("default:") == (p.default is not p.empty), (p.name, text)
        if isinstance(p.default, (int, float)):
            assert shown_type == type(p.default).__name__, (p.name, shown_type)
    if fn != "lighthouse":
        for name, type_name in (("outer_steps", "int"), ("sync_every", "int"), ("model", "str")):
            assert options[name] == (type_name, options[name][1]) and options[name][1].endswith(
                f"(default: {FLAG_DEFAULTS[name]})"
            ), options[name]
        assert options["checkpoint_dir"][1].endswith(f"(default: {FLAG_DEFAULTS['checkpoint_dir']})")
    if fn == "diloco":
        assert options["lighthouse_port"][0] == "int"


def test_trainer_parameters_at_their_defaults_leave_the_trainer_its_own(no_gpus):
    """Unset (or given the default) is the training module's default: only a changed value is passed on."""

    def torchrun(**kwargs) -> str:
        return group_cmd(comp.diloco(**kwargs).roles[1]).split("; exec ", 1)[1]

    assert torchrun().endswith("-m torchx_diloco.train --min-replicas 1")
    same = dict(
        outer_steps=FLAG_DEFAULTS["outer_steps"], sync_every=FLAG_DEFAULTS["sync_every"], model=FLAG_DEFAULTS["model"]
    )
    assert torchrun(**same, checkpoint_dir=FLAG_DEFAULTS["checkpoint_dir"]) == torchrun()
    words = shlex.split(torchrun(outer_steps=3, sync_every=FLAG_DEFAULTS["sync_every"]))
    assert words[-4:] == ["--min-replicas", "1", "--outer-steps", "3"]


# --- the AppDef ---------------------------------------------------------------------------------------


def test_diloco_on_cpu_lighthouse_first_then_groups(no_gpus):
    app = comp.diloco(
        "--batch-size",
        "8",
        replica_groups=3,
        cpu=2,
        max_restarts=5,
        lighthouse_port=29999,
        min_replicas=2,
        outer_steps=4,
        lighthouse_idle_exit=3,
        env={"FOO": "bar"},
    )
    assert [r.name for r in app.roles] == ["lighthouse", "replica_group_0", "replica_group_1", "replica_group_2"]
    lh = app.roles[0]
    assert lh.entrypoint == "python" and lh.resource.gpu == 0 and lh.env["CUDA_VISIBLE_DEVICES"] == ""
    assert lh.args == [
        "-m",
        "torchx_diloco.lighthouse",
        "--port",
        "29999",
        "--min-replicas",
        "2",
        "--idle-exit",
        "3",
        "--join-timeout-ms",
        "60000",  # the straggler grace's default (STRAGGLER_GRACE_S)
        "--run-id",
        "${app_id}",
    ]
    for g, role in enumerate(app.roles[1:]):
        assert role.env["REPLICA_GROUP_ID"] == str(g) and role.env["NUM_REPLICA_GROUPS"] == "3"
        assert role.env["OMP_NUM_THREADS"] == "2" and role.env["FOO"] == "bar"
        assert role.env["CUDA_VISIBLE_DEVICES"] == ""  # CPU groups stay off GPUs
        assert role.resource.cpu == 2 and role.resource.gpu == 0
        words = shlex.split(group_cmd(role).split("exec ", 1)[1])
        assert words[:9] == [
            "torchrun",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "1",
            "--max_restarts",
            "5",
            "-m",
        ]
        assert words[9:] == ["torchx_diloco.train", "--min-replicas", "2", "--outer-steps", "4", "--batch-size", "8"]
        assert "export TORCHX_DILOCO_RUN_ID=${app_id};" in group_cmd(role)  # the run's groups and lighthouse
        # the lighthouse host comes from TorchX's rank0_env macro, escaped for bash
        assert "export TORCHFT_LIGHTHOUSE=http://$${${rank0_env}:-localhost}:29999;" in group_cmd(role)


def test_local_cwd_expands_lighthouse_host_and_gives_each_group_its_own_master_port(no_gpus, tmp_path):
    envs = local_dryrun(comp.diloco(lighthouse_port=29510), tmp_path)
    sched = get_scheduler_factories()["local_cwd"]("test")
    req = sched.submit_dryrun(comp.diloco(lighthouse_port=29510), {"log_dir": str(tmp_path)}).request
    cmds = [req.role_params[f"replica_group_{g}"][0].args[2] for g in range(2)]
    for cmd in cmds:
        assert "TORCHFT_LIGHTHOUSE=http://${TORCHX_RANK0_HOST:-localhost}:29510" in cmd
        assert "--standalone" in cmd and "--master_port" not in cmd  # torchrun picks a free port per group
    assert envs["replica_group_0"][0]["TORCHX_RANK0_HOST"] == "localhost"
    url = subprocess.run(
        ["bash", "-c", cmds[0].split("; exec")[0] + '; echo "$TORCHFT_LIGHTHOUSE"'],
        env={"TORCHX_RANK0_HOST": "localhost", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert url == "http://localhost:29510"


def test_local_auto_set_gives_groups_distinct_gpus_and_the_lighthouse_none(eight_gpus, tmp_path):
    app = comp.diloco(replica_groups=2, gpus_per_group=2)
    assert [r.resource.gpu for r in app.roles] == [0, 2, 2]
    envs = local_dryrun(app, tmp_path, auto_set_cuda_visible_devices=True)
    assert envs["lighthouse"][0]["CUDA_VISIBLE_DEVICES"] == ""
    assert envs["replica_group_0"][0]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert envs["replica_group_1"][0]["CUDA_VISIBLE_DEVICES"] == "2,3"
    for role in app.roles[1:]:
        assert "--nproc_per_node 2" in group_cmd(role)


def test_local_gpu_assignment_is_used_as_given(eight_gpus, tmp_path):
    app = comp.diloco(replica_groups=2, gpus_per_group=2, gpu_assignment="4,5;6,7")
    envs = local_dryrun(app, tmp_path)
    assert envs["lighthouse"][0]["CUDA_VISIBLE_DEVICES"] == ""
    assert envs["replica_group_0"][0]["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert envs["replica_group_1"][0]["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_cli_dryrun_with_fake_gpus(eight_gpus, tmp_path):
    """The same through `torchx run --dryrun` (what a user types)."""
    out = torchx_cli(
        "run",
        "-s",
        "local_cwd",
        "--dryrun",
        "-cfg",
        "auto_set_cuda_visible_devices=True",
        "diloco.diloco",
        "--gpus_per_group",
        "2",
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
    )
    assert out.returncode == 0, out.stderr
    # the AppDef, then the PopenRequest with the roles in order: lighthouse, replica_group_0, replica_group_1
    request = out.stdout.split("=== SCHEDULER REQUEST ===", 1)[1]
    assert re.findall(r"'CUDA_VISIBLE_DEVICES': '([\d,]*)'", request) == ["", "0,1", "2,3"]


def test_slurm_sbatch_lighthouse_is_het_group_0_and_groups_ask_for_gpus(no_gpus):
    app = comp.diloco(replica_groups=2, gpus_per_group=2, cpu=8, memMB=16000, lighthouse_port=29510)
    sched = get_scheduler_factories()["slurm"]("test")  # what `torchx run -s slurm` uses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no sinfo here, assuming Slurm 24.05" (off a cluster's login node)
        script = sched.submit_dryrun(app, {"partition": "gpu"}).request.materialize()
    headers = script.split("#SBATCH hetjob")
    assert len(headers) == 3
    assert "--job-name=lighthouse-0" in headers[0] and "gpus" not in headers[0]
    for g in (1, 2):
        assert f"--job-name=replica_group_{g - 1}-0" in headers[g]
        assert re.search(r"--gpus-per-(node|task)=2\b", headers[g])
        assert "--cpus-per-task=8" in headers[g] and "--mem=16000" in headers[g]
    srun = script.split("\nsrun ", 1)[1]
    assert srun.count("TORCHFT_LIGHTHOUSE=http://${SLURM_JOB_NODELIST_HET_GROUP_0:-localhost}:29510") == 2
    assert "torchx_diloco.lighthouse" in srun.split(":\\\n")[0]
    assert "--nproc_per_node 2" in srun


def test_the_straggler_grace_is_the_lighthouses_join_timeout_and_below_the_quorum_timeout(no_gpus):
    """How long a sync waits for a group of the last one (tests/test_straggler.py: what happens after it)."""
    for app in (comp.diloco(straggler_grace_s=2.5), comp.lighthouse(straggler_grace_s=2.5)):
        args = app.roles[0].args
        assert args[args.index("--join-timeout-ms") + 1] == "2500"
    with pytest.raises(ValueError, match=r"^--straggler_grace_s 0 must be > 0 seconds$"):
        comp.diloco(straggler_grace_s=0)
    with pytest.raises(ValueError, match=r"^--straggler_grace_s 120 must be below the trainer's --quorum-timeout 120"):
        comp.diloco(straggler_grace_s=120)
    comp.diloco("--quorum-timeout", "300", straggler_grace_s=120)  # raised with it: fine


def test_replica_group_and_lighthouse_alone(no_gpus):
    lh = comp.lighthouse(port=29600, min_replicas=2, idle_exit=0)
    assert [r.name for r in lh.roles] == ["lighthouse"] and "--port" in lh.roles[0].args
    app = comp.replica_group(
        "--seq-len", "32", lighthouse_url="http://node7:29600", group=1, replica_groups=3, min_replicas=2
    )
    (role,) = app.roles
    assert role.name == "replica_group_1"
    assert role.env["REPLICA_GROUP_ID"] == "1" and role.env["NUM_REPLICA_GROUPS"] == "3"
    assert "export TORCHFT_LIGHTHOUSE=http://node7:29600;" in group_cmd(role)
    assert group_cmd(role).endswith("--min-replicas 2 --seq-len 32")
    app = comp.replica_group(lighthouse_url="http://h:1", gpus=2, cuda_visible_devices="2,3")
    assert app.roles[0].env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_script_args_override_component_flags(no_gpus):
    cmd = group_cmd(comp.diloco("--checkpoint-dir", "memory://x", replica_groups=1).roles[1])
    words = shlex.split(cmd.split("exec ", 1)[1])
    assert words[-2:] == ["--checkpoint-dir", "memory://x"]  # argparse keeps the last one


def test_a_model_factory_and_its_args_reach_every_group(no_gpus):
    """--model package.module:factory passes the components' check (its import is the trainer's business)."""
    args = '{"arch": "gpt2", "n_layer": 2}'
    app = comp.diloco("--model-args", args, model="torchx_diloco.hf:causal_lm", replica_groups=2)
    for role in app.roles[1:]:
        words = shlex.split(group_cmd(role).split("exec ", 1)[1])
        assert words[words.index("--model") + 1] == "torchx_diloco.hf:causal_lm"
        assert words[words.index("--model-args") + 1] == args


# --- bad input: one clear ValueError before anything starts -------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(replica_groups=0), r"--replica_groups 0: .*pass 1 or more"),
        (dict(replica_groups=2, min_replicas=3), r"--min_replicas 3 must be within 1..2"),
        (dict(replica_groups=2, gpus_per_group=2, gpu_assignment="0,1"), r"has 1 entries for 2 groups"),
        (dict(replica_groups=2, gpus_per_group=2, gpu_assignment="0,1;2"), r"exactly 2 GPUs"),
        (dict(replica_groups=2, gpus_per_group=2, gpu_assignment="0,1;1,2"), r"names a device twice"),
        (dict(replica_groups=2, gpus_per_group=1, gpu_assignment="0;x"), r"not a list of device numbers"),
        (dict(replica_groups=2, gpus_per_group=1, gpu_assignment="0;9"), r"device\(s\) \[9\] .* GPUs 0..7"),
        (dict(h="no-such-host"), r"not a registered named resource"),
        (dict(lighthouse_port=70000), r"lighthouse port 70000 must be within 1..65535"),
        # training flags, checked with the training module's own parser
        (dict(sync_every=-5), r"argument --sync-every: -5 must be >= 1 \(see python -m torchx_diloco.train --help\)"),
        (dict(outer_steps=0), r"argument --outer-steps: 0 must be >= 1"),
        (dict(model="huge"), r"argument --model: 'huge' is neither a preset \(nano, tiny, small, medium\)"),
        (dict(model="torchx_diloco.hf"), r"--model: 'torchx_diloco.hf' is neither a preset .* package.module:factory"),
        (dict(script_args=("--model-args", "{n_layer: 2}")), r"--model-args: '\{n_layer: 2\}' is not JSON"),
        (dict(script_args=("--model-args", "4")), r"--model-args: '4' is not a JSON object"),
        (dict(script_args=("--bogus-flag", "1")), r"unrecognized arguments: --bogus-flag 1"),
        (dict(script_args=("--batch-size", "eight")), r"argument --batch-size: 'eight' is not a number"),
        (dict(script_args=("--min-replicas", "3")), r"--min-replicas 3 exceeds the 2 replica groups"),
        (dict(sync_every=10, script_args=("--fragments", "4")), r"--sync-every 10 is not a multiple of --fragments 4"),
        (dict(script_args=("--codec", "fp8")), r"--codec: invalid choice: 'fp8'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_fix(eight_gpus, kwargs, message):
    script_args = kwargs.pop("script_args", ())
    with pytest.raises(ValueError, match=message) as e:
        comp.diloco(*script_args, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_lighthouse_url_and_group(no_gpus):
    with pytest.raises(ValueError, match="not http://HOST:PORT"):
        comp.replica_group(lighthouse_url="node7")
    with pytest.raises(ValueError, match="outside 0..1"):
        comp.replica_group(lighthouse_url="http://node7:29510", group=2, replica_groups=2)


@pytest.mark.skipif(os.path.isdir("/proc/driver/nvidia/gpus"), reason="this machine has NVIDIA GPUs")
def test_gpu_check_skipped_where_gpus_are_unknown(no_gpus):
    """A login node without GPUs may submit GPU groups to Slurm: no local count, no refusal."""
    assert machine_gpus() is None
    app = comp.diloco(replica_groups=4, gpus_per_group=8)
    assert app.roles[1].resource.gpu == 8
    for scheduler in ("local_cwd", "slurm"):
        get_scheduler_factories()[scheduler]("test").submit_dryrun(app, {})  # no refusal


@pytest.mark.parametrize("dryrun", [True, False])
@pytest.mark.parametrize(
    "args, message",
    [
        (["--replica_groups", "0"], "--replica_groups 0: DiLoCo needs at least 1 group; pass 1 or more"),
        (["--outer_steps", "1", "--", "--bogus-flag", "1"], "unrecognized arguments: --bogus-flag 1"),
        (["--sync_every", "-5"], "argument --sync-every: -5 must be >= 1"),
        # TorchX's own parser of the component's flags: no prefix taken, a number typed as one, one line
        (["--outer_step", "3"], "unrecognized arguments: --outer_step: did you mean --outer_steps? Flags are never"),
        (["--outer_steps", "3.5"], "argument --outer_steps: invalid int value: '3.5' (see torchx run diloco.diloco"),
    ],
)
def test_cli_bad_input_fails_in_about_a_second_with_the_trainers_line(tmp_path, dryrun, args, message):
    """What a user types, with and without --dryrun: nothing starts, no traceback, the one line, exit 1."""
    start = time.monotonic()
    out = torchx_cli(
        "run",
        *(["--dryrun"] if dryrun else []),
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={tmp_path / 'logs'}",
        "diloco.diloco",
        *args,
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr and "usage:" not in out.stderr, out.stderr
    assert not (tmp_path / "logs").exists(), "nothing may have started"
    assert time.monotonic() - start < 20  # about a second here; generous for a loaded CI machine


def test_repo_torchxconfig_runs_diloco_on_local_cwd(tmp_path):
    """Bare `torchx run` in the repo root: the diloco component, local_cwd, logs in the gitignored torchx_logs."""
    out = torchx_cli("run", "--dryrun", cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "torchx_logs/torchx/diloco-" in out.stdout
    joined = re.sub(r"'\s*\n\s*'", "", out.stdout)  # pprint splits long strings into adjacent literals
    assert "-m torchx_diloco.train --min-replicas 1'" in joined  # the component's and trainer's own defaults
    assert "/torchx_logs/" in (REPO / ".gitignore").read_text()


def test_repo_torchxconfig_leaks_no_laptop_settings_into_a_slurm_submission(no_gpus):
    """The numbers of `make run` are on its command line; a Slurm job from the repo root gets the defaults."""
    out = torchx_cli("run", "-s", "slurm", "--dryrun", "diloco.diloco", "--gpus_per_group", "8", cwd=REPO)
    assert out.returncode == 0, out.stderr
    script = re.sub(r"'\s*\n\s*'", "", out.stdout)
    assert "--outer-steps" not in script and "--model" not in script and "--cpus-per-task=1\n" not in script
    make = subprocess.run(
        ["make", "-n", "run"], cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin"}
    ).stdout
    assert "torchx run diloco.diloco --outer_steps 6 --sync_every 50 --model tiny" in make


def test_each_run_gets_its_own_free_lighthouse_port_and_run_id(no_gpus, tmp_path):
    """Two default runs on one machine must not share a lighthouse (their groups would average each other)."""
    ports = set()
    for _ in range(3):
        app = comp.diloco()
        port = int(app.roles[0].args[app.roles[0].args.index("--port") + 1])
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when the app was built
        assert f":{port}; exec torchrun" in group_cmd(app.roles[1])
        ports.add(port)
    assert len(ports) == 3
    sched = get_scheduler_factories()["local_cwd"]("test")
    runs = [sched.submit_dryrun(comp.diloco(), {"log_dir": str(tmp_path)}).request for _ in range(2)]
    for req in runs:  # the lighthouse and every group carry this app's id as the run id
        lighthouse_args = req.role_params["lighthouse"][0].args
        assert lighthouse_args[lighthouse_args.index("--run-id") + 1] == req.app_id
        assert f"export TORCHX_DILOCO_RUN_ID={req.app_id};" in req.role_params["replica_group_1"][0].args[2]
    assert runs[0].app_id != runs[1].app_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = get_scheduler_factories()["slurm"]("test").submit_dryrun(comp.diloco(), {}).request.materialize()
    # TorchX turns the app_id macro into the het job's id, expanded by the batch script's shell
    assert """--run-id ''"$SLURM_JOB_ID"''""" in script
    assert script.count("""export TORCHX_DILOCO_RUN_ID='"$SLURM_JOB_ID"';""") == 2


# --- GPUs: each scheduler checks what it can know -------------------------------------------------------------


def test_local_cwd_refuses_more_gpus_than_this_machine_has_in_all(eight_gpus, tmp_path):
    app = comp.diloco(replica_groups=5, gpus_per_group=2)
    with pytest.raises(InvalidRunConfigException, match="10 GPUs requested but this machine has 8: lower"):
        get_scheduler_factories()["local_cwd"]("test").submit_dryrun(app, {"log_dir": str(tmp_path)})


def test_slurm_checks_each_group_against_one_nodes_gpus(eight_gpus):
    """The README's Slurm example: 4 groups x 8 GPUs, one node each, TORCHX_DILOCO_GPUS=8 (a node's GPUs)."""
    sched = get_scheduler_factories()["slurm"]("test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = sched.submit_dryrun(comp.diloco(replica_groups=4, gpus_per_group=8), {}).request.materialize()
        assert script.count("#SBATCH hetjob") == 4
        with pytest.raises(InvalidRunConfigException, match="a group asks for 16 GPUs but a Slurm node has at most 8"):
            sched.submit_dryrun(comp.diloco(replica_groups=2, gpus_per_group=16), {})


def test_a_checkpoint_folder_another_live_run_holds_is_refused_before_launch(tmp_path):
    """A live run's lease in --checkpoint_dir (this test process holds it, as a run's group would): `torchx run`
    refuses in one line naming the folder, the holder and the fixes, before anything starts; --take-over after
    `--` goes ahead, and so do groups of the holder's own run (diloco.replica_group --run_id)."""
    from torchx_diloco.lease import Lease

    folder = tmp_path / "ckpt"
    holder = Lease(str(folder), "the-other-run", ttl_s=600)
    holder.acquire()
    held = folder / "LEASE.json"
    before = held.read_bytes()
    out = torchx_cli(
        "run", "--dryrun", "-s", "local_cwd", "diloco.diloco", "--checkpoint_dir", str(folder), cwd=tmp_path
    )
    assert out.returncode == 1, out.stdout + out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert f"{folder} is held by run 'the-other-run'" in line and "--take-over" in line, out.stderr
    assert "Traceback" not in out.stderr and held.read_bytes() == before
    comp.diloco("--take-over", checkpoint_dir=str(folder))  # explicit take-over: launched (the trainer takes it)
    url = "http://localhost:29510"
    comp.replica_group(lighthouse_url=url, run_id="the-other-run", checkpoint_dir=str(folder))
    with pytest.raises(comp.ComponentError, match="is held by run 'the-other-run'"):
        comp.replica_group(lighthouse_url=url, run_id="mine", checkpoint_dir=str(folder))
    holder.release()
    comp.diloco(checkpoint_dir=str(folder))  # released: free


# --- groups that differ: resources and trainer flags, one value for all or one per group -------------------------


def test_per_group_resources_reach_each_group_and_the_local_scheduler(eight_gpus, tmp_path):
    app = comp.diloco(replica_groups=3, gpus_per_group="2", cpu="8,8,4", memMB="16000,16000,8000")
    groups = app.roles[1:]
    assert [(r.resource.gpu, r.resource.cpu, r.resource.memMB) for r in groups] == [
        (2, 8, 16000),
        (2, 8, 16000),
        (2, 4, 8000),
    ]
    assert [re.search(r"--nproc_per_node (\d+)", group_cmd(r))[1] for r in groups] == ["2", "2", "2"]
    assert [r.env["OMP_NUM_THREADS"] for r in groups] == ["4", "4", "2"]  # cores / processes
    envs = local_dryrun(app, tmp_path, auto_set_cuda_visible_devices=True)
    assert [envs[f"replica_group_{g}"][0]["CUDA_VISIBLE_DEVICES"] for g in range(3)] == ["0,1", "2,3", "4,5"]
    # an assignment sets each group's count; with counts given, each entry must match its own
    app = comp.diloco(replica_groups=2, gpu_assignment="0,1;3,5")
    assert [r.resource.gpu for r in app.roles[1:]] == [2, 2]
    with pytest.raises(ValueError, match=r"gives group 1 1 GPUs but it has exactly 2 GPUs"):
        comp.diloco(replica_groups=2, gpus_per_group="3,2", gpu_assignment="0,1,2;3")


@pytest.mark.parametrize(
    "kwargs,ranks",
    [
        (dict(gpus_per_group="2,2,1"), "2,2,1"),
        (dict(gpu_assignment="0,1,2;3;4"), "3,1,1"),
        (dict(nodes_per_group="1,2,1"), "1,2,1"),  # CPU: one rank per node
        (dict(nodes_per_group="2,1,1", gpus_per_group="4,4,8"), "8,4,8"),
    ],
)
def test_groups_of_other_rank_counts_are_refused_before_launch(eight_gpus, kwargs, ranks):
    """Rank r of a group syncs with rank r of the others only (one torchft Manager per rank): a group with more
    ranks than another would have ranks without peers, which hang at the first sync."""
    with pytest.raises(comp.ComponentError, match=rf"^the groups would run {ranks} ranks \(nodes x GPUs per node\)"):
        comp.diloco(replica_groups=3, **kwargs)


def test_layouts_of_other_rank_counts_differ_at_the_first_sync():
    """Groups submitted as separate jobs (the component sees one group): their layouts differ at the first sync."""
    from torchx_diloco.exchange import layout_signature

    assert layout_signature(1, "fp32", 1000, ranks=2) != layout_signature(1, "fp32", 1000, ranks=1)
    assert layout_signature(1, "fp32", 1000) == layout_signature(1, "fp32", 1000, ranks=1)


def test_per_group_resources_and_nodes_make_a_het_job_whose_components_differ(no_gpus):
    """Slurm: group 0 on two nodes of 4 GPUs, group 1 on one node of 8 (8 ranks each); each group's rendezvous is on
    its own first het component (1 for group 0, 3 for group 1: the lighthouse is 0 and group 0 holds 1 and 2)."""
    app = comp.diloco(replica_groups=2, gpus_per_group="4,8", cpu="16,32", memMB="32000,64000", nodes_per_group="2,1")
    sched = get_scheduler_factories()["slurm"]("test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = sched.submit_dryrun(app, {"partition": "gpu"}).request.materialize()
    headers = script.split("#SBATCH hetjob")
    assert len(headers) == 4  # the lighthouse, group 0's two nodes, group 1's one
    for header, gpus, cpus, mem in ((headers[1], 4, 16, 32000), (headers[2], 4, 16, 32000), (headers[3], 8, 32, 64000)):
        assert re.search(rf"--gpus-per-(node|task)={gpus}\b", header), header
        assert f"--cpus-per-task={cpus}" in header and f"--mem={mem}" in header
    assert "SLURM_JOB_NODELIST_HET_GROUP_1" in group_cmd(app.roles[1]) and "--nnodes 2" in group_cmd(app.roles[1])
    assert "--standalone" in group_cmd(app.roles[2]) and "--nnodes 1" in group_cmd(app.roles[2])
    app = comp.diloco(replica_groups=2, nodes_per_group="1,2", gpus_per_group="8,4")
    assert "SLURM_JOB_NODELIST_HET_GROUP_2" in group_cmd(app.roles[2])


def test_per_group_trainer_flags_reach_every_group_and_each_groups_values_are_checked(no_gpus):
    from torchx_diloco.config import parse_config

    app = comp.diloco("--batch-size", "16,8", "--sync-every", "10,5", replica_groups=2)
    env = {"NUM_REPLICA_GROUPS": "2", "TORCHFT_LIGHTHOUSE": "http://h:1"}
    for g, (batch, h) in enumerate([(16, 10), (8, 5)]):
        argv = shlex.split(group_cmd(app.roles[1 + g]).split(" -m torchx_diloco.train ", 1)[1])
        cfg = parse_config(argv, {**env, "REPLICA_GROUP_ID": str(g)})  # what the group's trainer reads
        assert (cfg.data.batch_size, cfg.diloco.sync_every) == (batch, h)
    with pytest.raises(ValueError, match=r"^group 1: --sync-every 5 is not a multiple of --fragments 2: make H a"):
        comp.diloco("--sync-every", "10,5", "--fragments", "2", replica_groups=2)
    with pytest.raises(ValueError, match=r"--batch-size 16,8,4 gives 3 values for 2 replica groups: give one value"):
        comp.diloco("--batch-size", "16,8,4", replica_groups=2)
    with pytest.raises(ValueError, match=r"unrecognized arguments: --codec int8,int4|invalid choice"):
        comp.diloco("--codec", "int8,int4", replica_groups=2)  # what must agree takes one value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gpus_per_group="2,2"), r"--gpus_per_group 2,2 gives 2 values for 3 groups: give one for all or one per"),
        (dict(cpu="4,x,4"), r"--cpu 4,x,4: 'x' is not a whole number \(cores per group\)"),
        (dict(cpu="0"), r"--cpu 0: 0 must be >= 1 \(cores per group\)"),
        (dict(nodes_per_group="1,0,1"), r"--nodes_per_group 1,0,1: 0 must be >= 1"),
        (dict(h="a,b"), r"-h a,b gives 2 named resources for 3 groups"),
    ],
)
def test_bad_per_group_values_fail_in_one_line(no_gpus, kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        comp.diloco(replica_groups=3, **kwargs)
    assert "\n" not in str(e.value)


def test_local_cwd_answers_after_close_as_torchx_log_threads_ask_it(tmp_path):
    """`torchx run`'s log threads (daemons) tail each replica by asking the scheduler how the app is: after Ctrl-C
    they may ask once more after our close() forgot the app's request. A failed app must still be described (a
    KeyError there printed a thread's traceback under the one-line stop message)."""
    from torchx.specs import AppDef, AppState, Role

    from torchx_diloco.local import create_scheduler

    scheduler = create_scheduler("test")
    role = Role("fails", image=str(tmp_path), entrypoint=sys.executable, args=["-c", "import sys; sys.exit(3)"])
    app_id = scheduler.schedule(scheduler.submit_dryrun(AppDef("fails", roles=[role]), {"log_dir": str(tmp_path)}))
    deadline = time.monotonic() + 60
    while (resp := scheduler.describe(app_id)) is None or resp.state != AppState.FAILED:
        assert time.monotonic() < deadline, f"the app did not fail: {resp}"
        time.sleep(0.05)
    scheduler.close()
    after = scheduler.describe(app_id)
    assert after is not None and after.state == AppState.FAILED
    assert list(scheduler.log_iter(app_id, "fails", should_tail=True)) == []  # tails to the end, quietly

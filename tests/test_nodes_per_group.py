"""--nodes_per_group: the app's shape, its rendezvous port and the refusals, in dry runs (nothing launched)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from torchx_diloco._fleet.testing import BIN, REPO, cli_env, run_cli
from torchx_diloco_components import diloco as comp


def test_nodes_per_group_below_one_is_refused_in_one_line() -> None:
    for build in (
        lambda: comp.diloco(nodes_per_group=0),
        lambda: comp.replica_group(lighthouse_url="http://h:1", nodes_per_group=0),
    ):
        with pytest.raises(comp.ComponentError, match=r"^--nodes_per_group 0: 0 must be >= 1[^\n]*$"):
            build()


def test_each_group_is_n_replicas_rendezvousing_on_its_own_first_het_component() -> None:
    app = comp.diloco(replica_groups=2, nodes_per_group=2, lighthouse_port=29510)
    groups = app.roles[1:]
    assert [r.num_replicas for r in app.roles] == [1, 2, 2]
    for g, role in enumerate(groups):
        cmd = role.args[1]
        assert f'"$$SLURM_JOB_NODELIST_HET_GROUP_{1 + 2 * g}"' in cmd  # het group 0 is the lighthouse
        assert "--nnodes 2" in cmd and "--rdzv_backend c10d" in cmd and "--standalone" not in cmd
        assert role.env["REPLICA_GROUP_ID"] == str(g)
        assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # a fresh store per life on every node
    one = comp.diloco(replica_groups=2, lighthouse_port=29510)
    assert all("--standalone" in r.args[1] and r.num_replicas == 1 for r in one.roles[1:])
    assert not any("TORCH_DISABLE_SHARE_RDZV_TCP_STORE" in r.env for r in one.roles)


def test_a_multi_node_group_outside_slurm_stops_with_one_line() -> None:
    role = comp.replica_group(lighthouse_url="http://h:1", nodes_per_group=2)
    cmd = role.roles[0].args[1].replace("$$", "$")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("--nodes_per_group 2 needs Slurm") and "\n" not in out.stderr.strip()


def _port(role, het_ids: dict) -> int:
    """The rendezvous port the group's shell works out, given the Slurm job ids of the job's het components."""
    cmd = role.args[1].replace("$$", "$")  # what bash runs once TorchX substituted its macros
    expr = re.search(r"port=(\$\(\(.*?\)\)); ", cmd).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({f"SLURM_JOB_ID_HET_GROUP_{k}": str(v) for k, v in het_ids.items()})
    out = subprocess.run(["bash", "-c", f"echo {expr}"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_the_rendezvous_port_comes_from_the_job_id_so_two_jobs_on_one_host_differ() -> None:
    app = comp.diloco(replica_groups=2, nodes_per_group=2, lighthouse_port=29510)
    for role in app.roles[1:]:
        assert "--rdzv_endpoint $$host:$$port" in role.args[1]

    def ports(leader: int) -> list:  # Slurm numbers a het job's components leader, leader + 1, ...
        return [_port(role, {k: leader + k for k in range(5)}) for role in app.roles[1:]]

    first, second = ports(4711), ports(4716)  # two jobs in a row, e.g. sharing the hosts of an oversubscribed node
    assert len(set(first + second)) == 4, (first, second)
    assert all(comp.RDZV_PORT <= p < comp.RDZV_PORT + comp.RDZV_PORTS < 32768 for p in first + second)
    assert ports(4711) == first  # a function of the job id: every node of a group computes the same port
    # separate jobs (diloco.replica_group): each group's own job id
    group = comp.replica_group(lighthouse_url="http://h:1", nodes_per_group=2).roles[0]
    assert _port(group, {0: 4800, 1: 4801}) != _port(group, {0: 4802, 1: 4803})


def test_local_cwd_refuses_groups_of_several_nodes_at_submit_in_one_line(tmp_path) -> None:
    """The real `torchx run -s local_cwd`: exit 1, one line naming the fix, nothing started (no log folder)."""
    logs = tmp_path / "logs"
    for component in ("diloco", "replica_group"):
        url = ["--lighthouse_url", "http://localhost:29510"] if component == "replica_group" else []
        argv = [str(BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={logs}"]
        argv += [f"{REPO}/components/diloco.py:{component}", *url, "--nodes_per_group", "2"]
        p = run_cli(argv, cwd=tmp_path, env=cli_env(), timeout=120)
        assert p.returncode == 1, p.stdout + p.stderr
        lines = [ln for ln in p.stderr.splitlines() if "--nodes_per_group 2 needs Slurm" in ln]
        assert len(lines) == 1 and lines[0].endswith("or submit with -s slurm"), p.stderr
        assert "drop --nodes_per_group" in lines[0] and "Traceback" not in p.stderr
        assert "local_cwd://" not in p.stdout and not logs.exists()

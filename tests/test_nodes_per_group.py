"""--nodes_per_group: the app's shape and the refusals, in dry runs (nothing launched)."""

from __future__ import annotations

import os
import subprocess

import pytest

from torchx_diloco_components import diloco as comp


def test_nodes_per_group_below_one_is_refused_in_one_line() -> None:
    for build in (
        lambda: comp.diloco(nodes_per_group=0),
        lambda: comp.replica_group(lighthouse_url="http://h:1", nodes_per_group=0),
    ):
        with pytest.raises(comp.ComponentError, match=r"^--nodes_per_group 0 must be >= 1[^\n]*$"):
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
    one = comp.diloco(replica_groups=2, lighthouse_port=29510)
    assert all("--standalone" in r.args[1] and r.num_replicas == 1 for r in one.roles[1:])


def test_a_multi_node_group_outside_slurm_stops_with_one_line() -> None:
    role = comp.replica_group(lighthouse_url="http://h:1", nodes_per_group=2)
    cmd = role.roles[0].args[1].replace("$$", "$")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("--nodes_per_group 2 needs Slurm") and "\n" not in out.stderr.strip()

"""A network fault, not only a process fault: one group's link is cut in the middle of a sync for 20 s.

Three replica groups, each under torchrun in its own network namespace (:mod:`torchx_diloco._fleet.netlab`), reach the
lighthouse and each other through a hub, over veth pairs shaped to 5 Mbit/s: a sync (the all-reduce of the nano
GPT's pseudo-gradient, about 0.6 MB per group) then takes most of a second, so there is a sync to cut in the
middle of, and the run's pace is set by the link more than by this machine's cores. Once group 1 has sent part of
a sync, its cable is pulled at the hub (``ip link set <veth> down``) for 20 s, then plugged back in.

Nothing is mocked: a real lighthouse, real torchrun agents and workers, real namespaces and links. What must
happen: the other two groups drop the round in flight and go on committing without group 1; group 1's worker
survives (its quorum is retried while the lighthouse is unreachable), rejoins, heals from a peer and trains to
the end; and the chaos harness's single-history invariant (:mod:`torchx_diloco._fleet.chaos`: one weights digest per
committed outer step across all groups, no step missing, checkpoints that agree) holds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from torchx_diloco._fleet import chaos, netlab
from torchx_diloco._fleet.testing import Group, Lighthouse

pytestmark = pytest.mark.slow

GROUPS = 3
VICTIM = 1  # the group whose link is cut
OUTER_STEPS = 40  # the others commit ~25 steps while group 1 is away and coming back; ~10 are left after
SYNC_EVERY = 10
LINK_RATE = "5mbit"  # tc tbf on both ends of every veth
CUT_S = 20.0
IN_FLIGHT_BYTES = 64 * 1024  # the cut comes once group 1 has sent this much of a sync (heartbeats are far less)
COLLECTIVE_TIMEOUT_S = 5  # the others give up on the round in flight after this
QUORUM_TIMEOUT_S = 10  # group 1's quorum call fails after this while cut, and is retried
LIGHTHOUSE_TIMEOUT_S = 60  # ... for this long (> CUT_S: the worker outlives the cut)
HEARTBEAT_TIMEOUT_MS = 3000  # the lighthouse leaves a silent group out of the next quorum after this
MIN_REPLICAS = 2  # the two connected groups are a quorum; one group alone is not


@pytest.fixture
def lab() -> Iterator[netlab.Lab]:
    """Namespaces named after this process (a benchmark or another test run on this machine keeps its own)."""
    why = netlab.available()
    if why:
        pytest.skip(f"network namespaces cannot be made here: {why}")
    with netlab.Lab(GROUPS, prefix=f"dlnf{os.getpid()}-") as built:
        yield built


def commits(ckpt: str, group: int) -> List[Dict[str, Any]]:
    return [r for r in chaos.read_records(ckpt, group) if r.get("committed")]


def wait_for_commits(ckpt: str, group: int, count: int, timeout: float, members: List[Group]) -> Dict[str, Any]:
    """``group``'s ``count``-th committed record, once it is written; fails early if a group process exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = commits(ckpt, group)
        if len(done) >= count:
            return done[count - 1]
        exited = {m.group: m.proc.poll() for m in members if m.proc.poll() is not None}
        if exited:
            raise AssertionError(f"groups exited (code per group: {exited}) before group {group}'s commit {count}")
        time.sleep(0.02)
    raise AssertionError(f"group {group} did not reach {count} commits in {timeout:g}s")


def cut_mid_sync(lab: netlab.Lab, ckpt: str, members: List[Group]) -> Tuple[float, int, int]:
    """Cut the victim's link once it has sent ``IN_FLIGHT_BYTES`` of the sync after a fresh commit.

    Returns (time of the cut, bytes of this sync it had sent, the outer step that sync was for).
    """
    pid = members[VICTIM].worker()
    assert pid is not None, "group 1 has no live worker"
    last = wait_for_commits(ckpt, VICTIM, len(commits(ckpt, VICTIM)) + 1, 30, members)  # line up on a fresh commit
    base = netlab.tx_bytes_of(pid, lab.iface(VICTIM))
    assert base is not None, f"cannot read the link counters of group 1's worker (pid {pid})"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sent = netlab.tx_bytes_of(pid, lab.iface(VICTIM))
        assert sent is not None, f"group 1's worker (pid {pid}) exited before its next sync"
        if sent - base >= IN_FLIGHT_BYTES:
            lab.cut(VICTIM)
            return time.time(), sent - base, last["outer_step"] + 1
        time.sleep(0.001)
    raise AssertionError("group 1 sent no sync within 30 s of its last commit")


def finish(members: List[Group], timeout: float) -> List[str]:
    """Wait for every group to exit 0; return their logs."""
    deadline = time.monotonic() + timeout
    for m in members:
        rc = m.wait(max(1.0, deadline - time.monotonic()))
        assert rc == 0, f"group {m.group} exited {rc}:\n{m.output()[-3000:]}"
    return [m.output() for m in members]


@pytest.mark.timeout(300)
def test_link_cut_mid_sync_for_20s_others_go_on_it_heals_and_one_history_survives(
    tmp_path: Path, lab: netlab.Lab
) -> None:
    started = time.monotonic()
    ckpt = str(tmp_path / "ckpt")
    lab.shape(LINK_RATE)
    args = [
        *chaos.SMALL,
        *("--outer-steps", str(OUTER_STEPS), "--sync-every", str(SYNC_EVERY), "--group-wait", "60"),
        *("--collective-timeout", str(COLLECTIVE_TIMEOUT_S), "--quorum-timeout", str(QUORUM_TIMEOUT_S)),
        *("--lighthouse-timeout", str(LIGHTHOUSE_TIMEOUT_S), "--min-replicas", str(MIN_REPLICAS)),
        *("--checkpoint-dir", ckpt),
    ]
    lighthouse = Lighthouse(
        tmp_path,
        min_replicas=MIN_REPLICAS,
        idle_exit=0,
        netns=lab.hub,
        host=netlab.HUB_ADDR,
        timeout=60,
        extra=["--heartbeat-timeout-ms", str(HEARTBEAT_TIMEOUT_MS)],
    )
    members: List[Group] = []
    try:
        # torchrun restarts a worker that dies (it should not need to: checked below)
        members = [lab.group(g, GROUPS, lighthouse.url, args, tmp_path, max_restarts=3) for g in range(GROUPS)]
        for g in range(GROUPS):
            wait_for_commits(ckpt, g, 2, 150, members)
        pid = members[VICTIM].worker()
        cut_at, sent, in_flight = cut_mid_sync(lab, ckpt, members)
        assert not lab.link_up(VICTIM), "the cut group's end of its link still has a carrier"
        time.sleep(CUT_S)
        pid_during = members[VICTIM].worker()
        lab.restore(VICTIM)
        restored_at = time.time()
        back = wait_for_commits(ckpt, VICTIM, len(commits(ckpt, VICTIM)) + 1, 60, members)
        pid_after = members[VICTIM].worker()
        logs = finish(members, 150)
    finally:
        for m in members:
            m.kill()
        lighthouse.kill()
    wall = time.monotonic() - started

    # the cut landed in a sync, and the cut group committed nothing while cut
    victim = commits(ckpt, VICTIM)
    assert not [r for r in victim if cut_at < r["time"] < restored_at], "group 1 committed while its link was down"
    others = [g for g in range(GROUPS) if g != VICTIM]
    dropped = {}
    for g in others:
        records = [r for r in chaos.read_records(ckpt, g) if r["time"] > cut_at]
        assert records, f"group {g} wrote nothing after the cut"
        first = records[0]
        assert first["committed"] is False and first["outer_step"] == in_flight, (
            f"group {g} should have dropped outer step {in_flight} (group 1 cut part way through its all-reduce), "
            f"its first record after the cut is {first}"
        )
        # ... then went on without group 1: a quorum of the two of them, round after round
        during = [r for r in records if r.get("committed") and r["time"] < restored_at]
        assert len(during) >= 5, f"group {g} committed only {len(during)} steps in the {CUT_S:g} s of the cut"
        assert {r["participants"] for r in during} == {GROUPS - 1}, during
        dropped[g] = sum(1 for r in records if r["committed"] is False)

    # the cut group's worker outlived the cut (no restart), came back, healed forward and trained to the end
    assert pid_during == pid and pid_after == pid, f"group 1's worker changed: {pid} -> {pid_during} -> {pid_after}"
    after_cut = logs[VICTIM][logs[VICTIM].find("quorum failed") :]
    assert "quorum failed" in logs[VICTIM] and "healed from a peer" in after_cut, logs[VICTIM][-3000:]
    assert back["outer_step"] > in_flight + 1, f"group 1 should have healed past the steps it missed: {back}"
    heal_s = back["time"] - restored_at
    assert heal_s < 45, f"group 1 took {heal_s:.0f} s after the restore to commit again"
    for g in range(GROUPS):
        last = commits(ckpt, g)[-1]
        assert last["outer_step"] == OUTER_STEPS and last["participants"] == GROUPS, (g, last)

    # one history: one weights digest per committed step across all groups, none missing, checkpoints agree
    audit = chaos.audit(ckpt, GROUPS, OUTER_STEPS, logs, rollback_allowed=False)
    assert audit.problems == [], audit.problems
    assert audit.committed_steps == OUTER_STEPS and audit.latest_checkpoint == OUTER_STEPS
    assert audit.mismatches == 0 and audit.lost == 0 and audit.recommitted == 0
    assert audit.checkpoints_checked >= 1
    print(
        f"cut group 1's link after it sent {sent / 1024:.0f} KiB of the sync for outer step {in_flight}; "
        f"groups {others} dropped {dropped} rounds in all and committed without it; its worker (pid {pid}) "
        f"survived, committed outer step {back['outer_step']} {heal_s:.1f} s after the restore; wall {wall:.0f} s"
    )

"""Chaos harness: real replica groups under torchrun, SIGKILLed at chosen instants, then audited from what they wrote.

Shared by ``tests/test_chaos.py`` (a few kills, for CI) and ``scripts/chaos.py`` (the long form, with a summary
table and ``docs/fault-tolerance.json``), which is why it lives in the package. Everything is real: one torchft
lighthouse, one ``torchrun`` agent per replica group (it restarts a killed worker), one checkpoint folder shared by
all groups (:mod:`torchx_diloco._fleet.testing` starts them). Nothing is mocked.

What is audited (:func:`audit`) is the *single-history invariant*, checked only from the metrics JSON lines and
the checkpoints the groups wrote:

1. **One result per step.** For every outer step ``k`` there is exactly one ``weights_sha`` and one participant
   count among *all* committed records of ``k``: every group, every worker life, every whole-job restart.
   Two quorums committing the same step differently (split brain), or a restarted run re-training a step to a
   different result, breaks this.
2. **No gap.** The union over groups of committed steps is exactly ``1..N`` and every group printed
   ``finished at outer step N``: the run reached its end and no step is missing from the global sequence.
3. **No rollback while someone is alive** (worker kills only). A group never commits a step it already
   committed: a restarted worker resumes from a checkpoint or heals from a peer, and either way moves forward
   from the newest state the survivors hold. Whole-job restarts do re-train the steps after the newest complete
   checkpoint; (1) then requires that re-training to reproduce the same weights bit for bit.
4. **Storage agrees with the history.** ``CheckpointStore.latest`` loads step ``N``, and every complete
   checkpoint still on disk holds global weights whose checksum is the agreed ``weights_sha`` of its step.

Together: step ``k+1`` was taken from the one agreed state of step ``k`` (a different parent would give a
different result than the other groups or the uninterrupted run got), so "committed steps lost" is the number of
steps in ``1..N`` that are missing or have more than one result; the goal is 0.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from torchx_diloco._fleet.testing import Group, Lighthouse, kill_pid, metrics_url, proc_state, read_metrics
from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore
from torchx_diloco.checkpoint.store import MIN_PART_WAIT_S  # a dead peer's part is waited for this long
from torchx_diloco.metrics import weights_checksum

SMALL = ["--model", "nano", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "0"]
# nano with a floor of 15 ms per inner step: a run lasts about as long on a fast CPU as on a slow one, so the
# worker kills, which are made only while enough of the run is left to come back, fit on any machine
PACED = ["--model", "torchx_diloco._fleet.models:paced_nano", "--model-args", '{"step_s": 0.015}']
PHASES = ("inner", "sync", "checkpoint")
FIRST_ROUND = ("checkpoint", "sync", "inner")  # the last of a short run is a kill that never holds a peer up
COLLECTIVE_TIMEOUT_S = 10  # bounds an all-reduce with a peer that died at an unlucky instant
RESTART_EXTRA = ["--checkpoint-every", "2"]  # whole-job kills: some land after a commit with no checkpoint yet


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- processes -------------------------------------------------------------------------------------------------
class Job:
    """One lighthouse and ``groups`` torchrun groups sharing ``ckpt``: what a TorchX app runs, by hand."""

    def __init__(
        self, work: Path, ckpt: str, groups: int, train_args: Sequence[str], min_replicas: int, tag: str = ""
    ) -> None:
        self.groups = groups
        self.lighthouse = Lighthouse(work, min_replicas=min_replicas, idle_exit=0)
        args = [*train_args, "--checkpoint-dir", ckpt, "--min-replicas", str(min_replicas)]
        self.members = [
            Group(g, groups, self.lighthouse.url, args, work, tag=tag, max_restarts=1000) for g in range(groups)
        ]

    def running(self) -> bool:
        return any(m.proc.poll() is None for m in self.members)

    def wait(self, timeout: float) -> List[Optional[int]]:
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        return [m.proc.poll() for m in self.members]

    def kill(self) -> None:
        """The whole job at once: agents first (no restarts), workers, then the lighthouse."""
        workers = [m.worker() for m in self.members]
        for m in self.members:
            if m.proc.poll() is None:
                os.killpg(m.proc.pid, signal.SIGKILL)
        for pid in workers:
            if pid is not None:
                kill_pid(pid)
        for m in self.members:
            m.proc.wait()
        self.lighthouse.kill()


# --- what the groups recorded --------------------------------------------------------------------------------
def read_records(ckpt: str, group: int) -> List[Dict[str, Any]]:
    """The group's JSON lines; a line a SIGKILL cut short comes back as ``torn_line`` (counted by :func:`audit`)."""
    return read_metrics(metrics_url(ckpt, group))


def committed_since(ckpt: str, group: int, since: float) -> List[Dict[str, Any]]:
    return [r for r in read_records(ckpt, group) if r.get("committed") and r["time"] > since]


def last_committed_step(ckpt: str, groups: int) -> int:
    return max((r["outer_step"] for g in range(groups) for r in read_records(ckpt, g) if r.get("committed")), default=0)


def window_s(ckpt: str, group: int, default: float = 0.5, since: float = 0) -> float:
    """Recent time between two commits of ``group`` (after ``since``): the length of an inner-step window."""
    times = [r["time"] for r in read_records(ckpt, group) if r.get("committed") and r["time"] > since][-8:]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if 0 < b - a < 10]
    return statistics.median(gaps) if gaps else default


def wait_for_commit(ckpt: str, group: int, since: float, timeout: float, job: Job) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = committed_since(ckpt, group, since)
        if new:
            return new[0]
        if not job.running():
            raise AssertionError(f"the job ended while waiting for group {group} to commit")
        time.sleep(0.05)
    raise AssertionError(f"group {group} committed no outer step within {timeout:g}s of {since:.1f}")


# --- worker kills ----------------------------------------------------------------------------------------------
@dataclass
class Kill:
    n: int
    group: int
    phase: str  # what the harness aimed at
    pid: int
    at: float  # time.time() of the SIGKILL
    step: int  # the victim's last committed step when it died
    evidence: str  # what /proc and the checkpoint folder showed at that instant
    landed: bool  # whether the evidence confirms the aimed-at phase
    recovered_step: Optional[int] = None  # the victim's first commit after its restart
    recovery_s: Optional[float] = None
    how: str = ""  # "resumed+healed", "healed", "resumed" (from the worker's log)
    dropped_rounds: int = 0  # rounds the peers dropped between the kill and the victim's return


def kill_worker(job: Job, ckpt: str, group: int, phase: str, rng: random.Random, n: int) -> Optional[Kill]:
    """Wait for the instant ``phase`` names in ``group``'s worker, SIGKILL it, and say what was going on.

    inner: a random point in the middle of an inner-step window (the worker is computing: state R, mostly).
    sync: the end of a window, once the main thread has blocked >= 15 ms (quorum or all-reduce; an inner step
    never blocks that long with OMP_NUM_THREADS=1).
    checkpoint: the moment the folder of the step just committed appears: the checkpoint writers are running.
    """
    pid = job.members[group].worker()
    if pid is None:
        return None
    window = window_s(ckpt, group)
    last = wait_for_commit(ckpt, group, time.time(), 60, job)  # line up on a fresh commit
    step = last["outer_step"]
    if phase == "inner":
        time.sleep(rng.uniform(0.25, 0.75) * window)
        states = []
        for _ in range(5):  # a single sample can catch a short wait for the GIL
            states.append(proc_state(pid))
            time.sleep(0.001)
        if not kill_pid(pid):
            return None
        running = states.count("R")
        return Kill(n, group, phase, pid, time.time(), step, f"main thread running {running}/5 ms", running >= 3)
    if phase == "sync":
        time.sleep(0.6 * window)
        deadline, blocked_since = time.monotonic() + 3 * window + 5, None
        while time.monotonic() < deadline:
            state, now = proc_state(pid), time.monotonic()
            if state is None:
                return None
            blocked_since = (blocked_since or now) if state in ("S", "D") else None
            if blocked_since is not None and now - blocked_since >= 0.015:
                break
            time.sleep(0.002)
        blocked_ms = 1000 * (time.monotonic() - blocked_since) if blocked_since is not None else 0
        if not kill_pid(pid):
            return None
        return Kill(
            n,
            group,
            phase,
            pid,
            time.time(),
            step,
            f"main thread blocked {blocked_ms:.0f} ms",
            blocked_since is not None,
        )
    # checkpoint: the next commit creates step_<k+1>/ (every step is checkpointed)
    folder = Path(ckpt) / f"step_{step + 1:08d}"
    deadline = time.monotonic() + 3 * window + 10
    while not folder.exists() and time.monotonic() < deadline:
        if proc_state(pid) is None:
            return None
        time.sleep(0.001)
    if not kill_pid(pid):
        return None
    try:
        present = sorted(p.name for p in folder.iterdir())
    except OSError:
        present = []
    parts = [
        name[len("MANIFEST.replica_group_") : -len(".json")]
        for name in present
        if name.startswith("MANIFEST.replica_group_")
    ]
    landed = folder.exists() and (str(group) not in parts or "MANIFEST.global.json" not in present)  # incomplete
    evidence = (
        f"step {step + 1}: parts of {','.join(parts) or 'none'} published, global "
        f"{'published' if 'MANIFEST.global.json' in present else 'not yet'}"
    )
    return Kill(n, group, phase, pid, time.time(), step + 1, evidence, landed)


def chaos(job: Job, ckpt: str, kills: int, rng: random.Random, outer_steps: int) -> List[Kill]:
    """``kills`` worker kills, one at a time: each victim must commit again before the next kill.

    The first three aim at a checkpoint write, a sync and inner steps; then phases are drawn at random. A kill is
    only made while enough of the run is left for everyone to be back in step before its end (see
    :func:`time_needed`): a kill counts as survived only once its victim has committed again.
    """
    done: List[Kill] = []
    attempts = 0
    while len(done) < kills:
        phase = FIRST_ROUND[attempts] if attempts < len(FIRST_ROUND) else rng.choice(PHASES)
        group = rng.randrange(job.groups)
        left_s = (outer_steps - last_committed_step(ckpt, job.groups)) * window_s(ckpt, group)
        if left_s < time_needed(phase, done):
            if phase != "inner" and left_s >= time_needed("inner", done):
                phase = "inner"
            else:
                log(f"stopping after {len(done)} kills: {left_s:.0f}s of the run left, too little for another")
                break
        attempts += 1
        k = kill_worker(job, ckpt, group, phase, rng, len(done) + 1)
        if k is None:
            continue
        log(
            f"kill {k.n}: group {k.group} pid {k.pid} aimed at {k.phase} (step {k.step}); saw {k.evidence}"
            f"{'' if k.landed else ' (missed)'}"
        )
        first = wait_for_commit(ckpt, group, k.at, 180, job)
        k.recovered_step, k.recovery_s = first["outer_step"], round(first["time"] - k.at, 1)
        log(
            f"  group {group} back (pid {job.members[group].worker()}) at outer step {k.recovered_step} "
            f"after {k.recovery_s}s"
        )
        done.append(k)
    return done


def time_needed(phase: str, done: List[Kill]) -> float:
    """Seconds of training a kill needs after it for everyone to be back in step: the victim's restart, or, when
    the kill can land between a commit and the victim's checkpoint part, the global writer's wait for that part
    (which holds the writer's group out of the syncs meanwhile), whichever is longer."""
    restart = max([k.recovery_s or 0 for k in done] + [8.0])
    return 1.2 * max(restart, 0 if phase == "inner" else MIN_PART_WAIT_S) + 3


def describe_recoveries(job: Job, ckpt: str, kill_list: List[Kill]) -> None:
    """Fill in how each victim came back, from its log, and the rounds its peers had to drop."""
    for k in kill_list:
        out = job.members[k.group].output()
        life = out[out.find(f"(pid: {k.pid})") :] if f"(pid: {k.pid})" in out else ""
        life = life[: life.find("outer optimizer steps completed")] if life else ""
        how = [w for w, key in (("resumed", "resumed from"), ("healed", "healed from a peer")) if key in life]
        k.how = "+".join(how) or "rejoined"
        until = k.at + (k.recovery_s or 0) + 0.5
        k.dropped_rounds = sum(
            1
            for g in range(job.groups)
            if g != k.group
            for r in read_records(ckpt, g)
            if r.get("committed") is False and k.at - 0.5 < r["time"] < until
        )


# --- the audit -------------------------------------------------------------------------------------------------
@dataclass
class Audit:
    outer_steps: int
    committed_steps: int = 0  # distinct outer steps committed
    records: int = 0  # committed records over all groups
    uncommitted_records: int = 0  # rounds dropped by some group (e.g. a peer died in the all-reduce)
    torn_lines: int = 0
    mismatches: int = 0  # steps with more than one weights_sha or participant count
    missing_steps: List[int] = field(default_factory=list)
    recommitted: int = 0  # (group, step) committed twice by the same group
    recommitted_steps: int = 0  # distinct steps some group committed twice (re-trained after a restart)
    redone_same: int = 0  # of those, re-trained to the identical weights (whole-job restarts)
    latest_checkpoint: Optional[int] = None
    checkpoints_checked: int = 0
    final_sha: Optional[str] = None
    problems: List[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return len(self.missing_steps) + self.mismatches

    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "committed_steps_lost": self.lost}


def audit(ckpt: str, groups: int, outer_steps: int, logs: Sequence[str], rollback_allowed: bool) -> Audit:
    """Check the single-history invariant (module docstring) on a finished run; ``problems`` lists breaches."""
    a = Audit(outer_steps)
    shas: Dict[int, set] = {}
    quorum: Dict[int, set] = {}
    twice: set = set()
    for g in range(groups):
        seen: Dict[int, str] = {}
        for r in read_records(ckpt, g):
            if "torn_line" in r:
                a.torn_lines += 1
                continue
            if not r["committed"]:
                a.uncommitted_records += 1
                continue
            k = r["outer_step"]
            a.records += 1
            shas.setdefault(k, set()).add(r["weights_sha"])
            quorum.setdefault(k, set()).add(r["participants"])
            if k in seen:
                a.recommitted += 1
                twice.add(k)
                a.redone_same += seen[k] == r["weights_sha"]
                if not rollback_allowed:
                    a.problems.append(f"group {g} committed outer step {k} twice")
            seen[k] = r["weights_sha"]
    a.committed_steps = len(shas)
    a.recommitted_steps = len(twice)
    for k in sorted(shas):
        if len(shas[k]) > 1 or len(quorum[k]) > 1:
            a.mismatches += 1
            a.problems.append(f"outer step {k}: weights {sorted(shas[k])}, participants {sorted(quorum[k])}")
    a.missing_steps = sorted(set(range(1, outer_steps + 1)) - set(shas))
    if a.missing_steps:
        a.problems.append(f"outer steps never committed: {a.missing_steps[:10]}")
    if set(shas) - set(range(1, outer_steps + 1)):
        a.problems.append(f"outer steps beyond {outer_steps}: {sorted(set(shas))[-3:]}")
    if a.torn_lines:
        a.problems.append(f"{a.torn_lines} torn metrics lines")
    for g, text in enumerate(logs):
        if f"DiLoCo: group {g} finished at outer step {outer_steps}" not in text:
            a.problems.append(f"group {g} did not print 'finished at outer step {outer_steps}'")
    a.final_sha = next(iter(shas.get(outer_steps, {None})))

    store = CheckpointStore(ckpt)
    latest = store.latest(0)
    a.latest_checkpoint = latest.step if latest else None
    if a.latest_checkpoint != outer_steps:
        a.problems.append(f"the newest loadable checkpoint is step {a.latest_checkpoint}, not {outer_steps}")
    for step in store.steps():
        if not store.has_part(step, GLOBAL_PART):
            continue
        weights = store.read_part(step, GLOBAL_PART)["diloco"]["global_weights"]
        on_disk = weights_checksum(list(weights.values()))
        a.checkpoints_checked += 1
        if on_disk not in shas.get(step, set()):
            a.problems.append(
                f"checkpoint step {step} holds weights {on_disk}, the groups agreed on {sorted(shas.get(step, []))}"
            )
    return a


# --- whole-job restarts ----------------------------------------------------------------------------------------
@dataclass
class Restart:
    n: int
    killed_at_step: int  # the newest committed step any group had recorded
    latest_checkpoint: int  # CheckpointStore.latest after the kill
    first_step_after: Optional[int] = None  # first "[k] loss" each group printed in the next life


OUTER_LINE = "DiLoCo: Number of outer optimizer steps completed: ["


def first_printed_step(text: str) -> Optional[int]:
    i = text.find(OUTER_LINE)
    return int(text[i + len(OUTER_LINE) :].split("]", 1)[0]) if i >= 0 else None


def restarts(
    work: Path,
    ckpt: str,
    groups: int,
    train_args: Sequence[str],
    outer_steps: int,
    count: int,
    rng: random.Random,
    timeout: float,
) -> tuple:
    """``count`` whole-job SIGKILLs at random instants, each followed by a fresh job on the same folder.

    Every life runs until each group has committed a step and group 0 a second, then a random 0..3 windows more
    (measured in this life), then dies at once
    (agents, workers and lighthouse). The next life's groups must print, as their first committed step, the newest
    complete checkpoint's step + 1. Returns (restarts, the last job, still running, and the step it must print).
    """
    done: List[Restart] = []
    for life in range(count + 1):
        job = Job(work, ckpt, groups, train_args, min_replicas=groups, tag=f"-life{life}")
        if life == count:
            return done, job
        started = time.time()
        try:
            firsts = [wait_for_commit(ckpt, g, started, timeout, job) for g in range(groups)]
            wait_for_commit(ckpt, 0, firsts[0]["time"], timeout, job)  # group 0's second: this life's window
            time.sleep(rng.uniform(0, 3) * window_s(ckpt, 0, since=started))
        finally:
            job.kill()
        if done:
            check_first_steps(job, done[-1])
        latest = CheckpointStore(ckpt).latest(0)
        r = Restart(life + 1, last_committed_step(ckpt, groups), latest.step if latest else 0)
        log(
            f"restart {r.n}: killed the whole job after outer step {r.killed_at_step}; "
            f"newest complete checkpoint: step {r.latest_checkpoint}"
        )
        if r.latest_checkpoint >= outer_steps:
            raise AssertionError(f"life {life} finished before its kill: use more outer steps")
        done.append(r)
    raise AssertionError("unreachable")


def check_first_steps(job: Job, restart: Restart) -> None:
    """Every group of the job after ``restart`` first committed the newest checkpoint's step + 1."""
    firsts = {first_printed_step(m.output()) for m in job.members}
    restart.first_step_after = min(f for f in firsts if f is not None) if firsts - {None} else None
    if firsts != {restart.latest_checkpoint + 1}:
        raise AssertionError(
            f"after restart {restart.n} the groups first committed steps {sorted(firsts, key=str)}; "
            f"the newest complete checkpoint was {restart.latest_checkpoint}"
        )


def finish(job: Job, timeout: float) -> List[str]:
    """Wait for every group of ``job`` to exit 0, kill what is left either way; return the groups' logs."""
    try:
        codes = job.wait(timeout)
    finally:
        job.kill()
    outputs = [m.output() for m in job.members]
    for g, rc in enumerate(codes):
        if rc != 0:
            raise AssertionError(f"group {g} exited {rc}:\n{outputs[g][-3000:]}")
    return outputs


# --- the two experiments ---------------------------------------------------------------------------------------
def train_args(outer_steps: int, sync_every: int, extra: Sequence[str] = ()) -> List[str]:
    return [
        *SMALL,
        "--outer-steps",
        str(outer_steps),
        "--sync-every",
        str(sync_every),
        "--group-wait",
        "30",
        "--collective-timeout",
        str(COLLECTIVE_TIMEOUT_S),
        *extra,
    ]


def worker_kills(
    work: Path,
    kills: int,
    rng: random.Random,
    outer_steps: int,
    sync_every: int,
    groups: int = 3,
    timeout: float = 600,
    extra: Sequence[str] = (),
) -> tuple:
    """Groups train with ``--min-replicas 1`` while their workers are SIGKILLed; returns (kills, audit).

    ``extra``: more training flags (e.g. ``--fragments 4 --overlap-steps 1 --codec int8``)."""
    ckpt = str(work / "worker-kills")
    job = Job(work, ckpt, groups, train_args(outer_steps, sync_every, extra), min_replicas=1, tag="-kills")
    try:
        for g in range(groups):
            wait_for_commit(ckpt, g, 0, 120, job)
        kill_list = chaos(job, ckpt, kills, rng, outer_steps)
        logs = finish(job, timeout)
    finally:
        job.kill()
    describe_recoveries(job, ckpt, kill_list)
    return kill_list, audit(ckpt, groups, outer_steps, logs, rollback_allowed=False)


def whole_job_restarts(
    work: Path,
    count: int,
    rng: random.Random,
    outer_steps: int,
    sync_every: int,
    groups: int = 3,
    timeout: float = 600,
    extra: Sequence[str] = (),
) -> tuple:
    """An uninterrupted run, then the same run killed whole ``count`` times; returns (restarts, audit, reference).

    Checkpoints every second step, so some kills fall after a commit that has no checkpoint yet: that step is
    trained again after the restart and must come out bit-identical (the audit's one-result-per-step rule).
    """
    args = train_args(outer_steps, sync_every, [*RESTART_EXTRA, *extra])
    ref_ckpt = str(work / "uninterrupted")
    reference = Job(work, ref_ckpt, groups, args, min_replicas=groups, tag="-uninterrupted")
    ref_logs = finish(reference, timeout)
    ref = audit(ref_ckpt, groups, outer_steps, ref_logs, rollback_allowed=False)
    log(f"uninterrupted run: {ref.committed_steps} outer steps, final weights {ref.final_sha}")

    ckpt = str(work / "restarted")
    done, job = restarts(work, ckpt, groups, args, outer_steps, count, rng, timeout=120)
    logs = finish(job, timeout)
    if done:
        check_first_steps(job, done[-1])
    return done, audit(ckpt, groups, outer_steps, logs, rollback_allowed=True), ref


def pause_until_peers_finish(
    work: Path,
    outer_steps: int = 30,
    sync_every: int = 40,
    pause_at: int = 10,
    groups: int = 3,
    min_replicas: int = 1,
    timeout: float = 400,
) -> Audit:
    """Group 0's worker is frozen (SIGSTOP: a long GC pause, a stalled VM) at outer step ``pause_at`` until the
    other groups have finished, then thawed. Nobody is left to heal from. Before the runtime checked storage at each
    sync, it trained the remaining steps alone (``--min-replicas 1``) and, as the first group of its one-group
    quorum, rewrote the final checkpoint with weights the others never had; now it must adopt the checkpoint they
    published. Returns the audit (its ``problems`` list any fork); ``min_replicas`` applies to groups and lighthouse.
    """
    ckpt = str(work / f"pause-min{min_replicas}")
    job = Job(
        work,
        ckpt,
        groups,
        train_args(outer_steps, sync_every),
        min_replicas=min_replicas,
        tag=f"-pause-min{min_replicas}",
    )
    try:
        while last_committed_step(ckpt, groups) < pause_at:
            if not job.running():
                raise AssertionError("the job ended early")
            time.sleep(0.05)
        pid = job.members[0].worker()
        if pid is None:
            raise AssertionError("group 0 has no live worker to freeze")
        os.kill(pid, signal.SIGSTOP)
        log(f"froze group 0 (pid {pid}) at outer step {last_committed_step(ckpt, groups)}")
        deadline = time.monotonic() + timeout
        while any(m.proc.poll() is None for m in job.members[1:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(pid, signal.SIGCONT)
        log("the other groups finished; thawed group 0")
        logs = finish(job, timeout)
    finally:
        job.kill()
    return audit(ckpt, groups, outer_steps, logs, rollback_allowed=False)

"""Joining the run: reaching the lighthouse, waiting for the other groups, building torchft's Manager."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from datetime import timedelta
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from torchx_diloco.config import MIN_REPLICAS_ENV, RUN_ID_ENV, ClusterConfig, read_group_env
from torchx_diloco.errors import ERROR_FILE_ENV, UserError, write_error_file

logger = logging.getLogger(__name__)

# "<replica id>[:<torchft's per-process uuid>]: seen <s>s ago" (managers add the uuid, our own marks do not)
_HEARTBEAT = re.compile(r"([\w.\-]+?)(?::[0-9a-f\-]+)?: seen ([0-9.e\-]+)s ago")
GROUP_PREFIX = "replica_group_"
FATAL_PREFIX = "fatal_group_"  # a group's report that it stopped for good (see report_fatal)
LIGHTHOUSE_MARK = "lighthouse_0"  # the lighthouse's own run id, shown while none of its groups is live


def replica_id(group: int, run_id: Optional[str] = None, prefix: str = GROUP_PREFIX) -> str:
    """``[<run>.]replica_group_<g>``: torchft reads the group number from the trailing digits, we read the run."""
    return f"{safe_run_id(run_id)}.{prefix}{group}" if run_id else f"{prefix}{group}"


def safe_run_id(run_id: str) -> str:
    return re.sub(r"[^\w\-]", "-", run_id)


def split_replica_id(rid: str) -> Tuple[Optional[str], str]:
    """``run.replica_group_1`` -> ("run", "replica_group_1"); ``replica_group_1`` -> (None, "replica_group_1")."""
    run, _, name = rid.rpartition(".")
    return (run or None), name


def lighthouse_status(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"{url}/status", timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def live_replicas(status_html: str, fresher_than_s: float = 2.0) -> Set[str]:
    """Replica ids (without torchft's per-process uuid) that heartbeated recently, read from /status."""
    return {rid for rid, age in _HEARTBEAT.findall(status_html) if float(age) < fresher_than_s}


def check_run(live: Set[str], url: str, run_id: Optional[str]) -> None:
    """Refuse a lighthouse that serves another run, or a run one of whose groups stopped for good.

    Groups of two runs in one quorum would average each other's pseudo-gradients: never train there.
    """
    if run_id:  # other runs' groups, or the lighthouse's own mark of another run
        foreign = sorted(r for r in live if split_replica_id(r)[0] != safe_run_id(run_id))
        if foreign:
            raise UserError(
                f"the lighthouse at {url} serves another run (seen there: {', '.join(foreign[:3])}), "
                f"not run {run_id}: point TORCHFT_LIGHTHOUSE at this run's lighthouse"
            )
    fatal = sorted(split_replica_id(r)[1] for r in live if split_replica_id(r)[1].startswith(FATAL_PREFIX))
    if fatal:
        name = GROUP_PREFIX + fatal[0][len(FATAL_PREFIX) :]
        raise UserError(
            f"{name} of this run stopped with an error no restart can fix (its log has the line): this group stops too"
        )


def check_lighthouse_serves_run(url: str, run_id: Optional[str]) -> None:
    """One look at the lighthouse before a sync (a no-op for runs without a run id, e.g. launched by hand)."""
    if not run_id:
        return
    try:
        live = live_replicas(lighthouse_status(url))
    except (urllib.error.URLError, OSError):
        return  # unreachable: the sync's quorum retries and reports it
    check_run(live, url, run_id)


def wait_for_lighthouse(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lighthouse_status(url)
            return
        except (urllib.error.URLError, OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"cannot reach the lighthouse at {url} within {timeout_s:g}s ({e}): start it "
                    "(python -m torchx_diloco.lighthouse) or fix TORCHFT_LIGHTHOUSE"
                ) from e
            time.sleep(0.5)


def wait_for_groups(url: str, expected: int, timeout_s: float, group: int, run_id: Optional[str] = None) -> None:
    """Give the other groups a bounded head start so the first quorum has everyone in it; look at least once
    (:func:`check_run`) that the lighthouse serves this run."""
    deadline = time.monotonic() + timeout_s
    me = replica_id(group, run_id)
    seen: Set[str] = set()
    while True:
        try:
            live = live_replicas(lighthouse_status(url))
            check_run(live, url, run_id)
            seen = {r for r in live if split_replica_id(r)[1].startswith(GROUP_PREFIX)} | {me}
        except (urllib.error.URLError, OSError):
            pass
        if len(seen) >= expected:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    logger.warning(
        "only %d of %d groups reached the lighthouse within %gs; starting without the others",
        len(seen),
        expected,
        timeout_s,
    )


def report_fatal(url: str, group: int, run_id: Optional[str]) -> None:
    """Tell the lighthouse (and through it the other groups) that this group stopped for good.

    A heartbeat under a reserved id: the lighthouse launcher ends the run when it sees one. It briefly blocks
    quorums (torchft waits for every heartbeating replica), which no longer matters: the run is ending.
    """
    from torchft.coordination import LighthouseClient

    try:
        client = LighthouseClient(url, connect_timeout=timedelta(seconds=2))
        for _ in range(3):  # the launcher polls /status twice a second
            client.heartbeat(replica_id(group, run_id, FATAL_PREFIX))
            time.sleep(0.5)
    except Exception as e:  # noqa: BLE001 - best effort: the lighthouse may be gone already
        logger.debug("could not tell the lighthouse at %s that this group stopped: %s", url, e)


def end_run_on_user_error(message: str, exit_code: int = UserError.exit_code) -> None:
    """After an error no restart can fix: leave the line where TorchX shows it, tell the run's lighthouse, and
    end this group's torchrun so that it restarts nothing.

    torchrun restarts failed workers whatever their exit code, and an agent stopped by a signal it handles
    (SIGTERM) prints a traceback and overwrites its error file with "SignalException". So: the line goes into
    the agent's error file first (TorchX reports a run's earliest one, and the groups that stop because of this
    one write theirs later), the group's other ranks get SIGTERM, and the agent SIGKILL: it writes nothing more.
    """
    agent = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") and _parent_is_torchrun() else None
    if agent is not None:
        reply_file = _environ_of(agent).get(ERROR_FILE_ENV)
        if reply_file:
            write_error_file(reply_file, message, exit_code)
    url, run_id = os.environ.get("TORCHFT_LIGHTHOUSE", "").rstrip("/"), os.environ.get(RUN_ID_ENV)
    if run_id and os.environ.get("REPLICA_GROUP_ID", "").isdigit():  # a run's group (by hand: ours alone ends)
        try:
            lighthouse_status(url, timeout=1.0)
        except (urllib.error.URLError, OSError, ValueError):
            pass  # no lighthouse to tell
        else:
            report_fatal(url, int(os.environ["REPLICA_GROUP_ID"]), run_id)
    if agent is not None:
        _end_torchrun(agent)


def _parent_is_torchrun() -> bool:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"torchrun" in cmdline or b"torch.distributed.run" in cmdline


def _environ_of(pid: int) -> Dict[str, str]:
    """The environment ``pid`` started with (Linux)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return {}
    pairs = (e.decode("utf-8", "replace").partition("=") for e in entries if b"=" in e)
    return {k: v for k, _, v in pairs}


def _running_children(pid: int) -> List[int]:
    """The live (not zombie) child processes of ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]  # after "pid (comm)": state, ppid
        except (OSError, ValueError, IndexError):
            continue
        if int(ppid) == pid and state != b"Z":
            found.append(int(entry))
    return found


def _end_torchrun(agent: int, grace_s: float = 10.0) -> None:
    """SIGKILL the agent, a signal it cannot turn into a restart, a traceback or an error file; then stop its
    other workers (this group's other ranks: SIGTERM, SIGKILL after ``grace_s``). The agent goes first: it
    would restart the group on seeing one of its workers stopped."""
    others = [pid for pid in _running_children(agent) if pid != os.getpid()]
    with contextlib.suppress(OSError):
        os.kill(agent, signal.SIGKILL)
    for pid in others:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_running(pid) for pid in others):
        time.sleep(0.1)
    for pid in others:
        if _running(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def process_group(device: torch.device, timeout: timedelta) -> Any:  # torchft ships no type information
    """torchft's reconfigurable process group: NCCL between GPUs, Gloo on CPU."""
    from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

    return ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)


def build_manager(cluster: ClusterConfig, device: torch.device) -> Any:
    """A torchft Manager for the group ``cluster`` describes; outside torchrun it hosts the group's own store."""
    from torchft import Manager

    timeout = timedelta(seconds=cluster.collective_timeout)
    store_kwargs: dict = {}
    store = None
    life = torchrun_store()
    if "MASTER_ADDR" not in os.environ or life is not None:
        from torch.distributed import TCPStore

        # The group's rank 0 hosts a store for torchft (the quorum hands its address to the other groups: it
        # must be reachable from their hosts). Under torchrun a fresh one per life: torchrun's own store keeps
        # an earlier life's keys, and a restarted rank would read its dead predecessor's manager address.
        host = socket.gethostname()
        if group_rank() == 0:
            store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
            address = f"{host}:{store.port}"
            if life is not None:
                life.set("torchft_store", address)
        else:
            assert life is not None
            address = life.get("torchft_store").decode()
        store_host, store_port = address.rsplit(":", 1)
        store_kwargs = dict(store_addr=store_host, store_port=int(store_port))
        if life is None:
            store_kwargs.update(rank=0, world_size=1)
    manager = Manager(
        pg=process_group(device, timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=cluster.min_replicas,
        use_async_quorum=False,
        replica_id=replica_id(cluster.group_id, cluster.run_id),
        lighthouse_addr=cluster.lighthouse,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=cluster.quorum_timeout),
        connect_timeout=timedelta(seconds=cluster.quorum_timeout),
        **store_kwargs,
    )
    if store is not None:
        manager._torchx_diloco_store = store  # keep the store alive as long as the manager
    return manager


def start_quorum(manager: Any, retry_s: float) -> None:
    """torchft's quorum, retried for up to ``retry_s`` while the lighthouse is away (restarted, or its node
    rebooting)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            manager.start_quorum()
            return
        except Exception as e:  # noqa: BLE001 - gRPC surfaces as several types; retried, then re-raised
            # torchft keeps the failed quorum and re-raises it on every later call: forget it to retry
            manager._quorum_future = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"no quorum for {retry_s:g}s (is the lighthouse up?): {e}") from e
            logger.warning(
                "quorum failed (%s: %s); retrying until the lighthouse answers",
                type(e).__name__,
                str(e).splitlines()[0][:200],
            )
            time.sleep(1.0)


def join_run(cluster: ClusterConfig, device: torch.device) -> Any:
    """What a group does to join its run: wait up to ``lighthouse_timeout`` for the lighthouse, refuse one that
    serves another run (before our heartbeats reach it), build the Manager, and give the other groups up to
    ``group_wait`` to arrive (checking, at least once, that the lighthouse serves this run and that no group of
    it failed for good)."""
    wait_for_lighthouse(cluster.lighthouse, cluster.lighthouse_timeout)
    check_lighthouse_serves_run(cluster.lighthouse, cluster.run_id)
    manager = build_manager(cluster, device)
    expected = cluster.num_groups if cluster.group_wait > 0 else 1
    wait_for_groups(cluster.lighthouse, expected, cluster.group_wait, cluster.group_id, cluster.run_id)
    return manager


def group_manager(
    device: "torch.device | str" = "cpu",
    *,
    group_id: Optional[int] = None,
    num_groups: Optional[int] = None,
    lighthouse: Optional[str] = None,
    run_id: Optional[str] = None,
    min_replicas: Optional[int] = None,
    timeout_s: float = ClusterConfig.collective_timeout,
    quorum_timeout_s: float = ClusterConfig.quorum_timeout,
    lighthouse_timeout_s: float = ClusterConfig.lighthouse_timeout,
    group_wait_s: float = ClusterConfig.group_wait,
) -> Any:
    """A torchft ``Manager`` for this replica group, ready for :class:`~torchx_diloco.DiLoCo`.

    What the trainer does to join a run (:func:`join_run`), for your own loop: it waits up to
    ``lighthouse_timeout_s`` for the lighthouse, refuses one that serves another run, builds the Manager
    (``use_async_quorum=False``; Gloo on CPU, NCCL on CUDA) and gives the other groups up to ``group_wait_s`` to
    arrive. Works under torchrun (the group's ranks share torchrun's store) and outside it (a one-rank group
    hosting its own store).

    Arguments left as None come from the environment the components set: ``REPLICA_GROUP_ID``,
    ``NUM_REPLICA_GROUPS`` (default 1; then the group id defaults to 0), ``TORCHFT_LIGHTHOUSE``,
    ``TORCHX_DILOCO_RUN_ID`` (no run check when unset) and ``TORCHX_DILOCO_MIN_REPLICAS`` (default 1).
    Bad or missing values raise :class:`~torchx_diloco.errors.UserError` with a one-line fix.
    """
    from torchx_diloco.logs import quiet_libraries

    quiet_libraries()  # torchft's chatter at the libraries' level, as in the trainer's groups
    group = read_group_env(group_id=group_id, num_groups=num_groups, lighthouse=lighthouse, run_id=run_id)
    if min_replicas is None:
        raw = os.environ.get(MIN_REPLICAS_ENV, "1") or "1"
        if not raw.isdigit():
            raise UserError(f"{MIN_REPLICAS_ENV}={raw!r} is not an integer: set it to a whole number")
        min_replicas = int(raw)
    if not 1 <= min_replicas <= group.num_groups:
        raise UserError(f"min_replicas {min_replicas} must be between 1 and the {group.num_groups} replica groups")
    cluster = ClusterConfig(
        min_replicas=min_replicas,
        lighthouse_timeout=lighthouse_timeout_s,
        group_wait=group_wait_s,
        collective_timeout=timeout_s,
        quorum_timeout=quorum_timeout_s,
        group_id=group.group_id,
        num_groups=group.num_groups,
        lighthouse=group.lighthouse,
        run_id=group.run_id,
    )
    return join_run(cluster, torch.device(device))


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is visible; use --device cpu or auto")
    return device


_LIFE_STORE: Any = None


def torchrun_store() -> Any:
    """This life's keys in torchrun's store (None outside torchrun, or where the workers host it).

    torchrun (``--standalone``, c10d rendezvous) keeps one store and one MASTER_PORT across the restarts of a
    group's workers, so keys an earlier life wrote are still there: a restarted rank 0 then connects to its dead
    peer's Gloo address, and the restart fails (measured with torch 2.13). A prefix per restart gives every
    life its own keys; :func:`init_group_process_group` and :func:`build_manager` use it.
    """
    global _LIFE_STORE
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if _LIFE_STORE is None:
        from torch.distributed import PrefixStore, TCPStore

        agent = TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(minutes=5)
        )
        _LIFE_STORE = PrefixStore(f"torchx_diloco/life_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
    return _LIFE_STORE


def init_group_process_group(backend: str) -> None:
    """The process group of this replica group's ranks (DDP, FSDP), on this life's keys of torchrun's store."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    life = torchrun_store()
    if life is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=life, rank=group_rank(), world_size=group_world_size())


def leave_group_process_group() -> None:
    """Destroy this group's process groups before the process exits. Left to the interpreter's exit, Gloo's
    threads are sometimes destroyed while still joinable: the process aborts ("terminate called without an
    active exception", SIGABRT; 3 to 8 exits in 20 of two ranks here) and torchrun reports a failed worker."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def group_rank() -> int:
    """This process's rank inside its replica group (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def group_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank0_decides(value: int, device: "torch.device | str" = "cpu") -> int:
    """Rank 0's ``value`` on every rank of this group (one broadcast over the group's default process group).

    For decisions taken from what one process saw (storage, a clock): ranks that decided apart would part
    ways (DDP hangs, weights drift). A one-rank group gets ``value`` back without any collective. ``device``:
    where the group's backend takes tensors (NCCL: this rank's GPU).
    """
    if group_world_size() == 1:
        return value
    import torch.distributed as dist

    decided = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(decided, src=0)
    return int(decided.item())


def group_mean(value: torch.Tensor) -> float:
    """The mean of ``value`` over this group's ranks (one all-reduce over the group's default process group; a
    one-rank group gets ``value`` back without any collective)."""
    if group_world_size() == 1:
        return float(value)
    import torch.distributed as dist

    total = value.detach().clone().reshape(1)
    dist.all_reduce(total)
    return float(total) / group_world_size()

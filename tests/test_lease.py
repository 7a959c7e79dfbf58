"""The lease on a checkpoint folder (torchx_diloco/lease.py), on a local disk, memory:// and the moto S3 server:
one run holds it, another is refused while it is fresh, takes it once it is stale (or at once with take_over),
two runs racing for a stale lease never both win."""

from __future__ import annotations

import json
import threading
import time

import pytest

from torchx_diloco.lease import LEASE_FILE, Lease, LeaseHeld, run_identity


@pytest.fixture(params=["local", "memory", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt")
    if request.param == "memory":
        return f"memory://{tmp_path.name}/ckpt"
    return request.getfixturevalue("s3_url")


def files(lease: Lease) -> dict:
    """Every file under the folder with its bytes (the lock file of a local disk aside)."""
    found = lease.fs.find(lease.root) if lease.fs.exists(lease.root) else []
    return {f: lease.fs.cat_file(f) for f in found if not f.endswith(".lock")}


def age(lease: Lease, seconds: float) -> None:
    """Make the lease look renewed ``seconds`` ago (as a holder that died then left it)."""
    record = json.loads(lease.fs.cat_file(lease.path))
    record["renewed"] -= seconds
    lease.fs.pipe_file(lease.path, json.dumps(record).encode())


def test_a_fresh_lease_refuses_another_run_in_one_line_and_nothing_changes(folder):
    mine = Lease(folder, "run-a", ttl_s=60)
    mine.acquire()
    mine.acquire()  # the same run (another group of it, a restarted worker) holds it too
    before = files(mine)
    other = Lease(folder, "run-b", ttl_s=60)
    for attempt in (other.check, other.acquire):
        with pytest.raises(LeaseHeld) as e:
            attempt()
        line = str(e.value)
        assert "\n" not in line and folder in line and "'run-a'" in line, line
        assert "another --checkpoint-dir" in line and "--take-over" in line and "goes stale 60s" in line, line
    assert files(other) == before, "the refused run changed the holder's folder"
    assert mine.holder().run == "run-a"


def test_a_stale_lease_is_taken_without_a_flag_and_the_old_holder_finds_out(folder):
    dead = Lease(folder, "run-a", ttl_s=5)
    dead.acquire()
    age(dead, 6)  # its last renewal is older than its time-to-live
    Lease(folder, "run-b", ttl_s=5).acquire()
    assert dead.holder().run == "run-b"
    assert dead.renew() is False and dead.lost.is_set()
    with pytest.raises(Exception, match="another run took --checkpoint-dir .* over"):
        dead.check_held()


def test_take_over_takes_a_fresh_lease_and_release_deletes_only_ones_own(folder):
    holder = Lease(folder, "run-a", ttl_s=60)
    holder.acquire()
    taker = Lease(folder, "run-b", ttl_s=60)
    taker.acquire(take_over=True)
    assert holder.renew() is False
    holder.release()  # not its own any more: left alone
    assert taker.holder().run == "run-b"
    taker.release()
    assert taker.holder() is None and not taker.fs.exists(f"{taker.root}/{LEASE_FILE}")
    Lease(folder, "run-c", ttl_s=60).acquire()  # a released folder is free at once


def race(folder: str, names: list) -> tuple:
    """Runs ``names`` acquire the lease at one instant; (the winners, the refused)."""
    winners, refused = [], []
    start = threading.Barrier(len(names))

    def contend(name: str) -> None:
        lease = Lease(folder, name, ttl_s=60)
        start.wait()
        try:
            lease.acquire()
            winners.append(name)
        except LeaseHeld:
            refused.append(name)

    threads = [threading.Thread(target=contend, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return winners, refused


def test_two_runs_racing_for_a_stale_lease_never_both_win(folder):
    for round_ in range(3):
        first = Lease(folder, f"old-{round_}", ttl_s=1)
        first.acquire(take_over=True)
        age(first, 2)
        winners, refused = race(folder, [f"run-{round_}-{i}" for i in range(4)])
        assert len(winners) == 1 and len(refused) == 3, (winners, refused)
        assert first.holder().run == winners[0]


def test_the_heartbeat_renews_until_released(folder):
    lease = Lease(folder, "run-a", ttl_s=0.4)
    lease.acquire()
    first = lease.holder().renewed
    lease.start()
    deadline = time.monotonic() + 30
    while lease.holder().renewed == first:
        assert time.monotonic() < deadline, "the heartbeat never renewed the lease"
        time.sleep(0.05)
    lease.release()
    assert lease.holder() is None


def test_a_run_without_a_run_id_is_its_lighthouse():
    assert run_identity("app-1", "http://h:1") == "app-1"
    assert run_identity(None, "http://h:1") == run_identity(None, "http://h:1") != run_identity(None, "http://h:2")


@pytest.mark.parametrize("folder", ["local", "s3"], indirect=True)  # (memory:// is one process's)
def test_a_lease_whose_process_died_on_this_host_is_taken_at_once(folder):
    """A holder killed on this very host (its pid is gone) does not hold the folder for its time-to-live."""
    import subprocess
    import sys

    script = "from torchx_diloco.lease import Lease; import sys; Lease(sys.argv[1], 'run-dead', 600).acquire()"
    done = subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lease = Lease(folder, "run-new", ttl_s=600)
    held = lease.holder()
    assert held.run == "run-dead" and held.age() < 600 and held.died_here()
    lease.acquire()  # no flag, no wait
    assert lease.holder().run == "run-new"
    mine = lease.holder()
    assert mine.fresh() and not mine.died_here()  # this process lives


BLOCKED_HOLDER = """
import os, signal, sys
from datetime import timedelta
import torch.distributed as dist
from torchx_diloco.lease import Lease
from torchx_diloco.sigterm import on_sigterm
lease = Lease(sys.argv[1], "run-stopped", 600)
lease.acquire()
lease.start()
on_sigterm(lease.release)
on_sigterm(lambda: print("a cancelled callback ran", flush=True))()  # registered, then cancelled at once
child = os.fork()  # a DataLoader worker: its SIGTERM must not reach the parent's callbacks through a shared pipe
if child == 0:
    print("child's wakeup fd", signal.set_wakeup_fd(-1), signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    os._exit(0)
os.waitpid(child, 0)
store = dist.TCPStore("127.0.0.1", int(sys.argv[2]), None, False, timeout=timedelta(seconds=600))
print("blocked", flush=True)
store.wait(["go"])  # native code, as a trainer in a quorum or a collective: Python runs no handler meanwhile
print("the wait returned", flush=True)
"""


@pytest.mark.timeout(60)
def test_sigterm_releases_the_lease_at_once_while_the_main_thread_is_blocked_then_the_process_dies_of_it(tmp_path):
    """scancel, Ctrl-C and preemption send SIGTERM; Slurm SIGKILLs 30 s later (KillWait). A trainer blocked in a
    quorum or collective for longer must still free its folder for the resubmitted job (torchx_diloco/sigterm.py):
    a Python signal handler alone would run only once the blocking call returned, after the SIGKILL."""
    import signal
    import subprocess
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    folder = str(tmp_path / "ckpt")
    # the store the holder waits on is this process's: a signal to the holder can break a server it hosted itself
    # (its connections reset), not a client's wait, which retries
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=60), wait_for_workers=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_HOLDER, folder, str(store.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        child, line = proc.stdout.readline(), proc.stdout.readline()
        assert child.split() == ["child's", "wakeup", "fd", "-1", "True"], child  # as before on_sigterm
        assert line.startswith("blocked"), (line, proc.stderr.read() if proc.poll() is not None else "")
        lease = Lease(folder, "run-next", ttl_s=600)
        assert lease.holder().run == "run-stopped"
        proc.send_signal(signal.SIGTERM)
        while lease.holder() is not None:  # (the timeout above bounds this; the holder's wait lasts 600 s)
            time.sleep(0.02)
        assert proc.poll() is None, "the lease went only with the process: it was not released while blocked"
        lease.acquire()  # the next run has the folder at once
        store.set("go", "1")
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err[-2000:]  # it still dies of SIGTERM, as without the handler
    assert "a cancelled callback ran" not in out, out
    assert lease.holder().run == "run-next"  # the stopped run's release did not touch the next run's lease

"""The lighthouse launcher: where it listens, and that it ends when the run does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from datetime import timedelta

import pytest

from torchx_diloco._fleet.testing import PYTHON, REPO, Group, Lighthouse, clean_env, free_port, run_cli, train_workers
from torchx_diloco.cluster import lighthouse_status, live_replicas
from torchx_diloco.errors import ERROR_FILE_ENV, read_error_file
from torchx_diloco.lighthouse import default_bind_host


def listening_addresses(port: int) -> set:
    """Local addresses with a socket listening on ``port``, read from the kernel's tables (/proc/net/tcp*)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(addr_hex)
            if family == socket.AF_INET:
                found.add(socket.inet_ntop(family, raw[::-1]))
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(family, words))
    return found


def test_lighthouse_listens_on_loopback_only_by_default(tmp_path):
    """Its HTTP side has an unauthenticated kill endpoint: not on every interface unless asked."""
    lighthouse = Lighthouse(tmp_path)
    try:
        assert listening_addresses(lighthouse.port) == {"127.0.0.1"}
    finally:
        lighthouse.kill()


def test_lighthouse_binds_every_interface_only_when_asked(tmp_path):
    lighthouse = Lighthouse(tmp_path, extra=["--bind-host", "::"])
    try:
        assert listening_addresses(lighthouse.port) == {"::"}
    finally:
        lighthouse.kill()


def non_loopback_ipv4() -> list:
    """This machine's IPv4 addresses other hosts could reach, from the kernel's routing table (not the resolver)."""
    found, last = set(), None
    try:
        for line in open("/proc/net/fib_trie").read().splitlines():
            if "/32 host LOCAL" in line and last and not last.startswith("127."):
                found.add(last)
            parts = line.split()
            last = parts[1] if len(parts) == 2 and parts[0] in ("|--", "+--") else last
    except FileNotFoundError:
        pass
    return sorted(found)


def start_under_slurm(node_name: str, tmp_path) -> tuple:
    """The launcher as Slurm starts it on node ``node_name``; returns (process, port, its first line)."""
    port = free_port()
    env = dict(os.environ, SLURM_JOB_ID="42", SLURMD_NODENAME=node_name, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [PYTHON, "-m", "torchx_diloco.lighthouse", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner = proc.stdout.readline()
    deadline = time.monotonic() + 30
    while not listening_addresses(port) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    return proc, port, banner


@pytest.mark.parametrize("resolves_to", ["loopback", "routable"])
def test_under_slurm_it_listens_where_other_nodes_can_reach_it(tmp_path, resolves_to):
    """A node name that resolves to loopback (Debian's 127.0.1.1 for the hostname) must not shut out groups on
    other nodes: then every interface, said in one line; otherwise the node's own routable address only."""
    if resolves_to == "loopback":
        name, expected = "localhost", {"0.0.0.0"}
    else:
        addresses = non_loopback_ipv4()
        if not addresses:
            pytest.skip("this machine has no non-loopback IPv4 address")
        name, expected = addresses[0], {addresses[0]}  # an address literal resolves to itself
    proc, port, banner = start_under_slurm(name, tmp_path)
    try:
        assert listening_addresses(port) == expected, banner
        assert f"serving on {next(iter(expected))}:{port}" in banner
        if resolves_to == "loopback":
            assert "every interface: Slurm node localhost resolves to loopback here" in banner
    finally:
        proc.kill()
        proc.wait()


def test_outside_slurm_the_default_is_loopback(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert default_bind_host()[0] == "127.0.0.1"


def test_lighthouse_with_no_group_exits_1_with_a_clear_line():
    result = subprocess.run(
        [PYTHON, "-m", "torchx_diloco.lighthouse", "--port", str(free_port()), "--first-join-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert "no replica group joined within 1s" in result.stderr


def test_lighthouse_on_a_busy_port_fails_with_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [PYTHON, "-m", "torchx_diloco.lighthouse", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "pick a free --port" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-replicas", "0"], "--min-replicas 0 must be >= 1"),
        (["--port", "70000"], "--port 70000 must be in 1..65535"),
    ],
)
def test_lighthouse_bad_flags(args, message):
    result = run_cli([PYTHON, "-m", "torchx_diloco.lighthouse", *args], cwd=REPO, env=clean_env(), timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_lighthouse_exits_0_after_groups_go_quiet(tmp_path):
    from torchft.coordination import LighthouseClient

    lighthouse = Lighthouse(tmp_path, idle_exit=1.0)
    client = LighthouseClient(f"http://127.0.0.1:{lighthouse.port}", connect_timeout=timedelta(seconds=5))
    client.heartbeat("replica_group_0:0000")  # a group joins...
    start = time.monotonic()
    assert lighthouse.proc.wait(timeout=30) == 0  # ...and goes quiet: the run is over
    assert time.monotonic() - start >= 1.0
    assert "all 1 groups finished" in lighthouse.output()


NANO = [
    "--model",
    "nano",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--eval-batches",
    "0",
    "--outer-steps",
    "2",
    "--sync-every",
    "5",
    "--group-wait",
    "0",
]


@pytest.mark.slow
def test_a_group_refuses_the_lighthouse_of_another_run_even_when_it_comes_first(tmp_path):
    """Groups of two runs in one quorum would average each other's pseudo-gradients: one line, exit 2, and the
    lighthouse's own run still trains there afterwards."""
    # its run mark, a heartbeat, holds the run's first quorum until it expires: 1 s here, not the default 5 s
    lighthouse = Lighthouse(tmp_path, extra=["--run-id", "run-a", "--heartbeat-timeout-ms", "1000"])
    try:
        # the lighthouse shows its mark as it starts (lighthouse.py): the intruder comes once it is up
        deadline = time.monotonic() + 30
        while not any(".lighthouse_" in r for r in live_replicas(lighthouse_status(lighthouse.url))):
            assert time.monotonic() < deadline, lighthouse_status(lighthouse.url)[-2000:]
            time.sleep(0.02)
        intruder = Group(
            0,
            1,
            lighthouse.url,
            [*NANO, "--checkpoint-dir", str(tmp_path / "b")],
            tmp_path,
            extra_env={"TORCHX_DILOCO_RUN_ID": "run-b"},
            tag="-run-b",
        )
        assert intruder.wait(120) == 2, intruder.output()[-2000:]
        lines = [ln for ln in intruder.output().splitlines() if "torchx_diloco.train: error:" in ln]
        assert len(lines) == 1 and f"the lighthouse at {lighthouse.url} serves another run" in lines[0], lines
        assert "not run run-b" in lines[0]
        # the intruder's marks (its heartbeats) expire at the lighthouse before the run's own group looks
        deadline = time.monotonic() + 60
        while any(r.startswith("run-b") for r in live_replicas(lighthouse_status(lighthouse.url))):
            assert time.monotonic() < deadline, lighthouse_status(lighthouse.url)[-2000:]
            time.sleep(0.1)
        own = Group(
            0,
            1,
            lighthouse.url,
            [*NANO, "--checkpoint-dir", str(tmp_path / "a")],
            tmp_path,
            extra_env={"TORCHX_DILOCO_RUN_ID": "run-a"},
            tag="-run-a",
        )
        assert own.wait(120) == 0, own.output()[-2000:]
        assert "DiLoCo: group 0 finished at outer step 2" in own.output()
    finally:
        lighthouse.kill()


@pytest.mark.slow
def test_a_group_that_fails_for_good_ends_the_lighthouse_with_one_line(tmp_path):
    """A group of the run (two ranks under torchrun, 3 restarts allowed) reports an error no restart can fix: the
    lighthouse ends the run (exit 1) at once instead of waiting for groups that will never come. torchrun restarts
    nothing and prints no traceback; its reply file (TorchX's TORCHELASTIC_ERROR_FILE, what `torchx run` and
    `torchx status` show) holds the group's line, the lighthouse's its own."""
    replies = {name: tmp_path / name / "error.json" for name in ("lighthouse", "group")}
    lighthouse = Lighthouse(
        tmp_path, extra=["--run-id", "run-a"], env={**clean_env(), ERROR_FILE_ENV: str(replies["lighthouse"])}
    )
    try:
        doomed = Group(
            1,
            2,
            lighthouse.url,
            [*NANO, "--data", str(tmp_path / "missing.txt")],
            tmp_path,
            extra_env={"TORCHX_DILOCO_RUN_ID": "run-a", ERROR_FILE_ENV: str(replies["group"])},
            max_restarts=3,
            nproc=2,
        )
        assert doomed.wait(120) == -signal.SIGKILL  # the agent, ended by the worker: nothing restarted
        out = doomed.output()
        assert "missing.txt does not exist" in out
        assert "will restart worker group" not in out and "Traceback" not in out, out[-3000:]
        start = time.monotonic()
        assert lighthouse.proc.wait(timeout=30) == 1
        assert time.monotonic() - start < 10
        fatal = "replica_group_1 stopped with an error no restart can fix"
        assert fatal in lighthouse.output()
        assert read_error_file(str(replies["group"])).endswith(
            "missing.txt does not exist; pass an existing file, glob or fsspec URL"
        )
        assert read_error_file(str(replies["lighthouse"])).startswith(fatal)
        deadline = time.monotonic() + 60  # the worker that failed exits after the agent, its peer on SIGTERM
        while train_workers(TORCHFT_LIGHTHOUSE=lighthouse.url):
            assert time.monotonic() < deadline, "a rank of the group outlived its torchrun"
            time.sleep(0.2)
    finally:
        lighthouse.kill()

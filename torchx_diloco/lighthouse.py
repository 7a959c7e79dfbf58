"""``python -m torchx_diloco.lighthouse``: torchft's lighthouse, made to end when the run does.

torchft's lighthouse serves forever, and a TorchX app stays RUNNING while any role lives, so a plain
lighthouse would hang ``torchx run``. This launcher runs the same server and exits 0 once the groups that
joined have all gone quiet for ``--idle-exit`` seconds (training finished), or 1 if none joined in time.

Security: the lighthouse serves HTTP with an unauthenticated kill endpoint. It binds to loopback unless it
runs under Slurm (then to the address other nodes reach it by), or ``--bind-host`` says otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
from datetime import timedelta
from typing import Dict, List, Optional, Set, Tuple

from torchx_diloco.cluster import (
    FATAL_PREFIX,
    GROUP_PREFIX,
    LIGHTHOUSE_MARK,
    lighthouse_status,
    live_replicas,
    replica_id,
    safe_run_id,
    split_replica_id,
)
from torchx_diloco.config import (
    LIGHTHOUSE_FIRST_JOIN_TIMEOUT_S,
    LIGHTHOUSE_IDLE_EXIT_S,
    LIGHTHOUSE_PORT,
    STRAGGLER_GRACE_S,
)
from torchx_diloco.errors import report_error
from torchx_diloco.logs import libraries_level, quiet_libraries

logger = logging.getLogger("torchx_diloco.lighthouse")
PROG = "torchx_diloco.lighthouse"


def default_bind_host() -> Tuple[str, str]:
    """Where to listen, and why: loopback on a laptop; inside a Slurm job the address other nodes reach.

    Other nodes reach this one by its Slurm node name. If that name resolves to loopback here (Debian and
    Ubuntu map the hostname to 127.0.1.1), listening there would shut them out: listen on every interface.
    """
    if not os.environ.get("SLURM_JOB_ID"):
        return "127.0.0.1", "loopback: not in a Slurm job"
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        found = {str(ai[4][0]) for ai in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    except OSError:
        found = set()
    routable = sorted(
        (a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_loopback), key=lambda a: (":" in a, a)
    )  # IPv4 first
    if routable:
        return routable[0], f"the address of Slurm node {name}"
    return "0.0.0.0", (
        f"every interface: Slurm node {name} resolves to loopback here "
        f"({', '.join(sorted(found)) or 'nothing'}), which other nodes cannot reach"
    )


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # --idle is a typo, not --idle-exit
    )
    p.add_argument("--port", type=int, default=LIGHTHOUSE_PORT, help="port of the lighthouse (gRPC and HTTP /status)")
    p.add_argument(
        "--bind-host",
        default=None,
        help="address to listen on (default: 127.0.0.1, or under Slurm the address other nodes reach; "
        "'::' for every interface)",
    )
    p.add_argument("--min-replicas", type=int, default=1, help="groups needed to form a quorum")
    p.add_argument(
        "--join-timeout-ms",
        type=int,
        default=int(STRAGGLER_GRACE_S * 1000),
        help="the straggler grace: how long a quorum waits for groups that were in the previous one before it "
        "goes on without them (they heal at the next sync; with 2 groups torchft waits for a live one anyway)",
    )
    p.add_argument("--heartbeat-timeout-ms", type=int, default=5000, help="a group silent this long is dropped")
    p.add_argument(
        "--idle-exit",
        type=float,
        default=LIGHTHOUSE_IDLE_EXIT_S,
        help="exit 0 once every group that joined has been silent this many seconds (0 = never)",
    )
    p.add_argument(
        "--first-join-timeout",
        type=float,
        default=LIGHTHOUSE_FIRST_JOIN_TIMEOUT_S,
        help="exit 1 if no group has joined after this many seconds (0 = wait forever)",
    )
    p.add_argument(
        "--run-id",
        default=None,
        help="the run this lighthouse serves (its groups have the same TORCHX_DILOCO_RUN_ID): groups of "
        "other runs are ignored and refuse it",
    )
    args = p.parse_args(argv)
    if args.min_replicas < 1:
        p.error(f"--min-replicas {args.min_replicas} must be >= 1")
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} must be in 1..65535")
    return args


class RunWatch:
    """What the launcher learns from /status: this run's groups, when they went quiet, a group's fatal report."""

    def __init__(self, run_id: Optional[str]) -> None:
        self.run = safe_run_id(run_id) if run_id else None
        self.seen: Set[str] = set()
        self.foreign: Set[str] = set()
        self.fatal: Optional[str] = None

    def update(self, live: Set[str]) -> Set[str]:
        """This run's live groups; remembers new ones, other runs' replicas and fatal reports."""
        mine = set()
        for rid in live:
            run, name = split_replica_id(rid)
            if name == LIGHTHOUSE_MARK and run == self.run:
                continue
            if self.run is not None and run != self.run:
                if rid not in self.foreign:
                    self.foreign.add(rid)
                    print(f"lighthouse: {rid} belongs to another run, not {self.run}: it is refused", flush=True)
            elif name.startswith(FATAL_PREFIX):
                self.fatal = GROUP_PREFIX + name[len(FATAL_PREFIX) :]
            elif name.startswith(GROUP_PREFIX):
                mine.add(name)
        if not mine <= self.seen:
            print(f"lighthouse: groups seen: {', '.join(sorted(self.seen | mine))}", flush=True)
        self.seen |= mine
        return mine


class RunMark:
    """Shows this lighthouse's run id on /status while none of its groups is live, so that a group of another
    run refuses it even when it arrives first (groups look before their first sync: cluster.check_run).

    It is a heartbeat under a reserved id, and torchft's lighthouse waits for every heartbeating replica before
    a quorum: it stops as soon as a group of the run is live, and expires within the heartbeat timeout.
    """

    def __init__(self, url: str, run_id: Optional[str]) -> None:
        self.client = None
        self.rid = replica_id(0, run_id, "lighthouse_") if run_id else None
        if run_id:
            from torchft.coordination import LighthouseClient

            self.client = LighthouseClient(url, connect_timeout=timedelta(seconds=5))

    def show(self, wanted: bool) -> None:
        if self.client is not None and wanted:
            self.client.heartbeat(self.rid)


def serve(args: argparse.Namespace) -> int:
    from torchft.coordination import LighthouseServer

    host, why = (args.bind_host, "--bind-host") if args.bind_host else default_bind_host()
    bind = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
    try:
        server = LighthouseServer(
            bind=bind,
            min_replicas=args.min_replicas,
            join_timeout_ms=args.join_timeout_ms,
            heartbeat_timeout_ms=args.heartbeat_timeout_ms,
        )
    except Exception as e:  # noqa: BLE001 - the Rust server raises a plain RuntimeError on bind failures
        return report_error(PROG, f"cannot listen on {bind} ({e}): pick a free --port", 1)
    local = host in ("127.0.0.1", "::1", "0.0.0.0", "::")
    url = f"http://{'localhost' if local else host}:{args.port}"
    mark = RunMark(url, args.run_id)
    mark.show(True)  # at once: a group of another run that comes in the first half second is refused too
    run = f", run {args.run_id}" if args.run_id else ""
    print(f"lighthouse: serving on {bind} ({why}), min_replicas={args.min_replicas}{run}", flush=True)

    stop: Dict[str, Optional[int]] = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.update(signal=s))

    watch = RunWatch(args.run_id)
    started, last_live = time.monotonic(), time.monotonic()
    try:
        while stop["signal"] is None:
            time.sleep(0.5)
            try:
                live = watch.update(live_replicas(lighthouse_status(url)))
            except (urllib.error.URLError, OSError) as e:
                logger.warning("lighthouse /status did not answer: %s", e)
                continue
            mark.show(not live)
            now = time.monotonic()
            if watch.fatal:
                message = (
                    f"{watch.fatal} stopped with an error no restart can fix (its log has the line): ending the run"
                )
                return report_error(PROG, message, 1)
            if live:
                last_live = now
            elif watch.seen and args.idle_exit > 0 and now - last_live > args.idle_exit:
                print(
                    f"lighthouse: all {len(watch.seen)} groups finished (silent for {args.idle_exit:g}s); exiting",
                    flush=True,
                )
                return 0
            elif not watch.seen and args.first_join_timeout > 0 and now - started > args.first_join_timeout:
                message = (
                    f"no replica group joined within {args.first_join_timeout:g}s: check that the groups started "
                    "and that TORCHFT_LIGHTHOUSE points here"
                )
                return report_error(PROG, message, 1)
        print(f"lighthouse: stopped by signal {stop['signal']}", flush=True)
        return 0
    finally:
        server.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()  # torchft's Rust side logs every quorum at INFO otherwise
    logging.basicConfig(level=libraries_level())
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m torchx_diloco.lighthouse``: torchft's lighthouse, made to end when the run does.

torchft's lighthouse serves forever, and a TorchX app stays RUNNING while any role lives, so a plain
lighthouse would hang ``torchx run``. This launcher runs the same server and exits 0 once the groups that
joined have all gone quiet for ``--idle-exit`` seconds (training finished), or 1 if none joined in time.

Security: the lighthouse serves HTTP with an unauthenticated kill endpoint. It binds to loopback unless it
runs under Slurm (then to this node's address), or ``--bind-host`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
from typing import List, Optional

from torchx_diloco.cluster import lighthouse_status, live_replicas

logger = logging.getLogger("torchx_diloco.lighthouse")


def default_bind_host() -> str:
    """Loopback for a laptop; this node's address (not every interface) inside a Slurm job."""
    if os.environ.get("SLURM_JOB_ID"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return socket.gethostname()
    return "127.0.0.1"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m torchx_diloco.lighthouse", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--port", type=int, default=29510, help="port of the lighthouse (gRPC and HTTP /status)")
    p.add_argument("--bind-host", default=None,
                   help="address to listen on (default: 127.0.0.1, or this node's address under Slurm; "
                   "'::' for every interface)")
    p.add_argument("--min-replicas", type=int, default=1, help="groups needed to form a quorum")
    p.add_argument("--join-timeout-ms", type=int, default=60000,
                   help="how long a quorum waits for groups that were in the previous one")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=5000, help="a group silent this long is dropped")
    p.add_argument("--idle-exit", type=float, default=20.0,
                   help="exit 0 once every group that joined has been silent this many seconds (0 = never)")
    p.add_argument("--first-join-timeout", type=float, default=600.0,
                   help="exit 1 if no group has joined after this many seconds (0 = wait forever)")
    args = p.parse_args(argv)
    if args.min_replicas < 1:
        p.error(f"--min-replicas {args.min_replicas} must be >= 1")
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} must be in 1..65535")
    return args


def serve(args: argparse.Namespace) -> int:
    from torchft._torchft import LighthouseServer

    host = args.bind_host or default_bind_host()
    bind = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
    try:
        server = LighthouseServer(bind=bind, min_replicas=args.min_replicas, join_timeout_ms=args.join_timeout_ms,
                                  heartbeat_timeout_ms=args.heartbeat_timeout_ms)
    except Exception as e:  # noqa: BLE001 - the Rust server raises a plain RuntimeError on bind failures
        print(f"torchx_diloco.lighthouse: error: cannot listen on {bind} ({e}): pick a free --port", file=sys.stderr)
        return 1
    url = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{args.port}"
    print(f"lighthouse: serving on {bind} ({url}), min_replicas={args.min_replicas}", flush=True)

    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.update(signal=s))

    started, seen, last_live = time.monotonic(), set(), None
    try:
        while stop["signal"] is None:
            time.sleep(0.5)
            try:
                live = live_replicas(lighthouse_status(f"http://127.0.0.1:{args.port}" if host in ("0.0.0.0", "::") else url))
            except (urllib.error.URLError, OSError) as e:
                logger.warning("lighthouse /status did not answer: %s", e)
                continue
            now = time.monotonic()
            if live:
                if not live <= seen:
                    print(f"lighthouse: groups seen: {', '.join(sorted(seen | live))}", flush=True)
                seen |= live
                last_live = now
            elif seen and args.idle_exit > 0 and now - last_live > args.idle_exit:
                print(f"lighthouse: all {len(seen)} groups finished (silent for {args.idle_exit:g}s); exiting",
                      flush=True)
                return 0
            elif not seen and args.first_join_timeout > 0 and now - started > args.first_join_timeout:
                print(f"torchx_diloco.lighthouse: error: no replica group joined within {args.first_join_timeout:g}s: "
                      "check that the groups started and that TORCHFT_LIGHTHOUSE points here", file=sys.stderr)
                return 1
        print(f"lighthouse: stopped by signal {stop['signal']}", flush=True)
        return 0
    finally:
        server.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at INFO otherwise
    logging.basicConfig(level=logging.WARNING)
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

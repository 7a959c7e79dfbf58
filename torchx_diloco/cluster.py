"""Joining the run: reaching the lighthouse, waiting for the other groups, building torchft's Manager."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from datetime import timedelta
import torch

from torchx_diloco.errors import UserError

logger = logging.getLogger(__name__)

_HEARTBEAT = re.compile(r"([\w.\-]+):[0-9a-f\-]+: seen ([0-9.e\-]+)s ago")


def lighthouse_status(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"{url}/status", timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def live_replicas(status_html: str, fresher_than_s: float = 2.0) -> set:
    """Replica ids (without torchft's per-process uuid) that heartbeated recently, read from /status."""
    return {rid for rid, age in _HEARTBEAT.findall(status_html) if float(age) < fresher_than_s}


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


def wait_for_groups(url: str, expected: int, timeout_s: float, me: str) -> None:
    """Give the other groups a bounded head start so the first quorum has everyone in it."""
    deadline = time.monotonic() + timeout_s
    seen: set = set()
    while time.monotonic() < deadline:
        try:
            seen = live_replicas(lighthouse_status(url)) | {me}
        except (urllib.error.URLError, OSError):
            pass
        if len(seen) >= expected:
            return
        time.sleep(0.2)
    logger.warning("only %d of %d groups reached the lighthouse within %gs; starting without the others",
                   len(seen), expected, timeout_s)


def process_group(device: torch.device, timeout: timedelta):
    """torchft's reconfigurable process group: NCCL between GPUs, Gloo on CPU."""
    from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

    return ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)


def build_manager(group_id: int, device: torch.device, min_replicas: int, timeout_s: float,
                  quorum_timeout_s: float, lighthouse: str):
    """A torchft Manager for this group; outside torchrun it hosts the group's own store."""
    from torchft import Manager

    timeout = timedelta(seconds=timeout_s)
    store_kwargs: dict = {}
    if "MASTER_ADDR" not in os.environ:  # launched by hand, not by torchrun: a one-rank group
        from torch.distributed import TCPStore

        # the quorum hands this address to the other groups: it must be reachable from their hosts
        host = socket.gethostname()
        store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
        store_kwargs = dict(store_addr=host, store_port=store.port, rank=0, world_size=1)
    manager = Manager(
        pg=process_group(device, timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=min_replicas,
        use_async_quorum=False,
        replica_id=f"replica_group_{group_id}",
        lighthouse_addr=lighthouse,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=quorum_timeout_s),
        connect_timeout=timedelta(seconds=quorum_timeout_s),
        **store_kwargs,
    )
    if store_kwargs:
        manager._torchx_diloco_store = store  # keep the store alive as long as the manager
    return manager


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA device is visible; use --device cpu or auto")
    return device


def group_rank() -> int:
    """This process's rank inside its replica group (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def group_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


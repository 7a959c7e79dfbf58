"""How many GPUs the machines that run the groups have, and the checks each scheduler can make before launch.

On ``local_cwd`` every group shares this machine: the GPUs of all groups must fit in it. On Slurm each group
runs on its own node(s): one group's GPUs must fit in one node, and only when that count is known (a login
node usually has no GPUs). ``TORCHX_DILOCO_GPUS`` overrides the count: this machine's GPUs for ``local_cwd``,
one node's for Slurm. Torch-free: the components and the scheduler plugins import it.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Iterable, List, Optional

GPUS_ENV = "TORCHX_DILOCO_GPUS"


def _override() -> Optional[int]:
    raw = os.environ.get(GPUS_ENV)
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"{GPUS_ENV}={raw!r} is not a number: set it to the GPU count of one machine (node)")
    return int(raw)


def machine_gpus() -> Optional[int]:
    """GPUs on this machine: TORCHX_DILOCO_GPUS, else `nvidia-smi -L` (what TorchX counts too); None if unknown."""
    override = _override()
    if override is not None:
        return override
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        pass
    if os.path.isdir("/proc/driver/nvidia/gpus"):  # a driver without nvidia-smi
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    return None


def slurm_node_gpus(partition: Optional[str] = None) -> Optional[int]:
    """The most GPUs one Slurm node (of ``partition``) has: TORCHX_DILOCO_GPUS, else sinfo's gres; None if unknown."""
    override = _override()
    if override is not None:
        return override
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    counts = [int(n) for n in re.findall(r"\bgpu(?::[\w.\-]+)?:(\d+)", out)]
    return max(counts) if counts else None


def check_machine_fits(gpus_per_role: Iterable[int]) -> None:
    """local_cwd: all groups share this machine."""
    total = sum(gpus_per_role)
    have = machine_gpus() if total else None
    if have and total > have:
        raise ValueError(
            f"{total} GPUs requested but this machine has {have}: lower --replica_groups or the GPUs "
            f"per group (or set {GPUS_ENV} to this machine's GPU count)"
        )


def check_node_fits(gpus_per_role: Iterable[int], partition: Optional[str] = None) -> None:
    """Slurm: each group on its own node; skipped where a node's GPU count is unknown."""
    most = max(gpus_per_role, default=0)
    have = slurm_node_gpus(partition) if most else None
    if have and most > have:
        raise ValueError(
            f"a group asks for {most} GPUs but a Slurm node has at most {have}: lower the GPUs per "
            f"group (or set {GPUS_ENV} to the GPU count of one node)"
        )


def check_devices_exist(devices: List[List[int]]) -> None:
    """An explicit assignment (local_cwd) must name devices this machine has."""
    have = machine_gpus()
    if not have:
        return
    bad = sorted({d for group in devices for d in group if d >= have})
    if bad:
        raise ValueError(
            f"gpu_assignment names device(s) {bad} but this machine has GPUs 0..{have - 1}: use devices that exist"
        )

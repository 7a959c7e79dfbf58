"""Run a replica group's module (``-m torchx_diloco.train ...`` or a script) with its store on this host's name.

Launched by hand, ``torchx_diloco.cluster.build_manager`` hosts the group's store on 127.0.0.1 and torchft
advertises that address to the other groups, which only works when all groups share one network stack.
In the link benchmark each group has its own network namespace, so this wrapper does what torchrun does:
host the store on the host's name and pass it on through MASTER_ADDR/MASTER_PORT.

Usage: python benchmarks/ns_group.py -m MODULE ARGS...  |  python benchmarks/ns_group.py SCRIPT ARGS...
"""

from __future__ import annotations

import os
import runpy
import socket
import sys


def main() -> None:
    from torch.distributed import TCPStore

    host = socket.gethostname()
    store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(store.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()

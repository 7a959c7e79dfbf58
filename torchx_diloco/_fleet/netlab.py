"""A private network on this machine: one namespace per replica group, joined through a hub namespace.

::

    dlb-g0 (10.200.0.2) ==veth== [hub: bridge 10.200.0.1, the lighthouse] ==veth== dlb-g1 (10.200.0.3)

Shared by ``benchmarks/bench_link.py`` (a shaped link) and ``tests/test_network_fault.py`` (a link cut mid-run),
which is why it lives in the package. Each group's link can be shaped with ``tc`` (tbf: a rate limit, both
directions) and cut and restored (:meth:`Lab.cut`, :meth:`Lab.restore`). This kernel has no netem, so added delay
cannot be emulated; only bandwidth is. Names resolve through /etc/netns/<ns>/hosts (``ip netns exec`` mounts it
over /etc/hosts), and each group process gets its own UTS hostname (:func:`netns_prefix`), so the addresses
torchft advertises (manager, store, Gloo) are reachable across namespaces. Everything is removed on
:meth:`Lab.close`, on exit and on SIGTERM. Needs root and iproute2.
"""

from __future__ import annotations

import atexit
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any, List, Optional, Sequence, Tuple

from torchx_diloco._fleet.testing import Group

PREFIX = "dlbench-"  # namespaces with this prefix belong to the benchmark (stale ones are removed)
HUB = f"{PREFIX}hub"
HUB_ADDR = "10.200.0.1"
ETC_NETNS = Path("/etc/netns")


def _sh(*args: str, ns: Optional[str] = None, check: bool = True) -> str:
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return r.stdout


def available() -> Optional[str]:
    """None if namespaces can be made here, else why not."""
    if not shutil.which("ip") or not shutil.which("tc") or not shutil.which("unshare"):
        return "needs iproute2 (ip, tc) and util-linux (unshare)"
    r = subprocess.run(["ip", "netns", "add", f"{PREFIX}probe"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace ({r.stderr.strip()}): run as root"
    subprocess.run(["ip", "netns", "del", f"{PREFIX}probe"], capture_output=True)
    return None


def remove_stale(prefix: str = PREFIX) -> None:
    """Delete the namespaces named ``prefix*`` that an earlier, killed run left behind."""
    for line in _sh("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def netns_prefix(netns: str, hostname: Optional[str]) -> List[str]:
    """Run in ``netns`` with its own UTS namespace named ``hostname`` (peers find each other by name)."""
    prefix = ["ip", "netns", "exec", netns]
    if hostname:
        prefix += ["unshare", "--uts", "sh", "-c", f'hostname {shlex.quote(hostname)} && exec "$@"', "_"]
    return prefix


class Lab:
    """``groups`` namespaces around a hub. ``ns(g)``, ``hostname(g)``, ``iface(g)``, ``shape(rate)``, ``cut(g)``.

    ``prefix`` names the namespaces (the hub is ``<prefix>hub``): two labs with different prefixes coexist (a test
    and a benchmark on one machine); building a lab removes what is left of an earlier one with its prefix.
    """

    def __init__(self, groups: int, prefix: str = PREFIX) -> None:
        self.groups = groups
        self.prefix = prefix
        self.hub = f"{prefix}hub"
        self.namespaces: List[str] = []
        remove_stale(prefix)
        atexit.register(self.close)
        self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _on_term(self, signum: int, frame: Optional[FrameType]) -> None:
        self.close()
        raise SystemExit(128 + signum)

    def ns(self, g: int) -> str:
        return f"{self.prefix}g{g}"

    def hostname(self, g: int) -> str:
        return f"dlb-g{g}"

    def addr(self, g: int) -> str:
        return f"10.200.0.{g + 2}"

    def iface(self, g: int) -> str:
        return f"dlb-g{g}"  # the group's end of its veth, inside its namespace

    def hub_iface(self, g: int) -> str:
        return f"dlb-g{g}h"

    def prefix_argv(self, g: int) -> List[str]:
        """What runs a command in group ``g``'s namespace under its own hostname (:func:`netns_prefix`)."""
        return netns_prefix(self.ns(g), self.hostname(g))

    def group(self, g: int, groups: int, lighthouse: str, args: Sequence[str], log_dir: Path, **kw: Any) -> Group:
        """:class:`~torchx_diloco._fleet.testing.Group` ``g`` (same arguments, ``max_restarts`` included), run in its
        namespace under its hostname: its store, manager and Gloo addresses are then reachable from the others."""
        return NsGroup(self.prefix_argv(g), g, groups, lighthouse, args, log_dir, **kw)

    def _build(self) -> None:
        hosts = (
            "127.0.0.1 localhost\n"
            + f"{HUB_ADDR} dlb-hub\n"
            + "".join(f"{self.addr(g)} {self.hostname(g)}\n" for g in range(self.groups))
        )
        for name in [self.hub, *(self.ns(g) for g in range(self.groups))]:
            (ETC_NETNS / name).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / name / "hosts").write_text(hosts)
            _sh("ip", "netns", "add", name)
            self.namespaces.append(name)
            _sh("ip", "link", "set", "lo", "up", ns=name)
        _sh("ip", "link", "add", "br0", "type", "bridge", ns=self.hub)
        _sh("ip", "addr", "add", f"{HUB_ADDR}/24", "dev", "br0", ns=self.hub)
        _sh("ip", "link", "set", "br0", "up", ns=self.hub)
        for g in range(self.groups):
            inner, outer = self.iface(g), self.hub_iface(g)
            veth = ["ip", "link", "add", inner, "netns", self.ns(g), "type", "veth"]
            _sh(*veth, "peer", "name", outer, "netns", self.hub)
            _sh("ip", "link", "set", outer, "master", "br0", ns=self.hub)
            _sh("ip", "link", "set", outer, "up", ns=self.hub)
            _sh("ip", "addr", "add", f"{self.addr(g)}/24", "dev", inner, ns=self.ns(g))
            _sh("ip", "link", "set", inner, "up", ns=self.ns(g))

    def shape(self, rate: Optional[str]) -> None:
        """Limit every group's link to ``rate`` (e.g. '100mbit') in both directions; None removes limits."""
        for g in range(self.groups):
            for ns, dev in ((self.ns(g), self.iface(g)), (self.hub, self.hub_iface(g))):
                _sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
                if rate:  # a burst of 256 KiB holds a whole GSO segment; 50 ms of queue
                    _sh(
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        rate,
                        "burst",
                        "256kb",
                        "latency",
                        "50ms",
                        ns=ns,
                    )

    def cut(self, g: int) -> None:
        """Unplug group ``g``'s cable at the hub: its veth's hub end goes down, nothing passes either way (the
        group's end loses its carrier; open connections see no reset, only silence)."""
        _sh("ip", "link", "set", self.hub_iface(g), "down", ns=self.hub)

    def restore(self, g: int) -> None:
        """Plug it back in (:meth:`cut` undone)."""
        _sh("ip", "link", "set", self.hub_iface(g), "up", ns=self.hub)

    def link_up(self, g: int) -> bool:
        """Whether group ``g``'s end of its link has a carrier (False while it is cut)."""
        return _sh("cat", f"/sys/class/net/{self.iface(g)}/carrier", ns=self.ns(g), check=False).strip() == "1"

    def tx_bytes(self, g: int) -> int:
        return int(_sh("cat", f"/sys/class/net/{self.iface(g)}/statistics/tx_bytes", ns=self.ns(g)))

    def sampler_argv(self, g: int, period: float = 0.05) -> List[str]:
        """A process inside group g's namespace printing 'unix_time tx_bytes' every ``period`` seconds."""
        script = (
            f"while :; do read b < /sys/class/net/{self.iface(g)}/statistics/tx_bytes; "
            f'echo "$EPOCHREALTIME $b"; sleep {period}; done'
        )
        return ["ip", "netns", "exec", self.ns(g), "bash", "-c", script]

    def close(self) -> None:
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        self.namespaces = []
        try:
            signal.signal(signal.SIGTERM, self._old_term)
        except (ValueError, TypeError):
            pass

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tx_bytes_of(pid: int, iface: str) -> Optional[int]:
    """Bytes sent so far through ``iface`` of the network namespace process ``pid`` lives in, None if either is
    gone. Read from /proc/<pid>/net/dev: no process to start, so it can be polled every millisecond."""
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == iface:
            return int(counters.split()[8])  # 8 receive counters, then transmitted bytes
    return None


def read_samples(path: Path) -> List[Tuple[float, int]]:
    """The (unix_time, tx_bytes) pairs a :meth:`Lab.sampler_argv` process wrote to ``path``."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out.append((float(parts[0]), int(parts[1])))
            except ValueError:
                pass
    return out


def bytes_between(samples: List[Tuple[float, int]], t0: float, t1: float) -> Optional[int]:
    """tx bytes counted between the samples nearest ``t0`` and ``t1`` (None without samples there)."""
    if not samples:
        return None
    before = [b for t, b in samples if t <= t0]
    after = [b for t, b in samples if t >= t1]
    if not before or not after:
        return None
    return after[0] - before[-1]


class NsGroup(Group):
    """A :class:`~torchx_diloco._fleet.testing.Group` whose command (torchrun or python) runs behind ``netns_argv``."""

    def __init__(self, netns_argv: Sequence[str], *args: Any, **kwargs: Any) -> None:
        self.netns_argv = list(netns_argv)
        super().__init__(*args, **kwargs)

    def _spawn(self) -> subprocess.Popen:
        if self.argv[: len(self.netns_argv)] != self.netns_argv:
            self.argv = [*self.netns_argv, *self.argv]
        return super()._spawn()

"""Shared pieces of the benchmarks: runs of real processes, statistics, and the results JSON.

Every benchmark launches the real runtime (``python -m torchx_diloco.train``, ``python -m
torchx_diloco.lighthouse``) as separate processes, one core's worth of threads each (OMP_NUM_THREADS=1),
and runs the sides of each comparison interleaved (A B A B ...) so a noisy shared machine hurts both alike.
The processes, their environment and the metrics reader are the tests' own (:mod:`torchx_diloco._fleet.testing`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# PYTHON, committed and read_metrics are also the benchmark scripts' (bl.PYTHON, bl.committed, bl.read_metrics)
from torchx_diloco._fleet import testing
from torchx_diloco._fleet.netlab import HUB_ADDR, netns_prefix, read_samples
from torchx_diloco._fleet.testing import PYTHON, Lighthouse, Proc, committed, read_metrics, train_module_args  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
# where results go; the override is for trying the scripts without touching the committed results
RESULTS = Path(os.environ.get("TORCHX_DILOCO_BENCH_RESULTS", REPO / "benchmarks" / "results"))
NS_GROUP = str(REPO / "benchmarks" / "ns_group.py")  # hosts a group's store on a routable address


def group_env(group: int, groups: int, lighthouse: str) -> Dict[str, str]:
    """A replica group's environment (:func:`torchx_diloco._fleet.testing.group_env`), with this repository on
    PYTHONPATH and without LOGLEVEL, so that every run logs alike."""
    env = testing.group_env(group, groups, lighthouse, {"PYTHONPATH": str(REPO)})
    env.pop("LOGLEVEL", None)
    return env


def start_lighthouse(
    log_dir: Path,
    min_replicas: int,
    netns: Optional[str] = None,
    host: str = "127.0.0.1",
    idle_exit: float = 5.0,
    extra: Sequence[str] = (),
) -> Tuple[Lighthouse, str]:
    """``python -m torchx_diloco.lighthouse`` (in ``netns`` if given, with ``extra`` flags); returns (the
    lighthouse, its URL)."""
    lighthouse = Lighthouse(
        log_dir,
        min_replicas,
        idle_exit=idle_exit,
        extra=extra,
        netns=netns,
        host=host,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
    )
    return lighthouse, lighthouse.url


def median(xs: Iterable[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def machine() -> Dict[str, Any]:
    import torch

    try:
        from importlib.metadata import version

        torchft_version = version("torchft")
    except Exception:  # noqa: BLE001 - a version is nice to have, not needed
        torchft_version = "unknown"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": load,
        "torch": torch.__version__,
        "torchft": torchft_version,
    }


def rel(path: str) -> str:
    """``path`` relative to the repository when it is inside it (results may be redirected elsewhere)."""
    return os.path.relpath(path, REPO) if os.path.abspath(path).startswith(str(REPO) + os.sep) else path


def write_result(name: str, data: Dict[str, Any], started: float) -> Path:
    """Write ``benchmarks/results/<name>.json`` (``<name>-full.json`` for ``--full``) with the date, machine and
    exact command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "--full" in sys.argv[1:]:
        name = f"{name}-full"
    out = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]]),
        "wall_s": round(time.time() - started, 1),
        "machine": machine(),
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"wrote {rel(str(path))}")
    return path


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10**-digits):
            return f"{x:.{digits}g}" if abs(x) >= 1e5 else f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda cs: "| " + " | ".join(c.ljust(w) for c, w in zip(cs, widths, strict=False)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def model_params(preset: str, seq_len: int) -> int:
    from torchx_diloco.model import build_model

    return build_model(preset, block_size=seq_len).num_parameters()


class Run:
    """One run of ``groups`` replica groups against a fresh lighthouse; ``metrics[g]`` after :meth:`wait`."""

    def __init__(
        self,
        workdir: Path,
        groups: int,
        args: Sequence[str],
        min_replicas: Optional[int] = None,
        lab: Any = None,
        script: Optional[str] = None,
        lighthouse_args: Sequence[str] = (),
    ) -> None:
        """``script``: a worker script instead of the training module (it gets ``--out <jsonl>``);
        ``lighthouse_args``: more flags for the lighthouse."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.groups = groups
        self.lab = lab
        self.started = time.time()
        if lab is not None:
            self.lighthouse, self.url = start_lighthouse(
                self.workdir, min_replicas or groups, netns=lab.hub, host=HUB_ADDR, extra=lighthouse_args
            )
        else:
            self.lighthouse, self.url = start_lighthouse(self.workdir, min_replicas or groups, extra=lighthouse_args)
        self.samplers = [Proc(lab.sampler_argv(g), self.workdir / f"tx{g}.log") for g in range(groups)] if lab else []
        self.script = script
        self.procs: List[Proc] = []
        for g in range(groups):
            self.procs.append(self.start_group(g, args))

    def jsonl(self, g: int) -> Path:
        if self.script:
            return self.workdir / f"worker{g}.jsonl"
        return Path(testing.metrics_url(self.workdir / "ckpt", g))

    def group_argv(self, g: int, args: Sequence[str]) -> List[str]:
        if self.script:
            body = [self.script, *args, "--out", str(self.jsonl(g))]
        else:
            body = train_module_args([*args, "--checkpoint-dir", str(self.workdir / "ckpt")])
        if self.lab is not None:
            return [*netns_prefix(self.lab.ns(g), self.lab.hostname(g)), PYTHON, NS_GROUP, *body]
        return [PYTHON, *body]

    def start_group(self, g: int, args: Sequence[str], tag: str = "") -> Proc:
        return Proc(
            self.group_argv(g, args),
            self.workdir / f"group{g}{tag}.log",
            env=group_env(g, self.groups, self.url),
            cwd=self.workdir,
        )

    def wait(self, timeout: float = 600) -> "Run":
        try:
            deadline = time.monotonic() + timeout
            for p in self.procs:
                rc = p.wait(max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    raise RuntimeError(f"{shlex.join(p.argv)} exited {rc}:\n{p.output()[-3000:]}")
        finally:
            self.close()
        self.wall_s = time.time() - self.started
        self.metrics = [read_metrics(self.jsonl(g)) for g in range(self.groups)]
        return self

    def close(self) -> None:
        for p in [*self.procs, *self.samplers, self.lighthouse]:
            p.kill()

    def tx_samples(self, g: int) -> List[tuple]:
        return read_samples(self.workdir / f"tx{g}.log")

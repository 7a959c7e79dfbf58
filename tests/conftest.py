"""What the test files share: real servers on loopback (an S3-protocol endpoint, moto's server mode; an in-process
torchft lighthouse), real torchft Managers built as the trainer builds its own, groups as threads of this process,
``faulty://`` folders, and waits for what groups started as processes do (never for how fast they do it)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest

from torchx_diloco._fleet.zygote import ZYGOTE_ENV

# Trainers and lighthouses the tests start are forked from an interpreter that imported them already (about 4.5 s
# of CPU each saved; torchx_diloco/_fleet/zygote.py). `TORCHX_DILOCO_ZYGOTE=0 make test` starts each one fresh.
os.environ.setdefault(ZYGOTE_ENV, "1")
# Every TCPStore (torchft's per group, torchrun's, each process group's) looks up the host name of each client it
# accepts, for its log lines (c10d's formatSockAddr); on loopback that is a reverse DNS query for ::ffff:127.0.0.1,
# which /etc/hosts does not answer. Where the DNS server drops some of them (this project's machines: about one in
# 25), glibc waits 5 s before its retry: one in ~12 Managers built here took 5 s longer. One try of 1 s instead: the
# lookup fails with EAI_AGAIN and torch logs addresses, not names, for the rest of that process (it says so once).
# In this process and every process the tests start; forward lookups of the names used here are /etc/hosts'.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")

# --- two tests at a time (make test: pytest -n 2 --dist loadgroup) ------------------------------------------------
# Most tests wait on processes more than they compute, so two run side by side. Those sharing one machine-wide
# resource run one after another on one worker: the Slurm cluster's fake nodes (the 2x2 test takes all five), and
# the network namespaces of netlab.
SERIAL_GROUPS = {"test_slurm.py": "slurm", "test_network_fault.py": "netns"}
# Module fixtures that train or launch (tens of seconds): the tests using one stay on one worker, so
# it is built once. pytest 9.2 ignores the groups (pytest-dev/pytest-xdist#1386): pyproject.toml pins pytest below
# it. tests/test_xdist_groups.py fails if a group is split again.
SHARED_FIXTURES = {"dry_runs", "hf_run", "nano_run", "bf16_run", "accum_run"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks (after it, they group nothing)
def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        group = SERIAL_GROUPS.get(item.path.name)
        if group is None and SHARED_FIXTURES & set(getattr(item, "fixturenames", ())):
            group = f"{item.path.name}-fixtures"
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server on 127.0.0.1 (moto's server mode, as s3fs's own tests use).

    Exports the endpoint and test credentials to this process and to the processes it starts.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "FSSPEC_S3_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        FSSPEC_S3_ENDPOINT_URL=f"http://{host}:{port}",
    )
    import fsspec.config

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = f"http://{host}:{port}"  # env is read at import
    yield f"http://{host}:{port}"
    fsspec.config.conf["s3"].pop("endpoint_url", None)
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_url(s3_endpoint):
    """A fresh bucket on the test S3 server, as an s3:// URL."""
    import fsspec

    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/run"


@pytest.fixture
def faulty_url(tmp_path):
    """``faulty://<tmp_path>/ckpt``, known to fsspec in this process (trainers started through the fleet register
    it in theirs: :func:`torchx_diloco._fleet.testing.train_module_args`)."""
    from torchx_diloco._fleet import faulty

    faulty.register()
    return f"faulty://{tmp_path}/ckpt"


# --- in-process lighthouses, Managers and groups --------------------------------------------------------------
@contextmanager
def lighthouse_server(min_replicas: int = 1, join_timeout_ms: int = 100) -> Iterator[str]:
    """A real torchft lighthouse in this process (join timeout 100 ms: quorums form fast); yields its address."""
    from torchft.coordination import LighthouseServer

    server = LighthouseServer(bind="127.0.0.1:0", min_replicas=min_replicas, join_timeout_ms=join_timeout_ms)
    try:
        yield server.address()
    finally:
        server.shutdown()


def group_manager_for(lighthouse: str, group: int = 0, min_replicas: int = 1, timeout_s: float = 10) -> Any:
    """A real Manager for group ``group``, built by the trainer's own ``cluster.build_manager`` (a one-rank group
    hosting its store)."""
    import torch

    from torchx_diloco.cluster import build_manager
    from torchx_diloco.config import ClusterConfig

    cluster = ClusterConfig(
        min_replicas=min_replicas,
        collective_timeout=timeout_s,
        quorum_timeout=timeout_s,
        group_id=group,
        num_groups=max(group + 1, min_replicas),
        lighthouse=lighthouse,
    )
    return build_manager(cluster, torch.device("cpu"))


@pytest.fixture
def lighthouse() -> Iterator[str]:
    """The address of an in-process torchft lighthouse that forms quorums of one group or more."""
    with lighthouse_server() as address:
        yield address


def run_in_groups(
    n: int,
    work: Callable[[int, Any], Any],
    timeout: float = 120.0,
    min_replicas: Optional[int] = None,
    join_timeout_ms: int = 100,
) -> List[Any]:
    """``work(group, manager)`` for ``n`` groups at once, each a thread with its own Manager, against a lighthouse
    that waits for ``min_replicas`` (all ``n`` unless given: then each group first waits for all ``n`` to heartbeat,
    so the first quorum has them all); the results in group order (a group's exception is raised here)."""
    results: List[Any] = [None] * n
    errors: List[BaseException] = []
    quorum = n if min_replicas is None else min_replicas
    with lighthouse_server(min_replicas=quorum, join_timeout_ms=join_timeout_ms) as address:

        def one(g: int) -> None:
            manager = group_manager_for(address, g, min_replicas=quorum, timeout_s=20)
            try:
                if quorum < n:
                    from torchx_diloco.cluster import wait_for_groups

                    wait_for_groups(address, n, 60, g)
                results[g] = work(g, manager)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(e)
            finally:
                manager.shutdown(wait=False)

        threads = [threading.Thread(target=one, args=(g,)) for g in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a group did not finish"
    return results


# --- groups as processes: waiting for what they do, not for how fast they do it ----------------------------------
def wait_until(what: str, ready: Callable[[], bool], alive: Sequence[Any], timeout: float = 240) -> None:
    """Poll ``ready`` until true; fail at once when one of ``alive`` exits, and (a hang) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        for p in alive:
            assert p.proc.poll() is None, f"group {p.group} exited before {what}:\n{p.output()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:g}s"
        time.sleep(0.1)


def hold_at(step: int, release: Path) -> Dict[str, str]:
    """The environment of a group held at ``step``: its checkpoint of that step waits (``faulty://``'s ``hold``)
    until the file ``release`` exists, so the group stops before its next sync, heartbeating, until the test lets
    it go, however fast it trains."""
    from torchx_diloco._fleet.faulty import FAULTS_ENV

    return {FAULTS_ENV: json.dumps([{"match": f"step_{step:08d}/", "action": "hold", "until": str(release)}])}


def printed_step(group: Any, step: int) -> Callable[[], bool]:
    """True once the group (a :class:`~torchx_diloco._fleet.testing.Group`) printed that it committed ``step``."""
    return lambda: f"Number of outer optimizer steps completed: [{step}]" in group.output()

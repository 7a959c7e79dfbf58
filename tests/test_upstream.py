"""Every private torchft/TorchX member listed in torchx_diloco/upstream.py still has the shape we rely on.

Real objects only: in-process lighthouses, real torchft Managers on Gloo, TorchX's own Slurm scheduler class.
A failure names the member, what we use it for and where, so an upgrade that breaks one says so in one place.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator

import pytest
import torch
import torch.nn as nn

torchft = pytest.importorskip("torchft")
from torch.distributed import TCPStore  # noqa: E402
from torchft import Manager  # noqa: E402
from torchft.process_group import ProcessGroupGloo  # noqa: E402

from tests.conftest import lighthouse_server as lighthouse  # noqa: E402
from torchx_diloco.cluster import lighthouse_status, live_replicas  # noqa: E402
from torchx_diloco.upstream import PRIVATE_USES, PrivateUse  # noqa: E402

TIMEOUT = timedelta(seconds=10)

Check = Callable[[pytest.FixtureRequest], None]
CHECKS: Dict[str, Check] = {}


def checks(name: str) -> Callable[[Check], Check]:
    """Registers the check of the table entry ``name``."""

    def register(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn

    return register


@contextmanager
def manager(
    url: str, use_async_quorum: bool = False, min_replica_size: int = 1, replica_id: str = "replica_group_0"
) -> Iterator[Manager]:
    """A Manager built as cluster.build_manager builds one (a one-rank group hosting its store), on loopback."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    m = Manager(
        pg=ProcessGroupGloo(timeout=TIMEOUT),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=min_replica_size,
        use_async_quorum=use_async_quorum,
        replica_id=replica_id,
        lighthouse_addr=url,
        timeout=TIMEOUT,
        quorum_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        store_addr="127.0.0.1",
        store_port=store.port,
        rank=0,
        world_size=1,
    )
    try:
        yield m
    finally:
        m.shutdown(wait=False)
        del store


# --- torchft -----------------------------------------------------------------------------------------------
@checks("torchft lighthouse GET /status (HTML: '<replica_id>:<uuid>: seen <s>s ago')")
def _status_page(request: pytest.FixtureRequest) -> None:
    """A real Manager's own heartbeats, read back through cluster.py's regex (ids may carry a run: dots, dashes)."""
    with lighthouse() as url, manager(url, replica_id="run-1.replica_group_3"):
        deadline, html = time.monotonic() + 10, ""
        while time.monotonic() < deadline:
            html = lighthouse_status(url)
            if live_replicas(html) == {"run-1.replica_group_3"}:
                return
            time.sleep(0.1)
        raise AssertionError(f"cluster._HEARTBEAT finds no live run-1.replica_group_3 in /status: {html[-1500:]!r}")


@checks("torchft.Manager._use_async_quorum")
def _use_async_quorum(request: pytest.FixtureRequest) -> None:
    with lighthouse() as url:
        for flag in (True, False):
            with manager(url, use_async_quorum=flag) as m:
                assert m._use_async_quorum is flag, f"use_async_quorum={flag} reads {m._use_async_quorum!r}"


def _failed_quorum(m: Manager) -> BaseException:
    try:
        m.start_quorum(timeout=timedelta(seconds=0.3))
    except Exception as e:  # noqa: BLE001 - whatever torchft raises for a quorum that timed out
        return e
    raise AssertionError("a quorum of 1 group succeeded where 2 are needed")


@checks("torchft.Manager._quorum_future")
def _quorum_future(request: pytest.FixtureRequest) -> None:
    """A failed quorum is kept and re-raised until the attribute is reset: what cluster.start_quorum undoes."""
    with lighthouse(min_replicas=2) as url, manager(url, min_replica_size=2) as m:
        assert m._quorum_future is None, "a new Manager has a quorum future already"
        first = _failed_quorum(m)
        assert _failed_quorum(m) is first, (
            "start_quorum no longer re-raises the stored failure: the reset in cluster.py may be unneeded"
        )
        m._quorum_future = None
        assert _failed_quorum(m) is not first, "resetting _quorum_future no longer makes start_quorum ask again"


@checks("torchft.Manager._pg (.size(), .alltoall_base, .allgather_into_tensor_coalesced, .abort())")
def _manager_pg(request: pytest.FixtureRequest) -> None:
    """The collectives codecs.py calls, on a real Manager's configured process group (a world of one); after
    ``abort()`` and a failed commit, the next quorum gives the group a working process group again."""
    from torch.distributed.distributed_c10d import AllgatherOptions, AllToAllOptions

    def collectives_work(pg: Any) -> bool:
        sent, received = torch.arange(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)
        pg.alltoall_base(received, sent, [4], [4], AllToAllOptions()).wait()
        gathered = torch.zeros(4, dtype=torch.uint8)
        pg.allgather_into_tensor_coalesced([gathered], [sent], AllgatherOptions()).wait()
        return torch.equal(received, sent) and torch.equal(gathered, sent)

    with lighthouse() as url, manager(url) as m:
        m.start_quorum()
        pg = m._pg
        assert pg.size() == 1, f"a one-group quorum's process group has size {pg.size()}"
        assert collectives_work(pg)
        m.report_error(RuntimeError("a collective failed"))
        pg.abort()
        assert not m.should_commit()
        m.start_quorum()
        m.wait_quorum()
        assert collectives_work(m._pg), "the quorum after a failed commit no longer reconfigures an aborted group"


@checks("torchft.local_sgd.DiLoCo._fragments[i].original_parameters / .restore_parameters()")
def _torchft_diloco_fragments(request: pytest.FixtureRequest) -> None:
    """Through our wrapper, which is what reads and writes them."""
    from torchx_diloco.torchft_diloco import TorchftDiLoCo

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with lighthouse() as url, manager(url) as m:
        wrapped = TorchftDiLoCo(
            m,
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.optim.SGD(model.parameters(), lr=0.7),
            sync_every=2,
        )
        pairs = zip(wrapped.global_weights(), model.parameters(), strict=True)
        assert [torch.equal(g, p) for g, p in pairs] == [True, True]
        target = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters()}
        state = wrapped.state_dict()
        assert set(state["global_weights"]) == set(target), sorted(state["global_weights"])
        wrapped.load_state_dict({**state, "global_weights": target})
        assert all(torch.equal(p, target[n]) for n, p in model.named_parameters()), "restore_parameters()"
        wrapped._impl.__exit__(None, None, None)


# --- torch.distributed.checkpoint (DCP) ---------------------------------------------------------------------
def _dcp_round_trip(folder: str) -> tuple:
    """A part saved and loaded through checkpoint/dcp.py (which subclasses the members below), one process: a
    tensor and nested non-tensor values (what an optimizer's hyper-parameters are). -> (digests, loaded target)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from torchx_diloco.checkpoint import dcp as ours

    state = {"w": torch.arange(6.0).reshape(2, 3), "opt": {"lr": 0.25, "name": "adamw"}}
    target = {"w": torch.zeros(2, 3), "opt": {"lr": 0.0, "name": ""}}
    try:
        digests = ours.save_sharded(folder, state)
        ours.verify_sharded(folder, digests)
        ours.load_sharded(folder, target)
    except CheckpointException as e:  # a BaseException: reported as an assertion, with DCP's first line
        raise AssertionError(f"DCP failed: {str(e).splitlines()[0]}") from None
    return digests, target


@checks("torch.distributed.checkpoint._fsspec_filesystem (FileSystem, FsspecReader, FsspecWriter)")
def _dcp_fsspec_classes(request: pytest.FixtureRequest) -> None:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
    from torch.distributed.checkpoint.filesystem import FileSystemBase

    assert issubclass(FsspecReader, FileSystemReader) and issubclass(FsspecWriter, FileSystemWriter)
    assert issubclass(FileSystem, FileSystemBase)
    _, target = _dcp_round_trip(str(request.getfixturevalue("tmp_path") / "part"))
    assert torch.equal(target["w"], torch.arange(6.0).reshape(2, 3)), target


@checks("torch.distributed.checkpoint._traverse.set_element")
def _dcp_set_element(request: pytest.FixtureRequest) -> None:
    from torch.distributed.checkpoint._traverse import set_element

    root: dict = {"opt": {"lr": 0.0}}
    set_element(root, ("opt", "lr"), 0.25)
    set_element(root, ("groups", 0, "lr"), 1.0)  # missing containers are made: a dict for a str key, a list for int
    assert root == {"opt": {"lr": 0.25}, "groups": [{"lr": 1.0}]}, root
    _, target = _dcp_round_trip(str(request.getfixturevalue("tmp_path") / "part"))
    assert target["opt"] == {"lr": 0.25, "name": "adamw"}, f"non-tensor values not put back: {target}"


@checks("FsspecReader.read_metadata (overridden: ._get_metadata_path, .fs.create_stream, .load_id)")
def _dcp_read_metadata(request: pytest.FixtureRequest) -> None:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    from torchx_diloco.checkpoint import dcp as ours

    folder = str(request.getfixturevalue("tmp_path") / "part")
    _dcp_round_trip(folder)
    assert "rank" in inspect.signature(FsspecReader._get_metadata_path).parameters
    reader = FsspecReader(folder)
    assert isinstance(reader.load_id, str) and reader.load_id, reader.load_id
    path = reader._get_metadata_path()
    with reader.fs.create_stream(path, "rb") as f:
        meta = ours.safe_load_metadata(f.read())
    assert {"w", "opt.lr", "opt.name"} <= set(meta.state_dict_metadata), meta.state_dict_metadata
    assert ours.saved_keys(folder) == set(meta.state_dict_metadata)  # our read_metadata reads the same file


@checks("DefaultLoadPlanner.load_bytes (overridden: .flatten_state_dict, .mappings, .original_state_dict, .state_dict)")
def _dcp_load_bytes(request: pytest.FixtureRequest) -> None:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    assert list(inspect.signature(DefaultLoadPlanner.load_bytes).parameters) == ["self", "read_item", "value"]
    planner, nested = DefaultLoadPlanner(), {"w": torch.zeros(1), "opt": {"lr": 0.0}}
    planner.set_up_planner(nested, None, is_coordinator=True)
    assert planner.flatten_state_dict is True and planner.original_state_dict is nested
    assert planner.mappings["opt.lr"] == ("opt", "lr") and "opt.lr" in planner.state_dict, planner.mappings
    _, target = _dcp_round_trip(str(request.getfixturevalue("tmp_path") / "part"))  # DCP calls our load_bytes
    assert target["opt"] == {"lr": 0.25, "name": "adamw"}, f"non-tensor values not loaded: {target}"


@checks("FileSystem.create_stream / rename / init_path, .fs (overridden)")
def _dcp_file_system(request: pytest.FixtureRequest) -> None:
    import hashlib

    import fsspec
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem

    tmp = request.getfixturevalue("tmp_path")
    fs = FileSystem()
    root = fs.init_path(str(tmp / "plain"))
    assert isinstance(fs.fs, fsspec.AbstractFileSystem), fs.fs
    fs.mkdir(root)
    with fs.create_stream(fs.concat_path(root, "a.tmp"), "wb") as stream:
        stream.write(b"x")
    fs.rename(fs.concat_path(root, "a.tmp"), fs.concat_path(root, "a"))
    assert (tmp / "plain" / "a").read_bytes() == b"x" and not (tmp / "plain" / "a.tmp").exists()
    # DCP writes every file through create_stream and renames .metadata into place: each one hashed, none missed
    digests, _ = _dcp_round_trip(str(tmp / "part"))
    on_disk = {p.name: p.read_bytes() for p in (tmp / "part").iterdir()}
    assert ".metadata" in digests and set(digests) == set(on_disk), (sorted(digests), sorted(on_disk))
    for name, data in on_disk.items():
        assert digests[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


@checks("FsspecWriter.fs / .path (replaced)")
def _dcp_writer_fs(request: pytest.FixtureRequest) -> None:
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter

    tmp = request.getfixturevalue("tmp_path")
    writer = FsspecWriter(str(tmp / "w"), sync_files=False)
    assert isinstance(writer.fs, FileSystem) and str(writer.path) == str(writer.fs.init_path(str(tmp / "w")))
    digests, _ = _dcp_round_trip(str(tmp / "part"))
    assert digests, "DCP no longer writes through the writer's .fs: nothing was hashed"


# --- fsspec ------------------------------------------------------------------------------------------------
@checks("fsspec AbstractFileSystem._parent")
def _fsspec_parent(request: pytest.FixtureRequest) -> None:
    """Local, memory and S3 (the moto server): the folder of a file and of a glob, in each one's own spelling."""
    import fsspec

    tmp = request.getfixturevalue("tmp_path")
    local, path = fsspec.core.url_to_fs(str(tmp / "metrics" / "replica_group_0.jsonl"))
    assert local._parent(path) == str(tmp / "metrics")
    memory = fsspec.filesystem("memory")
    assert memory._parent("/run/metrics/replica_group_0.jsonl") == "/run/metrics"
    s3, root = fsspec.core.url_to_fs(request.getfixturevalue("s3_url"))
    assert s3._parent(f"{root}/step_*/global.pt") == f"{root}/step_*"
    file = f"{root}/metrics/replica_group_0.jsonl"
    s3.makedirs(s3._parent(file), exist_ok=True)  # as metrics.py
    assert s3.glob(f"{root}/step_*/MANIFEST") == []  # the listing is now cached
    other, _ = fsspec.core.url_to_fs(request.getfixturevalue("s3_url"), skip_instance_cache=True)
    other.pipe_file(f"{root}/step_00000001/MANIFEST", b"{}")  # another writer: a peer group
    s3.invalidate_cache(s3._parent(f"{root}/step_*/MANIFEST"))  # as store.py, before a glob
    assert s3.glob(f"{root}/step_*/MANIFEST") == [f"{root}/step_00000001/MANIFEST"]


# --- TorchX ------------------------------------------------------------------------------------------------
@checks("torchx.specs.file_linter.TorchXArgumentHelpFormatter._get_help_string")
def _help_formatter(request: pytest.FixtureRequest) -> None:
    import argparse

    from torchx.specs import file_linter

    import torchx_diloco_components.diloco  # noqa: F401 - patches the formatter on import

    parser = argparse.ArgumentParser(formatter_class=file_linter.TorchXArgumentHelpFormatter)
    parser.add_argument("script_args", type=str, nargs=argparse.REMAINDER, help="flags after --")
    parser.add_argument("--n", type=int, default=2, help="a number")
    text = parser.format_help()
    assert "flags after --" in text and "(required)" not in text, text
    assert "(default: 2)" in text, "the formatter no longer adds defaults: our patch may hide a changed API"


@checks("torchx.specs.builders._create_args_parser")
def _component_args_parser(request: pytest.FixtureRequest) -> None:
    """Our wrapper is what `torchx run`'s parse_args builds its parser with; TorchX's own components keep theirs."""
    import argparse

    from torchx.components.utils import echo
    from torchx.specs import builders

    from torchx_diloco_components import diloco as comp  # wraps the parser builder on import

    parser = builders._create_args_parser(comp.diloco, None, None)
    assert isinstance(parser, argparse.ArgumentParser) and parser.allow_abbrev is False
    with pytest.raises(comp.ComponentError, match="did you mean --outer_steps"):
        builders.parse_args(comp.diloco, ["--outer_step", "3"])
    assert builders.parse_args(comp.diloco, ["--outer_steps", "3"]).outer_steps == 3
    assert builders._create_args_parser(echo).allow_abbrev, "a component of another package was changed"


@checks("torchx.runner.config.DEFAULT_CONFIG_DIRS")
def _config_dirs(request: pytest.FixtureRequest) -> None:
    """Still the list find_configs searches when given no directories: [$HOME, the working directory at import]."""
    import os
    from pathlib import Path

    from torchx.runner import config

    assert config.DEFAULT_CONFIG_DIRS == [str(Path.home()), os.getcwd()], config.DEFAULT_CONFIG_DIRS
    tmp = request.getfixturevalue("tmp_path")
    (tmp / ".torchxconfig").write_text("[local_cwd]\n")
    saved, config.DEFAULT_CONFIG_DIRS = config.DEFAULT_CONFIG_DIRS, [str(tmp)]
    try:
        assert config.find_configs() == [str(tmp / ".torchxconfig")], "find_configs no longer reads the list"
    finally:
        config.DEFAULT_CONFIG_DIRS = saved


@checks("torchx.schedulers.slurm_scheduler._save_job_dir / _get_job_dirs")
def _job_dirs(request: pytest.FixtureRequest) -> None:
    from torchx.schedulers import slurm_scheduler as upstream

    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))  # they use the cwd
    assert upstream._get_job_dirs() == {}
    upstream._save_job_dir("4242", "/scratch/run")
    assert upstream._get_job_dirs()["4242"] == "/scratch/run"


@checks("torchx.schedulers.slurm_scheduler.SlurmScheduler._squeue_pending_hostname")
def _pending_hostname(request: pytest.FixtureRequest) -> None:
    from torchx.schedulers.slurm_scheduler import SlurmScheduler

    f = SlurmScheduler._squeue_pending_hostname  # called on the class: it must stay a staticmethod
    assert f({"nodes": "dlnode1"}, None) == "dlnode1"  # no job_resources (22.05, 24.11.5+)
    assert f({}, {"scheduled_nodes": "dlnode2"}) == "dlnode2"
    assert f({}, {"nodes": {"list": "dlnode3"}}) == "dlnode3"


@checks("torchx.schedulers.slurm_scheduler.SlurmScheduler._squeue_allocated_nodes")
def _allocated_nodes(request: pytest.FixtureRequest) -> None:
    from torchx.schedulers.slurm_scheduler import SlurmScheduler

    f = SlurmScheduler._squeue_allocated_nodes
    legacy = f({"allocated_nodes": [{"nodename": "dlnode1", "cpus_used": 2, "memory_allocated": 1024}]})
    assert [(h, r.cpu) for h, r in legacy] == [("dlnode1", 2)]
    new = f({"nodes": {"allocation": [{"name": "dlnode2", "cpus": {"used": 4}, "memory": {"allocated": 2048}}]}})
    assert [(h, r.cpu) for h, r in new] == [("dlnode2", 4)]
    assert f({"nodes": {"list": "dlnode3"}}) == [("dlnode3", None)]


@checks("torchx.schedulers.slurm_scheduler.SlurmScheduler._describe_sacct")
def _describe_sacct(request: pytest.FixtureRequest) -> None:
    from torchx.schedulers.slurm_scheduler import SlurmScheduler

    assert list(inspect.signature(SlurmScheduler._describe_sacct).parameters) == ["self", "app_id"]
    request.getfixturevalue("monkeypatch").setenv("PATH", str(request.getfixturevalue("tmp_path")))  # no sacct
    try:
        found = SlurmScheduler("test")._describe_sacct("4242")
    except FileNotFoundError:
        return
    assert found is None, found


@checks(
    "torchft.checkpointing.http_transport: its request handler, a BaseHTTPRequestHandler subclass defined in "
    "torchft that keeps the standard library's log_request"
)
def _torchft_http_handler(request: pytest.FixtureRequest) -> None:
    """The module defines its handler (tests/test_logs.py moves a real checkpoint through it) and overrides
    neither log_request nor log_message, which logs.py relies on to take the access line."""
    import torchft.checkpointing.http_transport as transport

    source = inspect.getsource(transport)
    assert "BaseHTTPRequestHandler" in source, "torchft's checkpoint server no longer uses http.server"
    assert "def log_request" not in source and "def log_message" not in source, "torchft logs requests itself now"


@checks(
    "torchx.schedulers.local_scheduler.LocalScheduler._submit_dryrun and PopenRequest's app_id, log_dir, "
    "role_log_dirs, role_params[role][i].env/.args"
)
def _local_scheduler_request(request: pytest.FixtureRequest) -> None:
    """A real dry run through our local_cwd scheduler: the request has the fields local.py reads."""
    from torchx.schedulers.local_scheduler import LocalScheduler, PopenRequest

    from torchx_diloco.local import create_scheduler
    from torchx_diloco_components.diloco import diloco

    assert "_submit_dryrun" in vars(LocalScheduler), "LocalScheduler._submit_dryrun is gone"
    folder = request.getfixturevalue("tmp_path")
    scheduler = create_scheduler("test")
    info = scheduler.submit_dryrun(diloco(checkpoint_dir=str(folder / "ckpt")), {"log_dir": str(folder)})
    req = info.request
    assert isinstance(req, PopenRequest) and req.app_id and req.log_dir
    assert set(req.role_log_dirs) == set(req.role_params) >= {"lighthouse", "replica_group_0"}
    replica = req.role_params["replica_group_0"][0]
    assert isinstance(replica.env, dict) and all(isinstance(a, str) for a in replica.args)


# --- the table and the checks ------------------------------------------------------------------------------
def test_every_listed_member_has_a_check_and_every_check_is_listed() -> None:
    listed = {u.name for u in PRIVATE_USES}
    assert listed - set(CHECKS) == set(), "listed in torchx_diloco/upstream.py without a check here"
    assert set(CHECKS) - listed == set(), "checked here but not listed in torchx_diloco/upstream.py"


@pytest.mark.parametrize("use", PRIVATE_USES, ids=[u.name.split(" ")[0] for u in PRIVATE_USES])
def test_private_member_still_has_the_shape_we_rely_on(use: PrivateUse, request: pytest.FixtureRequest) -> None:
    check = CHECKS.get(use.name)
    if check is None:
        pytest.fail(f"{use.name}: no check in tests/test_upstream.py")
    try:
        check(request)
    except Exception as e:  # noqa: BLE001 - any failure, assertion or missing attribute, gets the same report
        public = f"; public replacement: {use.public}" if use.public else ""
        pytest.fail(
            f"{use.name} is gone or changed upstream ({type(e).__name__}: {e}); we use it to {use.why} "
            f"(in {', '.join(use.where)}){public}"
        )

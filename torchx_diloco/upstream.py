"""Every private part of torchft, TorchX, torch and fsspec this project relies on, listed once.

Upstream may rename or drop an underscore member (or reword an HTML page) in any release, nightly or not;
``tests/test_upstream.py`` checks each entry against the installed versions, with the real objects, and fails
naming the member and what we use it for. When one breaks: fix the files in ``where``, then this entry.
Use a public API instead where ``public`` names one.

Plain data: importing this module imports neither torch nor torchft. In the DCP entries, FileSystem, FsspecReader
and FsspecWriter are the classes of ``torch.distributed.checkpoint._fsspec_filesystem`` (the first entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class PrivateUse:
    """One upstream member outside the public API that we depend on."""

    name: str  # as upstream spells it
    why: str  # what we use it for (completes "we use it to ...")
    where: Tuple[str, ...]  # the files that use it
    public: str = ""  # the public replacement, where one exists


PRIVATE_USES: Tuple[PrivateUse, ...] = (
    # --- torchft -------------------------------------------------------------------------------------------
    PrivateUse(
        "torchft lighthouse GET /status (HTML: '<replica_id>:<uuid>: seen <s>s ago')",
        "see which groups heartbeated recently (cluster._HEARTBEAT, live_replicas: the start-up wait for all "
        "groups, the lighthouse's idle exit, the run id a lighthouse shows and the fatal report of a group, both "
        "heartbeats under reserved ids without the uuid) and that the lighthouse answers",
        (
            "torchx_diloco/cluster.py",
            "torchx_diloco/lighthouse.py",
            "torchx_diloco/_fleet/testing.py",
        ),
    ),
    PrivateUse(
        "torchft.Manager._use_async_quorum",
        "refuse a Manager built with use_async_quorum=True (a healing group must hold the healed weights "
        "before its first inner step)",
        ("torchx_diloco/diloco.py",),
    ),
    PrivateUse(
        "torchft.Manager._quorum_future",
        "forget a failed quorum so the next start_quorum() asks the lighthouse again (torchft re-raises the "
        "stored failure otherwise): a sync retries while the lighthouse restarts",
        ("torchx_diloco/cluster.py",),
    ),
    PrivateUse(
        "torchft.Manager._pg (.size(), .alltoall_base, .allgather_into_tensor_coalesced, .abort())",
        "send low-bit pseudo-gradients as a reduce-scatter (all-to-all) then an all-gather through the "
        "manager's reconfigurable process group (torchft's own quantized path needs Triton and CUDA); close it "
        "after a failed collective so the peers waiting on this member fail at once (the next quorum reconfigures it)",
        ("torchx_diloco/codecs.py",),
    ),
    PrivateUse(
        "torchft.local_sgd.DiLoCo._fragments[i].original_parameters / .restore_parameters()",
        "read and load torchft DiLoCo's global weights, fragment by fragment (--impl torchft: checkpoints, "
        "the equivalence test, the benchmark against torchft)",
        ("torchx_diloco/torchft_diloco.py",),
    ),
    # --- torch.distributed.checkpoint (DCP) -----------------------------------------------------------------
    PrivateUse(
        "torch.distributed.checkpoint._fsspec_filesystem (FileSystem, FsspecReader, FsspecWriter)",
        "write and read sharded checkpoint parts on any fsspec URL (s3://, gs://, local), DCP's own fsspec storage; "
        "we subclass all three",
        ("torchx_diloco/checkpoint/dcp.py",),
        public="torch.distributed.checkpoint.FileSystemReader/FileSystemWriter (local paths only)",
    ),
    PrivateUse(
        "torch.distributed.checkpoint._traverse.set_element",
        "put a non-tensor value (an optimizer hyper-parameter) back into the nested state dict after loading it "
        "with weights_only=True, as DefaultLoadPlanner.load_bytes does",
        ("torchx_diloco/checkpoint/dcp.py",),
    ),
    PrivateUse(
        "FsspecReader.read_metadata (overridden: ._get_metadata_path, .fs.create_stream, .load_id)",
        "read a part's .metadata pickle with an unpickler that allows only DCP's metadata classes (a crafted "
        "checkpoint cannot run code), stamped with the reader's load id as DCP's own read_metadata does",
        ("torchx_diloco/checkpoint/dcp.py",),
    ),
    PrivateUse(
        "DefaultLoadPlanner.load_bytes (overridden: .flatten_state_dict, .mappings, .original_state_dict, .state_dict)",
        "load the non-tensor values of a part with torch.load(weights_only=True) and put them where DCP's "
        "planner would (its flattened keys mapped back to the nested state dict)",
        ("torchx_diloco/checkpoint/dcp.py",),
    ),
    PrivateUse(
        "FileSystem.create_stream / rename / init_path, .fs (overridden)",
        "hash every file DCP writes as it writes it (sizes and sha256 for the manifest), follow .metadata's "
        "rename, and send each file to an object store in one PUT",
        ("torchx_diloco/checkpoint/dcp.py",),
    ),
    PrivateUse(
        "FsspecWriter.fs / .path (replaced)",
        "give DCP's writer our hashing FileSystem for the folder it writes",
        ("torchx_diloco/checkpoint/dcp.py",),
    ),
    # --- fsspec ----------------------------------------------------------------------------------------------
    PrivateUse(
        "fsspec AbstractFileSystem._parent",
        "the parent folder of a path in the file system's own spelling (a bucket key, a local path, a glob): "
        "invalidate a listing cache before a glob, create the metrics file's folder",
        ("torchx_diloco/checkpoint/store.py", "torchx_diloco/metrics.py"),
    ),
    PrivateUse(
        "torchft.checkpointing.http_transport: its request handler, a BaseHTTPRequestHandler subclass defined in "
        "torchft that keeps the standard library's log_request",
        "route the access line torchft's checkpoint server writes per heal to logging at DEBUG (logs.py replaces "
        "BaseHTTPRequestHandler.log_request for handler classes of torchft modules)",
        ("torchx_diloco/logs.py",),
    ),
    # --- TorchX --------------------------------------------------------------------------------------------
    PrivateUse(
        "torchx.schedulers.local_scheduler.LocalScheduler._submit_dryrun and PopenRequest's app_id, log_dir, "
        "role_log_dirs, role_params[role][i].env/.args",
        "refuse on local_cwd what it cannot run (GPUs, several nodes) and default log_dir before TorchX builds the "
        "request; name the failed group's log, its one-line error and the checkpoint folder to resume from",
        ("torchx_diloco/local.py",),
    ),
    PrivateUse(
        "torchx.specs.file_linter.TorchXArgumentHelpFormatter._get_help_string",
        'stop `torchx run diloco.diloco --help` from marking the optional *script_args "(required)"',
        ("components/_roles.py",),
    ),
    PrivateUse(
        "torchx.specs.builders._create_args_parser",
        "parse our components' flags strictly: no abbreviations (`--outer_step 3` is refused, not taken for "
        "--outer_steps) and one-line errors; we wrap it, and torchx run reaches it through builders.parse_args",
        ("components/_roles.py",),
    ),
    PrivateUse(
        "torchx.runner.config.DEFAULT_CONFIG_DIRS",
        "the tests' torchx calls are forked from an interpreter that imported TorchX elsewhere: the child sets the "
        "directories TorchX reads .torchxconfig from ([$HOME, cwd], computed at import) to its own",
        ("torchx_diloco/_fleet/zygote.py",),
    ),
    PrivateUse(
        "torchx.schedulers.slurm_scheduler._save_job_dir / _get_job_dirs",
        "note a Slurm job's directory at submission where upstream's own log reader finds it (torchx log)",
        ("torchx_diloco/slurm.py",),
    ),
    PrivateUse(
        "torchx.schedulers.slurm_scheduler.SlurmScheduler._squeue_pending_hostname",
        "read the host of a pending job from every squeue --json shape (torchx status on Slurm 22.05..24.11)",
        ("torchx_diloco/slurm.py",),
    ),
    PrivateUse(
        "torchx.schedulers.slurm_scheduler.SlurmScheduler._squeue_allocated_nodes",
        "read the hosts and resources of a running job from every squeue --json shape (torchx status)",
        ("torchx_diloco/slurm.py",),
    ),
    PrivateUse(
        "torchx.schedulers.slurm_scheduler.SlurmScheduler._describe_sacct",
        "describe a job squeue has forgotten; we catch FileNotFoundError where sacct is not installed",
        ("torchx_diloco/slurm.py",),
    ),
)

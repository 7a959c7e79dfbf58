"""Sharded checkpoint parts through torch.distributed.checkpoint (DCP) on fsspec URLs.

A group of several ranks (ddp or fsdp) writes each part of a step as a DCP folder: every rank writes its own
shard (DCP spreads replicated tensors over the ranks), hashing each file as it writes it; rank 0 gathers the
sizes and checksums and the caller's manifest is written LAST (see ``CheckpointStore.write_sharded_part``).

Loading reshards: the target state's tensors/DTensors give the layout, so a part written by 2 FSDP ranks loads into
one plain rank, or 2 DDP ranks into FSDP. Nothing loaded can run code: DCP's ``.metadata`` (a pickle) is read with
an unpickler that allows only DCP's metadata dataclasses and a few builtins, tensors are read with
``weights_only=True`` by DCP itself, and the few non-tensor values (optimizer hyper-parameters) are too.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import os
import pickle
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Generator, Mapping, Optional, Set, Tuple

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from torchx_diloco.checkpoint._io import CorruptCheckpoint, HashingStream, is_local
from torchx_diloco.fragment import grads_set_aside

if TYPE_CHECKING:
    from torchx_diloco.outer_loop import OuterLoop

FileDigests = Dict[str, Dict[str, Any]]  # file name (relative to the part's folder) -> {"bytes", "sha256"}

_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.",
    "torch.distributed._shard.",
)
_ALLOWED = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "float32"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("torch", "float64"),
    ("torch", "int64"),
    ("torch", "int32"),
    ("torch", "int8"),
    ("torch", "uint8"),
    ("torch", "bool"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("torch", "preserve_format"),
    ("torch", "channels_last"),
    ("torch", "sparse_coo"),
    ("torch", "device"),
    ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"),  # looks a name up among torch's layouts, nothing else
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata dataclasses/enums and torch basics: a crafted .metadata cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module.startswith(_ALLOWED_MODULES):
            found = super().find_class(module, name)
            # only data: dataclasses and enums (building one runs no user code); never a function or a writer
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def safe_load_metadata(data: bytes) -> Metadata:
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any unpickling error means refuse
        raise CorruptCheckpoint(f"checkpoint metadata refused by the safe loader ({e})") from e
    if not isinstance(meta, Metadata):
        raise CorruptCheckpoint(f"checkpoint metadata is a {type(meta).__name__}, not DCP Metadata")
    return meta


class _SafeReader(FsspecReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            meta = safe_load_metadata(f.read())
        storage_meta = getattr(meta, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        meta.storage_meta = storage_meta
        return meta


class _SafePlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor values (optimizer hyper-parameters) are unpickled with ``weights_only``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors have many types; all mean "refuse"
            raise CorruptCheckpoint(f"a checkpoint value refused by the safe loader ({str(e).splitlines()[0]})") from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _Buffer(io.BytesIO):
    """Kept open when DCP closes its stream: its bytes are sent after."""

    def close(self) -> None:
        pass


class _HashingFileSystem(FileSystem):
    """DCP's fsspec file system, recording each written file's size and sha256 as it is written."""

    def __init__(self, digests: FileDigests) -> None:
        super().__init__()
        self.digests = digests

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        if is_local(self.fs):
            with super().create_stream(path, mode) as stream:
                hashing = HashingStream(stream)
                yield hashing
        else:  # an object store: one PUT of the whole file beats a multipart upload of a streamed one
            buf = _Buffer()
            hashing = HashingStream(buf)
            yield hashing
            assert self.fs is not None
            self.fs.pipe_file(os.fspath(path), buf.getvalue())
        self.digests[os.path.basename(os.fspath(path))] = {"bytes": hashing.bytes, "sha256": hashing.hexdigest()}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:  # .metadata is renamed last
        super().rename(path, new_path)
        old = self.digests.pop(os.path.basename(os.fspath(path)), None)
        if old is not None:
            self.digests[os.path.basename(os.fspath(new_path))] = old


class _HashingWriter(FsspecWriter):
    def __init__(self, url: str) -> None:
        super().__init__(url, sync_files=False)
        self.digests: FileDigests = {}
        self.fs = _HashingFileSystem(self.digests)  # type: ignore[assignment]
        self.path = self.fs.init_path(url)


@contextmanager
def _one_process_is_meant(pg: Optional[dist.ProcessGroup]) -> Generator[None, None, None]:
    """A one-rank group saves and loads without a process group: DCP warns that it assumes so, at every step."""
    with warnings.catch_warnings():
        if pg is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rank(pg: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(pg) if pg is not None else 0


def save_sharded(url: str, state: Dict[str, Any], pg: Optional[dist.ProcessGroup] = None) -> Optional[FileDigests]:
    """Every rank of ``pg`` (a collective; ``None``: this process alone) writes its shard of ``state`` into the
    folder ``url``. Returns, on rank 0 only, every file written (all ranks') with its size and sha256."""
    writer = _HashingWriter(url)
    with _one_process_is_meant(pg):
        dcp.save(state, storage_writer=writer, process_group=pg, no_dist=pg is None)
    if pg is None:
        return dict(writer.digests)
    gathered: list = [None] * dist.get_world_size(pg) if _rank(pg) == 0 else []
    dist.gather_object(dict(writer.digests), gathered if _rank(pg) == 0 else None, group=pg, group_dst=0)
    if _rank(pg) != 0:
        return None
    return {name: entry for digests in gathered for name, entry in digests.items()}


def verify_sharded(url: str, files: FileDigests) -> None:
    """Sizes and checksums of every file of the part against its manifest (CorruptCheckpoint if not)."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if ".metadata" not in files:
        raise CorruptCheckpoint(f"{root}: the manifest lists no .metadata")
    try:
        for name, entry in files.items():
            data = fs.cat_file(f"{root}/{name}")
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CorruptCheckpoint(f"{root}/{name} does not match its manifest")
    except FileNotFoundError as e:
        raise CorruptCheckpoint(f"{root}: missing ({e})") from e
    except (KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(f"{root}: malformed manifest ({e})") from e


def load_sharded(url: str, state: Dict[str, Any], pg: Optional[dist.ProcessGroup] = None) -> None:
    """Every rank of ``pg``: load the folder ``url`` in place into ``state`` (its layout decides the resharding).
    Verify first (:func:`verify_sharded`): this only refuses what is unsafe to unpickle."""
    try:
        with _one_process_is_meant(pg):
            dcp.load(
                state, storage_reader=_SafeReader(url), planner=_SafePlanner(), process_group=pg, no_dist=pg is None
            )
    except CorruptCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - DCP wraps a rank's error in its own types
        if "CorruptCheckpoint" in str(e) or "safe loader" in str(e):
            raise CorruptCheckpoint(str(e).splitlines()[0]) from e
        raise


def saved_keys(url: str) -> Set[str]:
    """The (flattened) keys the DCP folder ``url`` holds, from its metadata (read safely)."""
    return set(saved_sizes(url))


def saved_sizes(url: str) -> Dict[str, Optional[Tuple[int, ...]]]:
    """The (flattened) keys the DCP folder ``url`` holds with each tensor's size (None: not a tensor)."""
    sizes: Dict[str, Optional[Tuple[int, ...]]] = {}
    for key, entry in _SafeReader(url).read_metadata().state_dict_metadata.items():
        size = getattr(entry, "size", None)  # a TensorStorageMetadata's; bytes have none
        sizes[key] = tuple(size) if size is not None else None
    return sizes


# --- what DiLoCo's global state looks like to DCP ------------------------------------------------------------
def global_state_dict(outer: "OuterLoop", model: torch.nn.Module) -> Dict[str, Any]:
    """The global state for DCP: each rank's global weights as DTensors where the model is sharded (plain tensors
    otherwise) and the outer optimizers keyed by parameter name, so a checkpoint written by one layout (ranks per
    group, ddp or fsdp) loads into another. Loading in place into this very dict, then
    :func:`load_global_state_dict`, restores it. Its tensors are references: the writer is done with them before
    the next sync changes them."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    weights = {
        name: (
            DTensor.from_local(backup, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            if isinstance(p, DTensor)
            else backup
        )
        for name, p, backup in outer.global_tensors()
    }
    with grads_set_aside([p for _, p, _ in outer.global_tensors()]):  # an optimizer without state gets zeros
        optimizers = get_optimizer_state_dict(model, outer.outer_optimizers)
    return {"global_weights": weights, "outer_optimizer": optimizers}


def load_global_state_dict(outer: "OuterLoop", model: torch.nn.Module, state: Dict[str, Any], newer: bool) -> None:
    """Adopt a :func:`global_state_dict` that DCP loaded in place: reset the model to it (``newer``: a step newer
    than this group's progress, whose inner steps then count for nothing)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    with torch.no_grad():
        for name, _, backup in outer.global_tensors():
            loaded = state["global_weights"][name]
            loaded = loaded.to_local() if hasattr(loaded, "to_local") else loaded
            if loaded.data_ptr() != backup.data_ptr():
                backup.copy_(loaded)
    with grads_set_aside([p for _, p, _ in outer.global_tensors()]):
        set_optimizer_state_dict(model, outer.outer_optimizers, state["outer_optimizer"])
    outer.reset_to_global(newer)


def group_state_dict(
    model: torch.nn.Module,
    inner: torch.optim.Optimizer,
    rank: int,
    local_weights: bool,
    saved: Optional[Mapping[str, Optional[Tuple[int, ...]]]] = None,
    rank_state: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, Any]:
    """A group's own state for DCP: the inner optimizer (keyed by parameter name: any layout loads it), this
    rank's RNG and its ``rank_state`` (error feedback's residuals, eager outer steps' state) under keys of their
    own (a value every rank holds under one key is saved once, for one rank), and the local weights when they
    differ from the global ones. To load: ``saved``, what the part holds (:func:`saved_sizes`: a rank the part has
    no RNG for keeps its own; a part written before format 3 holds one ``rng`` for all; rank state it lacks, or of
    another size, is left out)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: Dict[str, Any] = {"inner_optimizer": get_optimizer_state_dict(model, inner)}
    if saved is None or rng_key(rank) in saved:
        state[rng_key(rank)] = torch.get_rng_state()
    elif "rng" in saved:
        state["rng"] = torch.get_rng_state()
    if local_weights:
        state["local_weights"] = get_model_state_dict(model)
    kept = {
        name: t
        for name, t in (rank_state or {}).items()
        if saved is None or saved.get(f"{rank_state_key(rank)}.{name}") == tuple(t.shape)
    }
    if kept:
        state[rank_state_key(rank)] = dict(kept)
    return state


def rng_key(rank: int) -> str:
    return f"rng_rank_{rank}"


def rank_state_key(rank: int) -> str:
    return f"rank_state_{rank}"


def load_group_state_dict(model: torch.nn.Module, inner: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Adopt a :func:`group_state_dict` that DCP loaded in place (its RNG key only if that rank's was saved)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_optimizer_state_dict(model, inner, state["inner_optimizer"])
    if "local_weights" in state:
        set_model_state_dict(model, state["local_weights"])
    for key, value in state.items():
        if key == "rng" or key.startswith("rng_rank_"):
            torch.set_rng_state(value)

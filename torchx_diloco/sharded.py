"""Sharded checkpoint parts through torch.distributed.checkpoint (DCP) on fsspec URLs (work in progress).

Who calls what:
- ``save_sharded(url, state, pg)``: every rank of a group (a collective over ``pg``; ``pg=None`` for a single
  process). Each rank writes its own shard files with DCP's ``FsspecWriter``; after a barrier rank 0 lists the
  folder and writes ``MANIFEST.json`` (every file, its size and sha256, the format) LAST: the part exists only then.
- ``load_sharded(url, state, pg)``: every rank; verifies the manifest's sizes and checksums, then loads in place
  into ``state`` (its tensors/DTensors give the target layout, so DCP reshards 2 ranks <-> 1, FSDP <-> plain).
  DCP's ``.metadata`` is a pickle: it is read with an unpickler that allows only DCP's metadata classes and a
  few builtins, so a checkpoint from a shared bucket cannot run code.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import pickle
from typing import Any, Dict, Optional

import fsspec
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from torchx_diloco.checkpoint import CorruptCheckpoint

SHARDED_FORMAT = 2
MANIFEST = "MANIFEST.json"
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


def _rank(pg: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(pg) if pg is not None else 0


def save_sharded(url: str, state: Dict[str, Any], pg: Optional[dist.ProcessGroup] = None) -> None:
    """Every rank writes its shard; rank 0 writes the manifest last, after all ranks are done."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if _rank(pg) == 0 and fs.exists(f"{root}/{MANIFEST}"):
        fs.rm_file(f"{root}/{MANIFEST}")  # unpublish a rewritten part first
    if pg is not None:
        dist.barrier(group=pg)
    dcp.save(state, storage_writer=FsspecWriter(url, sync_files=False), process_group=pg, no_dist=pg is None)
    if pg is not None:
        dist.barrier(group=pg)
    if _rank(pg) == 0:
        fs.invalidate_cache(root)
        files = {}
        for path in sorted(fs.find(root)):
            name = path[len(root) + 1 :]
            if name == MANIFEST:
                continue
            data = fs.cat_file(path)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        body = json.dumps({"format": SHARDED_FORMAT, "layout": "dcp", "files": files}).encode()
        fs.pipe_file(f"{root}/{MANIFEST}", body)
    if pg is not None:
        dist.barrier(group=pg)


def verify_sharded(url: str) -> None:
    """Sizes and checksums of every file of the part against its manifest (CorruptCheckpoint if not)."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    try:
        manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
        files = manifest["files"]
        for name, entry in files.items():
            data = fs.cat_file(f"{root}/{name}")
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CorruptCheckpoint(f"{root}/{name} does not match its manifest")
    except FileNotFoundError as e:
        raise CorruptCheckpoint(f"{root}: missing ({e})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{root}: malformed manifest ({e})") from e


def load_sharded(url: str, state: Dict[str, Any], pg: Optional[dist.ProcessGroup] = None) -> None:
    """Every rank: verify, then load in place into ``state`` (its layout decides the resharding)."""
    verify_sharded(url)
    dcp.load(state, storage_reader=_SafeReader(url), process_group=pg, no_dist=pg is None)

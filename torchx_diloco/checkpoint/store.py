"""Durable backups of DiLoCo's global state on any fsspec URL (local path, memory://, s3://, gs://, ...).

Layout, one folder per committed outer step::

    <root>/step_00000005/global.pt               global weights, outer optimizer, step (one group writes it)
    <root>/step_00000005/replica_group_1.pt      that group's inner optimizer, data position, RNG
    <root>/step_00000005/MANIFEST.global.json    size and sha256 of global.pt, written after it
    <root>/step_00000005/MANIFEST.replica_group_1.json

A part exists only once its manifest does, and manifests are written last; the global manifest is written
after every group of the quorum has published its part, so a step with a global manifest is complete and a
crash at any instant leaves the previous complete step loadable. Loading checks sizes and checksums and unpickles with
``weights_only=True``: a checkpoint from a shared bucket cannot run code.

A group of several ranks writes its parts with torch.distributed.checkpoint instead (``write_sharded_part``: a
folder ``<part>/`` with each rank's shard, format 2): the manifest then lists every file with its size and sha256,
and carries the part's few plain values (step, data position, the model's fingerprint) as JSON. Such a part loads
into any number of ranks, ddp or fsdp (see :mod:`torchx_diloco.checkpoint.dcp`).

Every manifest carries a format version, stamped here (callers write no version of their own). A part of a newer
format (a newer torchx-diloco wrote it) stops the load with one line: skipping it as corrupt would resume
silently from an older step, and reading it as ours could misload it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional

import fsspec
import torch

from torchx_diloco.checkpoint._io import CorruptCheckpoint, HashingStream, is_local
from torchx_diloco.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when a manifest or a part changes in a way older readers would misread (3: per-rank RNG)
_TORCH_FORMAT = 1  # a part written by torch.save: what format 1 readers read (a sharded part is format 2)
_UNVERSIONED = 1  # the format of a manifest without a "format" field
GLOBAL_PART = "global"
_STEP_DIR = re.compile(r"step_(\d{8})$")
MIN_PART_WAIT_S = 10.0  # the least a global writer waits for its peers' parts of a step (see part_patience)


def part_patience(own_write_s: float) -> float:
    """How long the global writer waits for the quorum's other group parts, given how long its own part took:
    peers write theirs at the same time as ours, and one that died meanwhile never will."""
    return max(MIN_PART_WAIT_S, 5 * own_write_s)


def _by(run: Optional[str]) -> Dict[str, str]:
    """The manifest's record of the run that wrote the part (none for a store used outside a run)."""
    return {"run": run} if run is not None else {}


def group_part(group_id: int) -> str:
    return f"replica_group_{group_id}"


def check_format(folder: str, fmt: object) -> None:
    """Refuse what a newer torchx-diloco wrote (UserError: one line naming the fix); a nonsense version is corrupt."""
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise CorruptCheckpoint(f"{folder}: format {fmt!r} is not a version number")
    if fmt > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {folder} was written by format {fmt}; this torchx-diloco reads format "
            f"{FORMAT_VERSION}: upgrade torchx-diloco or use another --checkpoint-dir"
        )


@dataclass
class Checkpoint:
    """A verified step. For a sharded part (its name in ``sharded``) the state holds the manifest's plain values
    only; its tensors are loaded with :meth:`CheckpointStore.load_sharded_part` by every rank of the group."""

    step: int
    global_state: Dict[str, Any]
    group_state: Optional[Dict[str, Any]]  # None when this group wrote no part at that step
    sharded: FrozenSet[str] = frozenset()


class CheckpointStore:
    """Reads and writes step folders under one fsspec URL."""

    def __init__(self, url: str, keep: int = 3) -> None:
        if keep < 1:
            raise UserError(f"--keep-checkpoints must be >= 1, got {keep}")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as e:
            raise UserError(
                f"--checkpoint-dir {url!r} is not a usable fsspec URL ({e}); "
                "pass a local path or a URL like s3://bucket/run (install s3fs/gcsfs for those)"
            ) from e
        self.url = url
        self.root = self.root.rstrip("/")
        self.keep = keep

    def check_writable(self) -> None:
        """Fail now, with one line, rather than at the first outer step."""
        probe = f"{self.root}/.write-test-{uuid.uuid4().hex}"  # groups probe at the same time: one file each
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 - any storage error becomes one line for the user
            raise UserError(
                f"--checkpoint-dir {self.url!r} is not writable ({type(e).__name__}: {e}); "
                "pass a directory or bucket you can write to"
            ) from e

    def step_dir(self, step: int) -> str:
        return f"{self.root}/step_{step:08d}"

    # --- writing -------------------------------------------------------------------------------------------
    def write_part(self, step: int, part: str, payload: Dict[str, Any], run: Optional[str] = None) -> None:
        """Write one part of step ``step``; its manifest last, so a crash leaves no half part visible. ``run``:
        the run that wrote it, in the manifest (see :meth:`newest_published_step`)."""
        folder = self.step_dir(step)
        manifest = f"{folder}/MANIFEST.{part}.json"
        self.fs.makedirs(folder, exist_ok=True)
        if self.fs.exists(manifest):  # rewriting a step (after a resume): unpublish the old part first
            self.fs.rm_file(manifest)
        path = f"{folder}/{part}.pt"
        if is_local(self.fs):
            with self.fs.open(path, "wb") as f:
                stream = HashingStream(f)  # serialised straight into the file, checksummed on the way
                torch.save(payload, stream)
        else:  # an object store: one PUT of the whole part beats a multipart upload of a streamed one
            buf = io.BytesIO()
            stream = HashingStream(buf)
            torch.save(payload, stream)
            self.fs.pipe_file(path, buf.getvalue())
        entry = {"file": f"{part}.pt", "bytes": stream.bytes, "sha256": stream.hexdigest()}
        body = json.dumps({"format": _TORCH_FORMAT, "step": step, "part": part, **entry, **_by(run)}).encode()
        with self.fs.open(manifest, "wb") as f:
            f.write(body)

    def write_sharded_part(
        self,
        step: int,
        part: str,
        state: Dict[str, Any],
        values: Dict[str, Any],
        pg: Optional[Any],
        run: Optional[str] = None,
    ) -> None:
        """Every rank of ``pg`` writes its shard of ``state`` (DCP, hashed as written); rank 0 then writes the
        manifest, last: the files' sizes and checksums, ``values`` (JSON: the part's plain values), ``run``."""
        import torch.distributed as dist

        from torchx_diloco.checkpoint.dcp import save_sharded

        folder, leader = self.step_dir(step), pg is None or dist.get_rank(pg) == 0
        manifest = f"{folder}/MANIFEST.{part}.json"
        if leader:
            self.fs.makedirs(f"{folder}/{part}", exist_ok=True)
            if self.fs.exists(manifest):  # rewriting a step (after a resume): unpublish the old part first
                self.fs.rm_file(manifest)
        if pg is not None:
            dist.barrier(group=pg)
        files = save_sharded(f"{self._url_of(folder)}/{part}", state, pg)
        if leader:
            assert files is not None
            body = {"format": FORMAT_VERSION, "step": step, "part": part, "layout": "dcp", "folder": part, **_by(run)}
            body.update(files=files, values=values)
            with self.fs.open(manifest, "wb") as f:
                f.write(json.dumps(body).encode())

    def load_sharded_part(self, step: int, part: str, state: Dict[str, Any], pg: Optional[Any]) -> None:
        """Every rank of ``pg``: load ``part`` of ``step`` in place into ``state`` (its layout decides the
        resharding). The part was verified by whoever chose the step (:meth:`latest` on rank 0)."""
        from torchx_diloco.checkpoint.dcp import load_sharded

        load_sharded(self.sharded_url(step, part), state, pg)

    def sharded_url(self, step: int, part: str) -> str:
        """The DCP folder of a sharded part, as a URL DCP's fsspec reader opens."""
        return f"{self._url_of(self.step_dir(step))}/{part}"

    def _url_of(self, path: str) -> str:
        """``path`` (inside this store) as a URL DCP's fsspec reader and writer open."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if is_local(self.fs) else f"{protocol}://{path}"

    def wait_for_group_parts(
        self, step: int, count: int, timeout_s: float, stop: Optional[threading.Event] = None
    ) -> bool:
        """Wait until ``count`` groups have published their part of ``step`` (the global part goes last), for
        at most ``timeout_s``, or until ``stop`` is set (the training loop needs the writer: its next sync)."""
        if "memory" in self.fs.protocol:  # memory:// lives in one process: other groups' parts are elsewhere
            return True
        started = time.monotonic()
        pattern = f"{self.step_dir(step)}/MANIFEST.replica_group_*.json"
        while len(self._fresh_glob(pattern)) < count:
            if time.monotonic() > started + timeout_s or (stop is not None and stop.is_set()):
                logger.warning(
                    "step %d: only %d of %d group parts after %.1fs; publishing it without the rest",
                    step,
                    len(self._fresh_glob(pattern)),
                    count,
                    time.monotonic() - started,
                )
                return False
            time.sleep(0.05)
        return True

    def prune(self) -> None:
        """Keep the newest ``keep`` complete steps (a global manifest) and every folder newer than the oldest of
        them (steps being written); delete the folders older than that."""
        steps = self.steps()
        complete = [step for step in steps if self.has_part(step, GLOBAL_PART)]
        if len(complete) <= self.keep:
            return
        oldest_kept = complete[-self.keep]
        for step in steps:
            if step < oldest_kept:
                self.fs.rm(self.step_dir(step), recursive=True)

    # --- reading -------------------------------------------------------------------------------------------
    def _fresh_glob(self, pattern: str) -> List[str]:
        self.fs.invalidate_cache(self.fs._parent(pattern))  # object stores cache listings; others write here
        return self.fs.glob(pattern)

    def steps(self) -> List[int]:
        """Step folders present (complete or not), oldest first."""
        self.fs.invalidate_cache(self.root)
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = (_STEP_DIR.search(n.rstrip("/")) for n in names)
        return sorted(int(m.group(1)) for m in found if m)

    def read_manifest(self, step: int, part: str) -> Dict[str, Any]:
        folder = self.step_dir(step)
        try:
            manifest = json.loads(self.fs.cat_file(f"{folder}/MANIFEST.{part}.json"))
            check_format(folder, manifest.get("format", _UNVERSIONED))  # before any field a new format may lack
        except FileNotFoundError as e:
            raise CorruptCheckpoint(f"{folder}: {part} is missing ({e})") from e
        except (ValueError, TypeError, AttributeError) as e:
            raise CorruptCheckpoint(f"{folder}: the manifest of {part} is malformed ({e})") from e
        return manifest

    def read_part(self, step: int, part: str, manifest: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """A part's state, verified. A sharded part: its manifest's plain values, after its files are verified
        (its tensors are for :meth:`load_sharded_part`). ``manifest``: the part's, if already read."""
        folder = self.step_dir(step)
        manifest = manifest if manifest is not None else self.read_manifest(step, part)
        if manifest.get("layout") == "dcp":
            from torchx_diloco.checkpoint.dcp import verify_sharded

            verify_sharded(f"{self._url_of(folder)}/{part}", manifest.get("files") or {})
            values = manifest.get("values")
            if not isinstance(values, dict):
                raise CorruptCheckpoint(f"{folder}: the manifest of {part} is malformed (no values)")
            return values
        try:
            data = self.fs.cat_file(f"{folder}/{manifest['file']}")
        except FileNotFoundError as e:
            raise CorruptCheckpoint(f"{folder}: {part} is missing ({e})") from e
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpoint(f"{folder}: the manifest of {part} is malformed ({e})") from e
        if len(data) != manifest.get("bytes"):
            raise CorruptCheckpoint(
                f"{folder}: {part}.pt has {len(data)} bytes, the manifest says {manifest.get('bytes')}"
            )
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            raise CorruptCheckpoint(f"{folder}: {part}.pt does not match its checksum")
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - unpickling errors have many types; all mean "refuse"
            raise CorruptCheckpoint(f"{folder}: {part}.pt refused by the safe loader ({str(e).splitlines()[0]})") from e
        if isinstance(state, dict) and "format" in state:  # a part that carries its own version is held to it too
            check_format(folder, state["format"])
        return state

    def has_part(self, step: int, part: str) -> bool:
        self.fs.invalidate_cache(self.step_dir(step))
        return self.fs.exists(f"{self.step_dir(step)}/MANIFEST.{part}.json")

    def written_by(self, step: int, run: Optional[str]) -> bool:
        """Whether ``run`` wrote step ``step``'s global part (any run does when ``run`` is None)."""
        if run is None:
            return True
        try:
            return self.read_manifest(step, GLOBAL_PART).get("run") == run
        except CorruptCheckpoint:
            return False

    def newest_published_step(self, run: Optional[str] = None) -> int:
        """The newest step with a global manifest (of ``run``, when given; not verified: cheap enough to ask at
        every sync); 0 if none."""
        for step in reversed(self.steps()):
            if self.has_part(step, GLOBAL_PART) and self.written_by(step, run):
                return step
        return 0

    def latest(self, group_id: int, run: Optional[str] = None) -> Optional[Checkpoint]:
        """The newest step whose global part is complete and sound (and written by ``run``, when given), with this
        group's part if it has one.

        A corrupt or partial step is reported and skipped in favour of the one before; a step of a newer format
        raises ``UserError`` (see :func:`check_format`).
        """
        for step in reversed(self.steps()):
            if not self.has_part(step, GLOBAL_PART):
                logger.warning("checkpoint %s is incomplete (no manifest): skipping it", self.step_dir(step))
                continue
            if not self.written_by(step, run):
                continue
            try:
                return self.at(step, group_id)
            except CorruptCheckpoint as e:
                logger.warning("checkpoint skipped: %s", e)
        return None

    def at(self, step: int, group_id: int, verify: bool = True) -> Checkpoint:
        """Step ``step`` with this group's part if it has one. ``verify=False``: sharded parts are not read back
        (the group's rank 0 verified the step it chose for all its ranks)."""
        found: Dict[str, Optional[Dict[str, Any]]] = {}
        sharded = set()
        for part in (GLOBAL_PART, group_part(group_id)):
            if part != GLOBAL_PART and not self.has_part(step, part):
                found[part] = None
                continue
            manifest = self.read_manifest(step, part)
            if manifest.get("layout") == "dcp":
                sharded.add(part)
                if not verify:
                    found[part] = manifest.get("values") or {}
                    continue
            found[part] = self.read_part(step, part, manifest)
        global_state = found[GLOBAL_PART]
        assert global_state is not None
        return Checkpoint(step, global_state, found[group_part(group_id)], frozenset(sharded))

"""What a pseudo-gradient crosses the slow link as, and how the groups' payloads are summed.

``fp32`` is torchft's all-reduce. ``bf16``, ``int8``, ``int4`` and ``int2`` are a reduce-scatter then an
all-gather, both on encoded bytes: the payload is cut into one chunk per group; an all-to-all hands chunk ``i``
of every group to group ``i``, which decodes them, sums in fp32 and encodes the sum; an all-gather hands every
group every encoded sum, which all groups decode alike, so the result is bit-identical everywhere. Each group
sends ``2 (n-1)/n`` times the encoded payload per sync, whatever ``n``.

int8 and int4 scale each block of :data:`BLOCK` values by its own absolute maximum (symmetric, round to
nearest), so one outlier coarsens 127 neighbours, not the whole tensor; int4 packs two values per byte; the
scales travel as fp32 (0.25 bits per value). int2 sends a sign bit and a magnitude bit per value, four values a
byte: a block's two magnitudes are the means of its values' magnitudes below and at-or-above their mean (two
bf16 per block, the same 0.25 bits per value as a scale).

``topk`` is sparse: per chunk of :data:`TOPK_CHUNK` values of the flat payload, the ``k`` largest magnitudes,
their in-chunk indices (12 bits each) and their values in int2's two-level code (sign and magnitude bit, two
bf16 magnitudes per chunk). Sparse payloads do not add up to a sparse payload (groups pick different indices),
so they are all-gathered: every group decodes every group's payload and sums in fp32 in rank order, the same
sum everywhere; each group sends ``(n-1)`` times its payload (an all-gather of ring cost).

Error feedback (:class:`Feedback`): a member adds its carried residual to its payload before encoding, and the
residual left is that sum minus what its own encoded payload decodes to: for the reduce-scatter codecs, the
decode of the n chunks it encoded and sent (before any sum: the owner's re-encoding of the sum is not any
member's residual); for topk, the decode of the payload it all-gathered. Plain PyTorch ops: the same code runs
on CPU with Gloo and on a GPU with NCCL, without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch.distributed import ReduceOp

from torchx_diloco.config import CODECS, DEFAULT_TOPK_DENSITY

BLOCK = 128  # values per scale: small enough that one outlier does not flatten many neighbours
TOPK_CHUNK = 4096  # values per top-k chunk: a few thousand, and every in-chunk index fits 12 bits


@dataclass(frozen=True)
class Codec:
    """How ``n`` fp32 values (a multiple of ``align``) become bytes and back."""

    name: str  # as --codec spells it
    bits: int  # per value (topk: per kept value), scales and indices aside
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor, int], torch.Tensor]
    size: Callable[[int], int]  # the encoded bytes of that many values
    align: int = BLOCK  # a payload is padded to a multiple of this (times the members, for a reduce-scatter)
    gathered: bool = False  # summed by an all-gather of every member's payload (sparse), not a reduce-scatter
    key: str = ""  # what the layout signature tells apart (topk: its values per chunk too)

    @property
    def lossy(self) -> bool:
        return self.name != "fp32"

    def encoded_bytes(self, numel: int) -> int:
        return self.size(numel)

    def round_trip(self, values: torch.Tensor) -> torch.Tensor:
        """What the receivers see of ``values`` (for tests, measurements and error feedback's references)."""
        padded = _pad(values.float().reshape(-1), self.align)
        return self.decode(self.encode(padded), padded.numel())[: values.numel()].view_as(values)


@dataclass(frozen=True)
class Feedback:
    """Error feedback for one exchange: ``carried`` (the residual so far) is added to the payload before it is
    encoded; ``left`` receives what this member's encoded payload did not carry of that sum."""

    carried: torch.Tensor
    left: torch.Tensor


def _pad(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -flat.numel() % multiple
    return torch.cat([flat, flat.new_zeros(extra)]) if extra else flat


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _encode_fp32(x: torch.Tensor) -> torch.Tensor:
    return _bytes(x)


def _decode_fp32(buf: torch.Tensor, numel: int) -> torch.Tensor:
    return buf.view(torch.float32)


def _encode_bf16(x: torch.Tensor) -> torch.Tensor:
    return _bytes(x.to(torch.bfloat16))


def _decode_bf16(buf: torch.Tensor, numel: int) -> torch.Tensor:
    return buf.view(torch.bfloat16).float()


def _scaled(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scales (fp32) and the values rounded to integers in [-qmax, qmax]."""
    blocks = x.view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1) / qmax
    q = torch.round(blocks / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-qmax, qmax)
    return scales, q


def _encode_int8(x: torch.Tensor) -> torch.Tensor:
    scales, q = _scaled(x, 127)
    return torch.cat([_bytes(scales), _bytes(q.to(torch.int8))])


def _decode_int8(buf: torch.Tensor, numel: int) -> torch.Tensor:
    nblocks = numel // BLOCK
    scales = buf[: 4 * nblocks].view(torch.float32)
    q = buf[4 * nblocks :].view(torch.int8).view(nblocks, BLOCK)
    return (q.float() * scales[:, None]).view(-1)


def _encode_int4(x: torch.Tensor) -> torch.Tensor:
    scales, q = _scaled(x, 7)
    nibbles = (q + 8).to(torch.uint8).view(-1, 2)  # 1..15: two values per byte, the first in the high half
    return torch.cat([_bytes(scales), (nibbles[:, 0] << 4) | nibbles[:, 1]])


def _decode_int4(buf: torch.Tensor, numel: int) -> torch.Tensor:
    nblocks = numel // BLOCK
    scales = buf[: 4 * nblocks].view(torch.float32)
    packed = buf[4 * nblocks :]
    q = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(nblocks, BLOCK).float() - 8
    return (q * scales[:, None]).view(-1)


# --- the two-level code of int2 and topk: a sign bit and a magnitude bit per value -------------------------
def _two_levels(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: its two magnitudes (bf16: the mean magnitude of the values below the row's mean magnitude, and of
    those at or above it) and each value's 2-bit code (sign << 1 | magnitude bit). A row of zeros stays zeros."""
    magnitude = rows.abs()
    high = magnitude >= magnitude.mean(dim=1, keepdim=True)
    n_high = high.sum(dim=1)
    hi = (magnitude * high).sum(dim=1) / n_high.clamp_min(1)
    lo = (magnitude * ~high).sum(dim=1) / (rows.shape[1] - n_high).clamp_min(1)
    codes = ((rows < 0).to(torch.uint8) << 1) | high.to(torch.uint8)
    return torch.stack([lo, hi], dim=1).to(torch.bfloat16), codes


def _from_two_levels(levels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The values of :func:`_two_levels`'s ``codes`` (rows x values) given its per-row ``levels``."""
    magnitude = levels.float().gather(1, (codes & 1).long())
    return torch.where((codes >> 1).bool(), -magnitude, magnitude)


def _pack2(codes: torch.Tensor) -> torch.Tensor:
    """2-bit codes, four a byte, the first in the top bits (padded with zeros to a multiple of four)."""
    c = _pad(codes.reshape(-1), 4).view(-1, 4)
    return (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]


def _unpack2(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([packed >> 6, (packed >> 4) & 3, (packed >> 2) & 3, packed & 3], dim=1).view(-1)[:count]


def _encode_int2(x: torch.Tensor) -> torch.Tensor:
    levels, codes = _two_levels(x.view(-1, BLOCK))
    return torch.cat([_bytes(levels), _pack2(codes)])


def _decode_int2(buf: torch.Tensor, numel: int) -> torch.Tensor:
    nblocks = numel // BLOCK
    levels = buf[: 4 * nblocks].view(torch.bfloat16).view(nblocks, 2)
    codes = _unpack2(buf[4 * nblocks :], numel).view(nblocks, BLOCK)
    return _from_two_levels(levels, codes).view(-1)


# --- topk: indices (12 bits) and two-level values of each chunk's k largest magnitudes ----------------------
def _pack12(indices: torch.Tensor) -> torch.Tensor:
    """Indices below 4096, two in three bytes (padded with a zero to an even count)."""
    pairs = _pad(indices.reshape(-1), 2).view(-1, 2).to(torch.int32)
    a, b = pairs[:, 0], pairs[:, 1]
    return torch.stack([a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF], dim=1).to(torch.uint8).view(-1)


def _unpack12(packed: torch.Tensor, count: int) -> torch.Tensor:
    t = packed.view(-1, 3).to(torch.int64)
    a = (t[:, 0] << 4) | (t[:, 1] >> 4)
    b = ((t[:, 1] & 0xF) << 8) | t[:, 2]
    return torch.stack([a, b], dim=1).view(-1)[:count]


def topk_per_chunk(density: float) -> int:
    """Values kept per :data:`TOPK_CHUNK`-value chunk at ``density`` (at least one)."""
    return max(1, min(TOPK_CHUNK, round(density * TOPK_CHUNK)))


def _topk_bytes(k: int, numel: int) -> int:
    kept = numel // TOPK_CHUNK * k
    size = 4 * (numel // TOPK_CHUNK) + 3 * ((kept + 1) // 2) + (kept + 3) // 4
    return size + -size % 4  # padded: every member's part of a gathered buffer starts 4-byte aligned


def _topk_codec(density: float) -> Codec:
    k = topk_per_chunk(density)

    def encode(x: torch.Tensor) -> torch.Tensor:
        chunks = x.view(-1, TOPK_CHUNK)
        indices = chunks.abs().topk(k, dim=1, sorted=False).indices
        levels, codes = _two_levels(chunks.gather(1, indices))
        return _pad(torch.cat([_bytes(levels), _pack12(indices), _pack2(codes)]), 4)

    def decode(buf: torch.Tensor, numel: int) -> torch.Tensor:
        nchunks = numel // TOPK_CHUNK
        kept = nchunks * k
        index_bytes = 3 * ((kept + 1) // 2)
        levels = buf[: 4 * nchunks].view(torch.bfloat16).view(nchunks, 2)
        indices = _unpack12(buf[4 * nchunks : 4 * nchunks + index_bytes], kept).view(nchunks, k)
        values = _from_two_levels(levels, _unpack2(buf[4 * nchunks + index_bytes :], kept).view(nchunks, k))
        dense = torch.zeros(nchunks, TOPK_CHUNK, dtype=torch.float32, device=buf.device)
        return dense.scatter_(1, indices, values).view(-1)

    return Codec("topk", 2, encode, decode, lambda n: _topk_bytes(k, n), TOPK_CHUNK, True, f"topk{k}")


def _dense(name: str, bits: int, encode: Callable, decode: Callable, scales: bool) -> Codec:
    return Codec(name, bits, encode, decode, lambda n: n * bits // 8 + (4 * (n // BLOCK) if scales else 0), key=name)


CODEC_TABLE: Dict[str, Codec] = {
    "fp32": _dense("fp32", 32, _encode_fp32, _decode_fp32, False),
    "bf16": _dense("bf16", 16, _encode_bf16, _decode_bf16, False),
    "int8": _dense("int8", 8, _encode_int8, _decode_int8, True),
    "int4": _dense("int4", 4, _encode_int4, _decode_int4, True),
    "int2": _dense("int2", 2, _encode_int2, _decode_int2, True),
    "topk": _topk_codec(DEFAULT_TOPK_DENSITY),
}
assert tuple(CODEC_TABLE) == CODECS, "config.CODECS and the codec table must list the same codecs"


def get_codec(name: str, topk_density: Optional[float] = None) -> Codec:
    """The codec ``name`` (topk at ``topk_density``, by default config.DEFAULT_TOPK_DENSITY)."""
    if name not in CODEC_TABLE:
        raise ValueError(f"unknown codec {name!r}: use one of {', '.join(CODECS)}")
    if name == "topk" and topk_density is not None:
        return _topk_codec(topk_density)
    return CODEC_TABLE[name]


def ring_allreduce_bytes(nbytes: int, n: int) -> int:
    """What each of ``n`` members sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return 2 * (n - 1) * nbytes // n if n > 1 else 0


def allreduce_sum(manager: Any, payload: torch.Tensor, codec: Codec, feedback: Optional[Feedback] = None) -> int:
    """Sum the fp32 ``payload`` in place over the manager's process group, sent as ``codec``; blocks. With
    ``feedback``, its residual is added first and ``feedback.left`` receives what this member did not send.

    Errors are reported to the manager (its ``should_commit()`` is then False) instead of raised, exactly
    as torchft's own all-reduce does: the caller then discards the round. Returns the bytes this member sent.
    """
    if manager.errored() is not None:
        return 0
    if codec.name == "fp32":
        assert feedback is None, "fp32 is lossless: nothing to feed back"
        manager.allreduce(payload, reduce_op=ReduceOp.SUM).wait()
        if manager.errored() is not None:  # (torchft's all-reduce reports its failure instead of raising it)
            abort_for_peers(manager)
            return 0
        return ring_allreduce_bytes(payload.numel() * 4, manager._pg.size())
    if not manager.is_participating():  # as torchft's all-reduce: a healing member adds nothing
        payload.zero_()
    elif feedback is not None:
        payload.add_(feedback.carried.to(payload.device, non_blocking=True))
    left = None if feedback is None else feedback.left
    try:
        if codec.gathered:
            return _all_gather_sum(manager._pg, payload, codec, left)
        return _reduce_scatter_all_gather(manager._pg, payload, codec, left)
    except Exception as e:  # noqa: BLE001 - any failed collective drops the round, as torchft's own does
        manager.report_error(e)
        abort_for_peers(manager)
        return 0


def abort_for_peers(manager: Any) -> None:
    """After a failed collective: close this member's process group, so that the peers still waiting on it (in a
    ring, the next member) fail now instead of at their collective timeout, and close theirs in turn. The round is
    dropped for all in any case; the next quorum reconfigures the process group (a failed commit changes the
    quorum's id)."""
    manager._pg.abort()


def _leave(left: Optional[torch.Tensor], meant: torch.Tensor, sent: torch.Tensor) -> None:
    """Error feedback's residual: what this member meant to send minus what its encoded payload decodes to."""
    if left is not None:
        left.copy_(meant[: left.numel()] - sent[: left.numel()])


def _reduce_scatter_all_gather(pg: Any, payload: torch.Tensor, codec: Codec, left: Optional[torch.Tensor]) -> int:
    from torch.distributed.distributed_c10d import AllgatherOptions, AllToAllOptions

    n = pg.size()  # a world of one runs the same collectives (and the same rounding) as any other
    padded = _pad(payload, n * BLOCK)
    chunk = padded.numel() // n
    size = codec.encoded_bytes(chunk)
    send = torch.cat([codec.encode(part) for part in padded.split(chunk)])
    if left is not None:  # the n chunks this member sends, as their owners decode them
        _leave(left, padded, torch.cat([codec.decode(part, chunk) for part in send.split(size)]))
    received = torch.empty_like(send)
    pg.alltoall_base(received, send, [size] * n, [size] * n, AllToAllOptions()).wait()
    total = torch.zeros(chunk, dtype=torch.float32, device=payload.device)
    for part in received.split(size):  # in rank order: the same sum wherever it is computed
        total += codec.decode(part, chunk)
    mine = codec.encode(total)
    gathered = torch.empty(n * size, dtype=torch.uint8, device=payload.device)
    pg.allgather_into_tensor_coalesced([gathered], [mine], AllgatherOptions()).wait()
    summed = torch.cat([codec.decode(part, chunk) for part in gathered.split(size)])
    payload.copy_(summed[: payload.numel()])
    return 2 * (n - 1) * size


def _all_gather_sum(pg: Any, payload: torch.Tensor, codec: Codec, left: Optional[torch.Tensor]) -> int:
    """Every member's whole encoded payload to every member, each decoded and summed in rank order (fp32)."""
    from torch.distributed.distributed_c10d import AllgatherOptions

    n = pg.size()
    padded = _pad(payload, codec.align)
    size = codec.encoded_bytes(padded.numel())
    mine = codec.encode(padded)
    if left is not None:
        _leave(left, padded, codec.decode(mine, padded.numel()))
    gathered = torch.empty(n * size, dtype=torch.uint8, device=payload.device)
    pg.allgather_into_tensor_coalesced([gathered], [mine], AllgatherOptions()).wait()
    total = torch.zeros(padded.numel(), dtype=torch.float32, device=payload.device)
    for part in gathered.split(size):
        total += codec.decode(part, padded.numel())
    payload.copy_(total[: payload.numel()])
    return (n - 1) * size

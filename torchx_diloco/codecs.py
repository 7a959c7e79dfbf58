"""What a pseudo-gradient crosses the slow link as, and the sum that sends each group's bytes about twice.

``fp32`` is torchft's all-reduce. ``bf16``, ``int8`` and ``int4`` are a reduce-scatter then an all-gather,
both on encoded bytes: the payload is cut into one chunk per group; an all-to-all hands chunk ``i`` of
every group to group ``i``, which decodes them, sums in fp32 and encodes the sum; an all-gather hands every
group every encoded sum, which all groups decode alike, so the result is bit-identical everywhere. Each
group sends ``2 (n-1)/n`` times the encoded payload per sync, whatever ``n``. (An all-gather of everything,
summed locally, would send ``n-1`` times it.)

int8 and int4 scale each block of :data:`BLOCK` values by its own absolute maximum (symmetric, round to
nearest), so one outlier coarsens 127 neighbours, not the whole tensor; int4 packs two values per byte. The
scales travel as fp32, :data:`BLOCK` values each (0.25 bits per value). Plain PyTorch ops: the same code
runs on CPU with Gloo and on a GPU with NCCL, without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
from torch.distributed import ReduceOp

from torchx_diloco.config import CODECS

BLOCK = 128  # values per scale: small enough that one outlier does not flatten many neighbours


@dataclass(frozen=True)
class Codec:
    """How ``n`` fp32 values (a multiple of :data:`BLOCK`) become bytes and back."""

    name: str
    bits: int  # per value, scales aside
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor, int], torch.Tensor]

    def encoded_bytes(self, numel: int) -> int:
        scales = 4 * (numel // BLOCK) if self.name in ("int8", "int4") else 0
        return numel * self.bits // 8 + scales

    def round_trip(self, values: torch.Tensor) -> torch.Tensor:
        """What the receivers see of ``values`` (for tests and measurements)."""
        padded = _pad(values.float().reshape(-1), BLOCK)
        return self.decode(self.encode(padded), padded.numel())[: values.numel()].view_as(values)


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


CODEC_TABLE: Dict[str, Codec] = {
    "fp32": Codec("fp32", 32, _encode_fp32, _decode_fp32),
    "bf16": Codec("bf16", 16, _encode_bf16, _decode_bf16),
    "int8": Codec("int8", 8, _encode_int8, _decode_int8),
    "int4": Codec("int4", 4, _encode_int4, _decode_int4),
}
assert tuple(CODEC_TABLE) == CODECS, "config.CODECS and the codec table must list the same codecs"


def get_codec(name: str) -> Codec:
    if name not in CODEC_TABLE:
        raise ValueError(f"unknown codec {name!r}: use one of {', '.join(CODECS)}")
    return CODEC_TABLE[name]


def ring_allreduce_bytes(nbytes: int, n: int) -> int:
    """What each of ``n`` members sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return 2 * (n - 1) * nbytes // n if n > 1 else 0


def allreduce_sum(manager: Any, payload: torch.Tensor, codec: Codec) -> int:
    """Sum the fp32 ``payload`` in place over the manager's process group, sent as ``codec``; blocks.

    Errors are reported to the manager (its ``should_commit()`` is then False) instead of raised, exactly
    as torchft's own all-reduce does: the caller then discards the round. Returns the bytes this member sent.
    """
    if manager.errored() is not None:
        return 0
    if codec.name == "fp32":
        manager.allreduce(payload, reduce_op=ReduceOp.SUM).wait()
        return ring_allreduce_bytes(payload.numel() * 4, manager._pg.size())
    if not manager.is_participating():  # as torchft's all-reduce: a healing member adds nothing
        payload.zero_()
    try:
        return _reduce_scatter_all_gather(manager._pg, payload, codec)
    except Exception as e:  # noqa: BLE001 - any failed collective drops the round, as torchft's own does
        manager.report_error(e)
        return 0


def _reduce_scatter_all_gather(pg: Any, payload: torch.Tensor, codec: Codec) -> int:
    from torch.distributed.distributed_c10d import AllgatherOptions, AllToAllOptions

    n = pg.size()  # a world of one runs the same collectives (and the same rounding) as any other
    padded = _pad(payload, n * BLOCK)
    chunk = padded.numel() // n
    size = codec.encoded_bytes(chunk)
    send = torch.cat([codec.encode(part) for part in padded.split(chunk)])
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

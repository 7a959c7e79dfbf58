"""What one sync sends between replica groups: a header, then the payload as the codec encodes it.

The header is summed over the quorum first (fp64: exact), so every group learns what the round is before any
payload moves: how many groups contribute and how much work (tokens trained) each put in, whether they are
syncing or agreeing on initial weights, and a signature of their layout (fragments, codec, model size) with its
square. Knowing the total work, each group scales its payload by ``n x its work / total work`` before sending, so
that the payload's sum over n is the average weighted by work: exactly today's mean when the groups' work is equal
(the scale is then 1.0 and nothing is multiplied). ``sum(s)^2 == n sum(s^2)`` only when
the ``n`` members' signatures are equal, so groups started with different flags are told apart.

With a ``split_group`` (the ranks of a group hold the same weights: DDP) rank r sends only the r-th slice of
the payload across groups, and the group's ranks then all-gather the summed slices over their own links, so the
slow link carries the model once per group, not once per rank.
"""

from __future__ import annotations

import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from enum import IntEnum
from typing import Any, List, Optional, Tuple

import torch
from torch.distributed import ReduceOp

from torchx_diloco.codecs import Codec, Feedback, allreduce_sum, get_codec
from torchx_diloco.errors import UserError


class Slot(IntEnum):
    """The header's slots."""

    CONTRIBUTORS = 0  # groups whose pseudo-gradient is in the payload (a group that just healed sends zeros)
    SYNCING = 1  # groups in an outer step's sync
    AGREEING = 2  # groups agreeing on initial weights (DiLoCo.agree_initial_weights)
    SIGNATURE = 3  # the layout's signature
    SIGNATURE_SQUARED = 4  # its square
    WORK = 5  # the tokens the contributors trained on since the fragment's last sync (0: unweighted)


def layout_signature(fragments: int, codec: str, numel: int, ranks: int = 1) -> float:
    """A number that differs between layouts the groups of one run must share (``codec``: its ``key``, which
    tells topk's densities apart too; ``numel``: this rank's share; ``ranks``: the group's, since rank r of a
    group exchanges with rank r of every other group only)."""
    return float(zlib.crc32(f"{fragments}/{codec}/{numel}/{ranks}".encode()) % (1 << 20) + 1)


def new_header(kind: Slot, signature: float, device: torch.device, pace_slots: int = 0) -> torch.Tensor:
    """A round's header; ``pace_slots`` more at its end with ``auto:H`` (one per group: its step time)."""
    header = torch.zeros(len(Slot) + pace_slots, dtype=torch.float64, device=device)
    header[kind] = 1.0
    header[Slot.SIGNATURE], header[Slot.SIGNATURE_SQUARED] = signature, signature**2
    return header


def layouts_differ(header: torch.Tensor) -> bool:
    """After the sum: whether the members' signatures differ."""
    members = float(header[Slot.SYNCING] + header[Slot.AGREEING])
    return float(header[Slot.SIGNATURE]) ** 2 != members * float(header[Slot.SIGNATURE_SQUARED])


def check_layout(header: torch.Tensor) -> None:
    if layouts_differ(header):
        raise UserError(
            "the groups of this run sync different layouts (--fragments, --codec, --topk-density, the model or the "
            "number of ranks per group differ): start every group with the same flags and as many ranks (rank r of a "
            "group syncs with rank r of the others, one torchft Manager each)"
        )


class Exchange:
    """Sends (header, payload) rounds through a torchft Manager, in the background when ``background``."""

    def __init__(
        self,
        manager: Any,
        codec: Codec | str,
        split_group: Optional[Any] = None,
        background: bool = False,
        pace_slots: int = 0,
    ) -> None:
        self.manager = manager
        self.pace_slots = pace_slots  # every header of the run has them (auto:H): its groups must agree on them
        self.codec: Codec = get_codec(codec) if isinstance(codec, str) else codec
        self.split_group = split_group if split_group is not None and split_group.size() > 1 else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="diloco-sync") if background else None

    def share_numel(self, numel: int) -> int:
        """How many of a ``numel``-value payload this rank sends across groups (its slice, with a split group):
        the size of its error-feedback residual."""
        ranks = self.split_group.size() if self.split_group is not None else 1
        return -(-numel // ranks)

    def start(self, payload: torch.Tensor, header: torch.Tensor, feedback: Optional[Feedback] = None) -> "Future[int]":
        """Sum ``header`` and ``payload`` in place over the quorum; the future gives the bytes this rank sent."""
        if self._executor is not None:
            return self._executor.submit(self.run, payload, header, feedback)
        done: Future[int] = Future()
        done.set_result(self.run(payload, header, feedback))
        return done

    def run(self, payload: torch.Tensor, header: torch.Tensor, feedback: Optional[Feedback] = None) -> int:
        """One round, blocking: the header, then the payload as the codec sends it (every rank of the group calls
        it: with a split group each sends its slice, then the group all-gathers the sums). ``feedback``: this
        rank's error feedback, of its share (:meth:`share_numel`)."""
        if self.split_group is None:
            return self._across_groups(header, payload, payload, feedback)
        import torch.distributed as dist

        ranks, rank = self.split_group.size(), self.split_group.rank()
        padded = torch.cat([payload, payload.new_zeros(-payload.numel() % ranks)])
        share = padded.numel() // ranks
        sent = self._across_groups(header, padded, padded[rank * share : (rank + 1) * share], feedback)
        # always, whatever the round turned out to be, so no rank of the group waits for another in vain
        dist.all_gather_into_tensor(padded, padded[rank * share : (rank + 1) * share].clone(), group=self.split_group)
        payload.copy_(padded[: payload.numel()])
        return sent

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _across_groups(
        self, header: torch.Tensor, payload: torch.Tensor, share: torch.Tensor, feedback: Optional[Feedback]
    ) -> int:
        work = float(header[Slot.WORK])
        self.manager.allreduce(header, reduce_op=ReduceOp.SUM).wait()
        if self.manager.errored() is not None:  # the sum failed (a peer died in it): the header holds no sum
            header.zero_()  # nothing of it is read: no layout to compare, no work, no step times; no commit follows
            return 0
        scale = work_scale(header, work)
        if scale != 1.0:  # (this rank's slice only: the group's ranks all-gather the weighted sums after)
            share.mul_(scale)
        if layouts_differ(header):
            self.manager.report_error(RuntimeError("the groups' sync layouts differ"))
            return 0
        if float(header[Slot.AGREEING]) > 0 and float(header[Slot.SYNCING]) > 0:
            # a starting group's initial weights met this sync (agree_initial_weights): no average
            self.manager.report_error(RuntimeError("a starting group's initial weights reached this sync"))
            return 0
        if float(header[Slot.AGREEING]) > 0:  # everyone is agreeing on initial weights: those travel exactly
            return allreduce_sum(self.manager, payload, get_codec("fp32"))
        return allreduce_sum(self.manager, share, self.codec, feedback)


def work_scale(header: torch.Tensor, work: float) -> float:
    """After the header's sum: what a member that put in ``work`` multiplies its payload by, so that the sum over
    the contributors n is n times the work-weighted average (1.0 with equal work, or when nobody counts work)."""
    total, contributors = float(header[Slot.WORK]), float(header[Slot.CONTRIBUTORS])
    if total <= 0 or work <= 0:
        return 1.0 if total <= 0 else 0.0
    ratio = contributors * work / total
    return 1.0 if ratio == 1.0 else ratio


def exchange_initial_weights(
    exchange: Exchange, tensors: List[torch.Tensor], signature: float, sender: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One agreement round (``Slot.AGREEING``): the sender's ``tensors`` flat in fp32, zeros from everyone else;
    returns the summed flat weights and the summed header (the caller reads what the round turned out to be)."""
    header = new_header(Slot.AGREEING, signature, tensors[0].device, exchange.pace_slots)
    flat = torch.zeros(sum(t.numel() for t in tensors), dtype=torch.float32, device=header.device)
    if sender:
        torch.cat([t.detach().reshape(-1).float() for t in tensors], out=flat)
    exchange.run(flat, header)
    check_layout(header)
    return flat, header

"""The collectives the executor needs, as methods that are no-ops in a world of one.

Every collective goes through `Comm` so that (a) the model code never branches on the
world size and (b) a failure inside a collective - a peer that died or hung - surfaces
as `PeerFailure`, which the rank's failure handler treats as "another rank's error, not
mine" (see failure.py) instead of printing a second, misleading message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from kimi_trt.runtime.launch import ProcessGroups, RankInfo

T = TypeVar("T")


class PeerFailure(RuntimeError):
    """A collective failed because another rank died, hung or exited."""


def _short_reason(e: BaseException) -> str:
    """gloo's message without its source-file prefix and advice: 'Connection reset by peer'."""
    text = (str(e).splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as e:  # gloo / NCCL errors (DistBackendError is a RuntimeError)
        raise PeerFailure(_short_reason(e)) from e


class Comm:
    """Collectives over all ranks (pp is 1, so the TP group is the world)."""

    def __init__(self, info: RankInfo, groups: ProcessGroups, device: torch.device):
        self.rank = info.rank
        self.world_size = info.world_size
        self.device = device
        self._groups = groups

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    # ---- per-layer tensor collectives (default group, short timeout) -------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (TP row-parallel outputs, EP expert combine)."""
        if self.is_single:
            return x
        import torch.distributed as dist

        _guard(lambda: dist.all_reduce(x, group=self._groups.default))
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate equal-shaped shards of all ranks along `dim` (vocab shards)."""
        if self.is_single:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        _guard(lambda: dist.all_gather(parts, x.contiguous(), group=self._groups.default))
        return torch.cat(parts, dim=dim)

    def all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's rows when ranks hold different row counts (attention DP)."""
        if self.is_single:
            return x
        width = max(counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = self.all_gather(padded, dim=0).view(self.world_size, width, *x.shape[1:])
        return torch.cat([gathered[r, :n] for r, n in enumerate(counts)], dim=0)

    def reduce_scatter_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Sum a [sum(counts), ...] tensor over ranks and keep this rank's own rows."""
        if self.is_single:
            return x
        offsets = [sum(counts[:r]) for r in range(self.world_size)]
        # An all_reduce then a slice: exact and simple; the row counts of DP batches are small.
        self.all_reduce(x)
        start = offsets[self.rank]
        return x[start : start + counts[self.rank]]

    def ping(self) -> None:
        """A one-element all_reduce on the per-layer group: returns once every rank has
        answered, or raises PeerFailure after the collective timeout (the heartbeat)."""
        if not self.is_single:
            self.all_reduce(torch.zeros(1, device=self.device))

    # ---- control messages (rank 0 -> all; gloo, CONTROL_TIMEOUT_S) -----------------------
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank. Idle workers wait here for rank 0's next command,
        which comes at least every HEARTBEAT_S (see launch.py)."""
        if self.is_single:
            return obj
        import torch.distributed as dist

        holder = [obj if self.rank == 0 else None]
        _guard(lambda: dist.broadcast_object_list(holder, src=0, group=self._groups.control))
        return holder[0]

    def barrier(self) -> None:
        """Wait for every rank, up to STARTUP_TIMEOUT_S (after loading weights of uneven size)."""
        if self.is_single:
            return
        import torch.distributed as dist

        _guard(lambda: dist.barrier(group=self._groups.startup))

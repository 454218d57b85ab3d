"""Distributed data parallel (DDP) for the trainers, started by ``torchrun`` without code changes.

Purpose: a trainer calls :func:`setup_distributed` once. Under ``torchrun`` (environment variables ``WORLD_SIZE``
> 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) it initializes the default process group if
nobody has (backend ``gloo`` on CPU, ``nccl`` on CUDA), picks the rank's device (``cuda:LOCAL_RANK`` for a
plain ``"cuda"``). Without those variables
it is a single-process context and every helper is a no-op, so the same trainer code serves both. A group
created here lives until the process exits (destroyed by an ``atexit`` hook), so several trainer calls in one
``torchrun`` script, or a call that resumes after an exception, reuse it: destroying and re-creating the default
group on the same ``MASTER_PORT`` races with the stale rendezvous keys of the old one.

Conventions of the trainers built on it (Li et al., "PyTorch Distributed", VLDB 2020, for DDP itself):

- every rank draws the same *global* batch of ``batch_size`` examples from :func:`run_loop` (same seed) and
  keeps its contiguous shard :meth:`DistContext.shard` of ``batch_size / world_size`` rows;
- the per-rank loss is a mean over its shard; with equal shards DDP's gradient average is then exactly the
  gradient of the mean over the global batch, as in a single-process run;
- metrics are averaged over ranks (:meth:`DistContext.mean_metrics`) so every rank logs the same history;
- every rank reads a checkpoint when resuming, only rank 0 writes checkpoints and history.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from manifold_defense.devices import resolve_device

__all__ = ["DistContext", "env_world_size", "setup_distributed"]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset), validated."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"expected the WORLD_SIZE environment variable to be an int, got {raw!r}") from None
    if world < 1:
        raise ValueError(f"expected WORLD_SIZE >= 1, got {world}")
    return world


@dataclass(frozen=True)
class DistContext:
    """The process's place in a (possibly single-process) run.

    Attributes:
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of processes (1 without ``torch.distributed``).
        device: the device this rank trains on.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, history and logs."""
        return self.rank == 0

    def shard_size(self, global_batch: int) -> int:
        """Rows per rank of a global batch; raises unless ``global_batch`` divides evenly."""
        if global_batch % self.world_size != 0:
            raise ValueError(
                f"expected batch_size divisible by the world size {self.world_size} (each rank takes an equal "
                f"shard of every global batch), got batch_size={global_batch}"
            )
        return global_batch // self.world_size

    def shard(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous equal shard of every tensor of a global batch (first dimension)."""
        size = self.shard_size(int(batch[0].shape[0]))
        start = self.rank * size
        return tuple(t[start : start + size] for t in batch)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in ``DistributedDataParallel`` when distributed, else ``model`` itself.

        The wrapper broadcasts rank 0's parameters and buffers at construction and averages gradients in
        ``backward``; attacks should run on the bare ``model`` (its forward has no reducer bookkeeping).
        """
        if not self.distributed:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def mean_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Metrics averaged over ranks (identical on every rank); unchanged in a single process."""
        out = {k: float(v) for k, v in metrics.items()}
        if not self.distributed or not out:
            return out
        keys = sorted(out)
        values = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, values.tolist(), strict=True)}

    def sum_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``values`` over ranks (a new tensor on ``values``' device)."""
        if not self.distributed:
            return values.clone()
        buf = values.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(values.device)

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


TIMEOUT_ENV = "MANIFOLD_DEFENSE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600.0


def collective_timeout() -> datetime.timedelta:
    """How long a collective (``all_gather_object`` of a stage's chunks) waits for the slowest process.

    torch's default is 30 minutes, less than one chunk of a slow stage can take on a CPU (a Square chunk of 50 points
    through the fast projection runs about 45 minutes): a process that finished its chunks early then timed out
    while the other was still attacking, and the run died. The default here is 24 hours;
    ``MANIFOLD_DEFENSE_DIST_TIMEOUT_S`` (seconds, a finite number > 0) sets another.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"expected {TIMEOUT_ENV} to be a number of seconds, got {raw!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected {TIMEOUT_ENV} to be a finite number of seconds > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def setup_distributed(device: str | torch.device = "cpu") -> DistContext:
    """The :class:`DistContext` of this process, initializing ``torch.distributed`` under ``torchrun``.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``. In a distributed CUDA run a device without
            an index becomes ``cuda:LOCAL_RANK`` (one GPU per process, as ``torchrun`` expects).

    Returns:
        The context: rank, world size and device (world size 1 and rank 0 without ``torch.distributed``).

    The process group is created with backend ``nccl`` for CUDA and ``gloo`` for CPU from the ``env://``
    variables when ``WORLD_SIZE > 1`` and no group exists yet, with the :func:`collective_timeout`; it is kept for later calls and destroyed when
    the process exits. An existing group (initialized by the user) is used as it is.
    """
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world = env_world_size()
        rank = 0
        if world > 1:
            if not dist.is_available():
                raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
            for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
                if name not in os.environ:
                    raise ValueError(
                        f"expected the environment variable {name} with WORLD_SIZE={world} (start with torchrun), "
                        "got it unset"
                    )
            rank = int(os.environ["RANK"])
    if world > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        timeout = collective_timeout()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method="env://",
            world_size=world,
            rank=rank,
            timeout=timeout,
        )
        atexit.register(_destroy_at_exit)
    return DistContext(rank=rank, world_size=world, device=dev)


def _destroy_at_exit() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

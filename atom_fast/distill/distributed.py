"""Multi-process distillation with ``torchrun`` (``torch.distributed``): who owns which classes, and
the few collectives a run needs.

Work is split by classes, the way NCFM splits it: the loss is a sum over classes, so with ``W``
processes process ``r`` owns a contiguous block of classes (their synthetic images, their optimizer
state, their real images), draws the same random network every iteration from the seed, and
computes its classes' part of the loss and gradient with no communication at all. The processes
talk only to report the global loss (one small all_reduce per ``--log-every`` iterations), to agree
after every iteration whether to stop (a signal, ``preempt.py``: one integer on the CPU, over gloo, so
it adds no GPU sync), to gather checkpoints and the final set on rank 0, and to share out the
evaluation models. This scales with the number of classes (ImageNet-1K: 1000 classes over up to 1000
processes); more processes than classes is an error.

Every collective runs under the process group's timeout (``--dist-timeout``): a process that dies or
hangs makes the others stop with a one-line error within that time instead of waiting forever.
Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) nothing here communicates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch


class DistributedError(RuntimeError):
    """A collective failed: another process died, hung past the timeout, or the group broke."""


@dataclass(frozen=True)
class Context:
    """This process's place in the run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout_s: float = 600.0  # of every collective (--dist-timeout)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def classes(self, num_classes: int) -> range:
        """The contiguous block of classes this process owns."""
        return shard_classes(num_classes, self.world_size, self.rank)

    def model_indices(self, models: int) -> List[int]:
        """The evaluation models this process trains (round robin)."""
        return list(range(self.rank, models, self.world_size))


def shard_classes(num_classes: int, world_size: int, rank: int) -> range:
    """Classes ``[rank*K//W, (rank+1)*K//W)``: blocks that differ in size by at most one."""
    if world_size > num_classes:
        raise ValueError(f"{world_size} processes but only {num_classes} classes: every process needs "
                         f"at least one class; run with --nproc-per-node <= {num_classes}")
    return range(rank * num_classes // world_size, (rank + 1) * num_classes // world_size)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialize(device: torch.device, timeout_s: float) -> Context:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a plain Context without it."""
    if not launched_by_torchrun():
        return Context()
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # rendezvous failures surface as several exception types
        raise DistributedError(f"could not join the torchrun process group ({backend}): "
                               f"{type(exc).__name__}: {exc}") from None
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend,
                   timeout_s=timeout_s)


def shutdown(ctx: Context) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        _cpu_groups.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


def local_device(requested: torch.device, ctx: Context) -> torch.device:
    """One GPU per process: ``cuda:LOCAL_RANK`` when the run is on CUDA."""
    if requested.type == "cuda" and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return requested


def _collective(ctx: Context, what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"rank {ctx.rank}/{ctx.world_size}: {what} failed ({message}); another process probably "
            f"died or hung (see its output). The last checkpoint, if any, is kept: rerun with "
            f"--resume.") from None


def all_reduce_sum(ctx: Context, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """The sum over processes of ``tensor`` (in place; returned)."""
    if ctx.enabled:
        import torch.distributed as dist

        _collective(ctx, what, dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(ctx: Context, obj: Any, what: str) -> Optional[List[Any]]:
    """Every process's ``obj`` on rank 0 (in rank order); None elsewhere."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world_size if ctx.is_main else None
    _collective(ctx, what, dist.gather_object, obj, out, dst=0)
    return out


def all_gather(ctx: Context, obj: Any, what: str) -> List[Any]:
    """Every process's ``obj`` on every process (in rank order)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world_size
    _collective(ctx, what, dist.all_gather_object, out, obj)
    return out


def broadcast_from_main(ctx: Context, obj: Any, what: str) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.is_main else None]
    _collective(ctx, what, dist.broadcast_object_list, box, src=0)
    return box[0]


# the default group -> its gloo side group, for CPU collectives when the default group is NCCL
_cpu_groups: dict = {}


def cpu_group(ctx: Context):
    """A group whose collectives take CPU tensors: the default group on gloo (None), else a gloo
    group over the same processes, made once. Every process must call this at the same point the
    first time (creating a group is itself collective)."""
    if ctx.backend == "gloo":
        return None
    import torch.distributed as dist

    world = dist.group.WORLD
    if world not in _cpu_groups:
        _cpu_groups.clear()  # a new default group: the old side group went with the old one
        _cpu_groups[world] = _collective(ctx, "creating a gloo group", dist.new_group,
                                         backend="gloo", timeout=timedelta(seconds=ctx.timeout_s))
    return _cpu_groups[world]


def max_int(ctx: Context, value: int, what: str) -> int:
    """The largest of every process's ``value``, the same on every process: one integer on the CPU
    (:func:`cpu_group`), so it adds no GPU sync. Without torchrun, ``value``."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    box = torch.tensor([value], dtype=torch.int64)
    _collective(ctx, what, dist.all_reduce, box, op=dist.ReduceOp.MAX, group=cpu_group(ctx))
    return int(box.item())


def agree(ctx: Context, error: Optional[BaseException], what: str) -> None:
    """Raise on every process the first ``error`` any process reports (None: no error there).

    So a condition one process finds (a bad checkpoint, a failed write) stops all of them alike."""
    errors = [e for e in all_gather(ctx, error, what) if e is not None]
    if errors:
        raise errors[0]

"""Processes of a study run: in-process, or one rank of ``accelerate launch`` / ``torchrun``.

:func:`init_dist` looks at the launcher's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, set by ``torchrun`` and by ``accelerate launch``). With one
process (or none of these variables) the study runs in-process, with no
collective at all. With several, it uses Hugging Face accelerate's
:class:`accelerate.PartialState` when accelerate is installed (it picks NCCL on
GPUs, gloo on CPUs, and the device of the rank) and plain
:func:`torch.distributed.init_process_group` otherwise (gloo on CPU, NCCL on CUDA).
Collectives are only ``barrier``, ``all_reduce`` (sum) and ``all_gather`` of
fixed-size tensors; NCCL tensors are moved to the rank's device and back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Dist", "init_dist"]


@dataclass
class Dist:
    """Rank, world size and device of this process, with the few collectives a study needs.

    Parameters
    ----------
    rank, world, local_rank
        This process's global rank, the number of processes, the rank on its node.
    device
        The torch device of the rank.
    backend
        ``"none"`` (in-process), ``"gloo"`` or ``"nccl"``.
    launcher
        ``"in-process"``, ``"accelerate"`` or ``"torch.distributed"``.

    Examples
    --------
    >>> import torch
    >>> d = Dist()  # in-process: collectives are identities
    >>> d.is_main, d.all_reduce_sum(torch.ones(2)).tolist(), len(d.all_gather(torch.ones(1)))
    (True, [1.0, 1.0], 1)
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = "cpu"
    backend: str = "none"
    launcher: str = "in-process"

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in-process)."""
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def _comm(self, t: Any) -> Any:
        return t.to(self.device) if self.backend == "nccl" else t

    def all_reduce_sum(self, t: Any) -> Any:
        """Sum of ``t`` over ranks (``t`` itself in-process); float64 stays float64."""
        if self.world == 1:
            return t
        import torch.distributed as tdist

        x = self._comm(t.clone())
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        return x.cpu()

    def all_gather(self, t: Any) -> list[Any]:
        """``[t of rank 0, t of rank 1, ...]``; every rank's ``t`` has the same shape."""
        if self.world == 1:
            return [t]
        import torch
        import torch.distributed as tdist

        x = self._comm(t.contiguous())
        out = [torch.empty_like(x) for _ in range(self.world)]
        tdist.all_gather(out, x)
        return [o.cpu() for o in out]

    def close(self) -> None:
        """Destroy the process group (if this process created one)."""
        if self.world > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def init_dist(*, cpu: bool = False) -> Dist:
    """The :class:`Dist` of this process (see the module docstring).

    Parameters
    ----------
    cpu
        Use the CPU (gloo) even where CUDA is available.

    Returns
    -------
    Dist

    Examples
    --------
    Without a launcher's ``WORLD_SIZE > 1`` the study runs in-process:

    >>> import os
    >>> "WORLD_SIZE" in os.environ or init_dist(cpu=True).launcher == "in-process"
    True
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = "cpu"
        if not cpu:
            import torch

            if torch.cuda.is_available():
                device = "cuda"
        return Dist(device=device)
    try:
        from accelerate import PartialState
    except ImportError:
        PartialState = None
    import torch

    use_cuda = torch.cuda.is_available() and not cpu
    if PartialState is not None:
        # accelerate only sets up multi-CPU (gloo) when told to use the CPU
        state = PartialState(cpu=not use_cuda)
        if state.num_processes != world:
            raise RuntimeError(
                f"accelerate sees {state.num_processes} process(es) but WORLD_SIZE={world}; "
                "refusing to run (every rank would sample every unit)"
            )
        import torch.distributed as tdist

        backend = tdist.get_backend() if tdist.is_initialized() else "none"
        return Dist(
            rank=state.process_index,
            world=state.num_processes,
            local_rank=state.local_process_index,
            device=state.device,
            backend=str(backend),
            launcher="accelerate",
        )
    import torch.distributed as tdist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(
        rank=tdist.get_rank(),
        world=tdist.get_world_size(),
        local_rank=local,
        device=torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"),
        backend=backend,
        launcher="torch.distributed",
    )

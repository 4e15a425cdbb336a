"""Data parallel recording on top of ``torch.distributed`` (no cluster code of our own).

``torchrun --nproc_per_node P -m langneurons record ...`` and ``accelerate launch`` start P
copies of the command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in the environment. `init_from_env` turns that into the default process group
(gloo for CPU tensors, plus NCCL for CUDA tensors when the ranks run on GPUs); everything else
here is a thin layer of the few collectives the recorder needs:

* `agree`: rank 0 decides (skip a finished language? refuse a run directory?) and every rank
  gets the same answer -- or the same error, so no rank is left waiting in a collective that
  the others will never reach;
* `all_reduce_sum`: counts are sums, so one SUM reduction combines the ranks exactly;
* `barrier`: the other ranks wait until rank 0 has written a language before they delete
  their partial counts (a language is done only when its stats file exists).

When a rank dies, torchrun stops the others; what was flushed is kept and the next run
resumes it.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import torch

from .errors import LangNeuronsError

T = TypeVar("T")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def env_world_size() -> int:
    """World size announced by the launcher (1 when not launched by torchrun/accelerate)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def init_from_env(device: str | None = None) -> tuple[int, int]:
    """Initialise the default process group when the launcher's environment asks for one.

    Does nothing when a group already exists (e.g. made by ``accelerate``) or when ``RANK`` /
    ``WORLD_SIZE`` are not set or the world has one process. On CUDA (unless ``device`` says
    cpu) each rank is pinned to its ``LOCAL_RANK`` GPU and the group gets both backends
    (``cpu:gloo,cuda:nccl``), so collectives work on CPU and GPU tensors alike.
    Returns (rank, world size).
    """
    if _dist_ready():
        return rank_world()
    if not torch.distributed.is_available():
        return 0, 1
    if "RANK" not in os.environ or env_world_size() <= 1:
        return 0, 1
    use_cuda = (torch.cuda.is_available() and torch.distributed.is_nccl_available()
                and not (device or "").startswith("cpu"))
    if use_cuda:
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        torch.distributed.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LangNeuronsError(f"cannot join the process group announced by RANK/WORLD_SIZE ({first}); "
                               "launch with torchrun or accelerate launch, or unset RANK and WORLD_SIZE") from None
    return rank_world()


def shutdown() -> None:
    """Destroy the default process group (only when one exists).

    All ranks meet at a barrier first: a rank that tears gloo down while its peer still has a
    collective or a socket open can make the peer abort ("terminate called without an active
    exception", seen on 2 CPU ranks when rank 0 was still cleaning up after the last barrier)."""
    if _dist_ready():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


def _collective_device() -> torch.device:
    # A group with gloo reduces CPU tensors; an NCCL-only group (made by someone else) needs CUDA.
    backend = str(torch.distributed.get_backend())
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """SUM-reduce each tensor over all ranks (exact for integer counts); results on the CPU."""
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return [t.cpu() for t in tensors]
    dev = _collective_device()
    out = []
    for t in tensors:
        buf = t.to(dev).contiguous()
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        out.append(buf.cpu())
    return out


def barrier() -> None:
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return
    # A one-element all_reduce is a barrier on every backend, without NCCL's device guessing.
    all_reduce_sum([torch.zeros(1, dtype=torch.int64)])


def agree(decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 only and return its result on every rank.

    A `LangNeuronsError` raised by ``decide`` is raised on every rank (same message); any
    other exception is re-raised on rank 0 and reported as a RuntimeError elsewhere. Either
    way no rank is left waiting for a collective the others will never reach.
    """
    rank, world = rank_world()
    if world == 1:
        return decide()
    box: list = [None]
    failure: BaseException | None = None
    if rank == 0:
        try:
            box[0] = ("ok", decide())
        except LangNeuronsError as exc:
            box[0] = ("error", exc)
        except BaseException as exc:  # noqa: BLE001 -- tell the others before dying
            failure = exc
            box[0] = ("crash", f"{type(exc).__name__}: {exc}")
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise value
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value

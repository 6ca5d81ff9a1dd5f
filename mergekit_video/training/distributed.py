"""DDP plumbing: process-group setup from torchrun's environment, and small collectives.

``torchrun --nproc-per-node N mergevid run recipe.yaml`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them (NCCL
on CUDA, gloo on the CPU). Without them it is a single process and every helper here is a
cheap no-op, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum_int",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup",
    "get_rank",
    "get_world_size",
    "host_group",
    "init_distributed",
    "is_distributed",
    "is_main_process",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``device`` and the ``backend``
    (``nccl``/``gloo``, None for a single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and prints)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(*, backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Single-process fallback when ``WORLD_SIZE`` is unset or 1: no process group, device
    ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. With several processes the
    backend is ``nccl`` on CUDA and ``gloo`` on the CPU unless ``backend`` says otherwise;
    each process uses GPU ``LOCAL_RANK``. Calling it again returns the existing group's info.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    if world == 1:
        return DistInfo(0, 1, local_rank, device, None)
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or ("nccl" if cuda else "gloo")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device, backend)


def is_distributed() -> bool:
    """True when a process group with more than one member is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    return get_rank() == 0


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(values: Mapping[str, float | int | torch.Tensor]) -> dict[str, float]:
    """Average scalar metrics over all processes; returns Python floats in sorted key order.

    Values are numbers or one-element tensors (any device; detached). Every rank must pass the
    same keys. One collective (and one device sync) for the whole dict.
    """
    keys = sorted(values)
    scalars = []
    for k in keys:
        v = values[k]
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"all_reduce_mean: {k!r} has {v.numel()} elements, expected a scalar")
            scalars.append(v.detach().reshape(()).to(torch.float64))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            scalars.append(torch.tensor(float(v), dtype=torch.float64))
        else:
            raise TypeError(f"all_reduce_mean: {k!r} is a {type(v).__name__}, expected a number or a scalar tensor")
    if not keys:
        return {}
    if not is_distributed():
        dev = next((s.device for s in scalars if s.device.type != "cpu"), torch.device("cpu"))
        return dict(zip(keys, torch.stack([s.to(dev) for s in scalars]).cpu().tolist()))  # one device read, not K
    device = _collective_device()
    buf = torch.stack([s.to(device) for s in scalars])  # [K]
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= dist.get_world_size()
    return dict(zip(keys, buf.cpu().tolist()))


_host_groups: dict[int, Any] = {}  # id of the default group -> its gloo twin (NCCL runs)


def host_group() -> Any:
    """The process group for host-side scalars (flags, counts): the default group under gloo, else a
    gloo group made on first use (every rank reaches that use at the same point, as for any collective).

    An all-reduce of a CPU tensor there waits for the other processes but not for the GPU; an NCCL
    all-reduce read back with ``.item()`` drains the GPU queue, which a per-step check cannot afford.
    """
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _host_groups:
        _host_groups[key] = dist.new_group(backend="gloo")
    return _host_groups[key]


def all_reduce_sum_int(value: int) -> int:
    """The sum of an integer over all processes (itself in a single process); every rank calls it.
    A host-side collective (:func:`host_group`): no GPU sync."""
    if not is_distributed():
        return int(value)
    buf = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=host_group())
    return int(buf.item())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (itself in a single process); every rank calls it.
    A host-side collective (:func:`host_group`): no GPU sync."""
    if not is_distributed():
        return bool(flag)
    buf = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=host_group())
    return bool(buf.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to all ranks; returns it everywhere."""
    if not is_distributed():
        return obj
    holder = [obj if get_rank() == src else None]
    device = _collective_device() if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(holder, src=src, device=device)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave and destroy the process group, if one is active."""
    if dist.is_available() and dist.is_initialized():
        _host_groups.clear()  # destroyed with the default group
        dist.destroy_process_group()

"""Multi-process data parallelism (torchrun): process group set-up and the few collectives training and
evaluation need.

Launch training with `torchrun --nproc_per_node=G main.py --config ... --workdir DIR --mode train`: every process
trains on its slice of the global batch (training.batch_size is the global batch), gradients are averaged by
DistributedDataParallel, and only rank 0 writes checkpoints, logs and sample grids. `--mode eval` and
`--mode sample` under torchrun share their independent pieces (sampling rounds, bits/dim batches, Inception
features) among the ranks with `share`; rank 0 alone writes the results. Several nodes: one torchrun per node
with --nnodes and a c10d rendezvous; the work directory must be on a file system all nodes see. Without torchrun
(no WORLD_SIZE in the environment, or WORLD_SIZE=1) every function here is the single-process identity.
"""

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment of torchrun (or torch.distributed.launch) asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device, timeout_minutes: float = 60.0) -> torch.device:
    """Join the process group described by torchrun's environment (if not joined yet); returns this process's
    device: cuda:LOCAL_RANK when training on CUDA with several processes, else `device` unchanged.

    CUDA: backend NCCL, the process's GPU made current before the group is created. CPU: backend gloo. The timeout
    is generous because rank 0 draws sample grids and evaluation losses while the other ranks wait at the next
    collective.
    """
    if not is_initialized() and not launched_by_torchrun():
        return device
    if not is_initialized():
        for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {name} is not set: launch multi-process "
                    "training with torchrun --nproc_per_node=G main.py ... (or unset WORLD_SIZE)."
                )
    if device.type == "cuda" and (launched_by_torchrun() or get_world_size() > 1):
        local_rank = int(os.environ.get("LOCAL_RANK", get_rank() % max(torch.cuda.device_count(), 1)))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's value on every rank (e.g. the Soft Truncation tau shared by one optimisation step)."""
    if get_world_size() == 1:
        return value
    holder = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(holder, src=0)
    return float(holder.item())


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a new tensor; the input is untouched)."""
    if get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / get_world_size()


def gather_objects(obj: Any) -> list:
    """[object of rank 0, object of rank 1, ...] on every rank (picklable objects, e.g. RNG states)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The (picklable) object of rank `src` on every rank, e.g. rank 0's list of the pieces still to compute."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def share(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of a list of independent jobs: items[rank::world_size] (round-robin; all of them in one
    process)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(items[rank::world_size])

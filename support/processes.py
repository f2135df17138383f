"""One process or several (torchrun): which one this is, its device, its log, and decisions every
process takes alike (rank 0's)."""
import os
import sys

import torch
import torch.distributed as dist


def start_processes(device: str) -> tuple[int, int, str]:
    """(rank, world size, device): one process, or one of several started by torchrun, each on its own
    GPU when the device is CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ValueError(f"process {local} of this machine needs GPU {local}, and it has "
                             f"{torch.cuda.device_count()}; start at most that many processes (--nproc_per_node)")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def rank0_values(device, *values) -> list[float]:
    """Rank 0's values of these numbers, on every process (so all of them take the same decision)."""
    t = torch.tensor([float(v) for v in values], device=device)
    dist.broadcast(t, 0)
    return t.tolist()


def summed_over_processes(device, value: float) -> float:
    t = torch.tensor([value], device=device)
    dist.all_reduce(t)
    return t.item()


def make_logger(master: bool):
    """print, on the first process only; a closed stdout (piped into head) stops the printing, not the run."""
    def log(*a):
        if not master:
            return
        try:
            print(*a, flush=True)
        except BrokenPipeError:
            sys.stdout = open(os.devnull, "w")
    return log


def shard_or_replicate(student, fsdp: bool, world: int):
    """What a training step calls: with --fsdp the student sharded in place across processes (FSDP2),
    with several processes its DDP wrapper, else the student itself."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in student.layers:
            fully_shard(block)
        fully_shard(student)
        return student
    return torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student

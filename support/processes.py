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


def end_processes(error: str | None = None):
    """The way out of train.py, on every path: with `error`, one line and exit status 1. A process that
    torchrun started destroys its process group after the last collective and then leaves at once,
    without the interpreter's shutdown: gloo's worker threads stop only when the group object is freed,
    and torch keeps references to it after destroy_process_group (DTensor's caches keep FSDP's device
    meshes, and torch._dynamo, imported during the run, keeps the default group), so the threads live on.
    One that releases its last collective's tensors while the interpreter shuts down needs the interpreter,
    and the process aborts ("terminate called without an active exception"; under load, 1 run in 13 of
    tests/test_train.py::test_two_processes_equal_one[fsdp])."""
    if not (dist.is_initialized() and "LOCAL_RANK" in os.environ):  # one process, or a caller in this one
        if dist.is_initialized():
            dist.destroy_process_group()
        if error:
            sys.exit(error)
        return
    dist.destroy_process_group()
    if error:
        print(error, file=sys.stderr)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(1 if error else 0)


def is_peer_loss(e: RuntimeError) -> bool:
    """A collective failed because another process of the run went away (killed, crashed)."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in ("by peer", "Connection closed", "NCCL error"))


def lost_peer(run, e: RuntimeError, resume: str) -> str:
    """The one line of a process whose peer died: what failed, and how the run continues."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". This is")[0]
    kept = f"{run.ckpt_path} holds step {run.last_good_step}" if run.last_good_step else "no checkpoint was written yet"
    return (f"process {run.rank} of {run.world}: another process of the run stopped ({first[:160]}); {kept}; "
            f"to continue: {resume}")


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


def shard_or_replicate(student, fsdp: bool, world: int, teacher=None, log=print):
    """With --fsdp the student sharded in place across processes (FSDP2), and the frozen teacher (a copy
    under full fine-tuning) sharded alike, each process holding its share of it; training calls their
    hidden() and output() (distill.TwoModels), so FSDP gathers the weights around those as around forward.
    With several processes unsharded, every process starts from rank 0's trained weights, and
    average_gradients keeps them equal."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        for model in (student, teacher) if teacher is not None and teacher is not student else (student,):
            whole = sum(p.numel() * p.element_size() for p in model.parameters())
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
            for method in ("hidden", "output"):
                register_fsdp_forward_method(model, method)
            held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
            log(f"{'teacher' if model is teacher else 'student'} weights sharded: {held / 2**20:.2f} MiB on this "
                f"process of {whole / 2**20:.2f} MiB")
    elif world > 1:
        with torch.no_grad():
            for p in student.parameters():
                if p.requires_grad:
                    dist.broadcast(p, 0)


def average_gradients(model, world: int):
    """Every process's gradients replaced by their mean over the processes (data parallelism), one
    all-reduce per dtype, after the step's last backward."""
    by_dtype = {}
    for p in model.parameters():
        if p.grad is not None:  # the same on every process: every trained weight gets a gradient in every step
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

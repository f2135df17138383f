"""Timing on a CPU or a GPU: the best of a few calls, what a GPU has finished, and the machine's
own ceilings (copy bandwidth, matrix-multiply rate) that a speed figure is held against.
"""
import math
import time

import torch


def best_seconds(fn, reps: int = 6) -> float:
    """The fastest of reps timed calls: the least disturbed by whatever else the machine runs."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidth_gbs(device, n_bytes=1 << 28, reps=5):
    """Measured copy bandwidth (read + write) in GB/s."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * n_bytes / best_seconds(lambda: finished(dst.copy_(src)), reps) / 1e9


def wait_for(device):
    """Return once the device has finished the work queued on it (a CPU has, at once)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def finished(t: torch.Tensor) -> torch.Tensor:
    """t, once the GPU has computed it (on a CPU it already has)."""
    wait_for(t.device)
    return t


def matmul_gflops(device, dtype, n=1024, reps=5):
    """Measured matrix-multiply rate (GFLOP/s) of an n x n x n product in this dtype."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / best_seconds(lambda: finished(a @ b), reps) / 1e9


def interleaved_seconds(calls: dict, rounds: int = 1, allowed_s: float = math.inf, device="cpu"):
    """Seconds per call of each of `calls` (name -> fn(round)), the calls taking turns round after round,
    so that a busy machine slows all of them alike. Round 0 warms up and stands in only for a call no
    timed round reached. No call starts once allowed_s have passed. Returns (seconds, cut short)."""
    t_begin, seconds, timed = time.perf_counter(), {}, dict.fromkeys(calls, 0)
    for r in range(rounds + 1):
        for name, call in calls.items():
            if time.perf_counter() - t_begin > allowed_s:
                return {n: s / max(timed[n], 1) for n, s in seconds.items()}, True
            t0 = time.perf_counter()
            call(r)
            wait_for(device)
            dt = time.perf_counter() - t0
            seconds[name] = seconds[name] + dt if timed[name] else dt
            timed[name] += r > 0
    return {n: s / max(timed[n], 1) for n, s in seconds.items()}, False

"""CPU kernel choice and timing: what decoding uses to run fast on the CPU it finds.

A decode pass multiplies every weight matrix by a few rows (one token, or the accepted tokens and
their masks). Which kernel streams the weights fastest for that depends on the CPU and the dtype,
so it is measured on this machine, once per case, rather than assumed:
- cpu_bf16_is_fast: does this CPU compute bfloat16 faster than float32 (AVX512-BF16 or AMX), or
  ~50-200x slower (AVX2 only)?
- use_few_row_kernels(model): swap every nn.Linear for FewRowLinear, which picks between F.linear
  and W @ x^T per dtype, row count and weight shape (few_row_kernel_wins).
"""
import functools
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def best_seconds(fn, reps: int = 6) -> float:
    """The fastest of reps timed calls: the least disturbed by whatever else the machine runs."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Does this CPU multiply bfloat16 matrices faster than float32? With AVX512-BF16 or AMX it does
    (~3x); with AVX2 only (most laptops) bfloat16 is ~50-200x SLOWER. Measured once, on one thread
    (a busy second core would otherwise swamp the timing), in about 0.1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def seconds(dtype):
        a, b = torch.randn(64, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        return best_seconds(lambda: a @ b)
    try:
        return seconds(torch.bfloat16) < seconds(torch.float32)
    finally:
        torch.set_num_threads(threads)


def cpu_flags() -> str:
    """The lscpu flags that decide bfloat16 speed, for logs ('' if none or not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return ""
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def fast_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """dtype, unless it is a half type on a CPU that computes it slowly: then float32."""
    slow = torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_bf16_is_fast()
    return torch.float32 if slow else dtype


class FewRowLinear(nn.Linear):
    """nn.Linear with a second kernel for the few rows of a decode pass on a CPU: W @ x^T (a
    matrix-vector product for one row). bfloat16 with AMX: W @ x^T is ~25% faster; float32 with MKL:
    F.linear here, W @ x^T on some AVX2 CPUs. Gradients, GPUs and large batches use nn.Linear."""

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > 32 or torch.is_grad_enabled() or \
                not few_row_kernel_wins(x.dtype, 1 << (rows - 1).bit_length(), *self.weight.shape):
            return super().forward(x)
        x2 = x.reshape(rows, -1)
        y = torch.mv(self.weight, x2[0])[None] if rows == 1 else torch.mm(self.weight, x2.t()).t().contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


@functools.cache
def few_row_kernel_wins(dtype: torch.dtype, rows: int, n_out: int, n_in: int) -> bool:
    """Is W @ x^T at least 10% faster than F.linear for `rows` rows through an n_out x n_in weight
    of this dtype on this CPU? Timed once (best_seconds) over copies of the weight that together
    exceed the caches, so that both kernels stream from memory, as in a decode pass."""
    copies = max(1, (32 << 20) // (n_out * n_in * torch.finfo(dtype).bits // 8))
    ws = [torch.randn(n_out, n_in, dtype=dtype) for _ in range(copies)]
    x = torch.randn(rows, n_in, dtype=dtype)

    def seconds(product):
        return best_seconds(lambda: [product(w) for w in ws])
    few = (lambda w: torch.mv(w, x[0])) if rows == 1 else (lambda w: torch.mm(w, x.t()).t().contiguous())
    return seconds(few) < 0.9 * seconds(lambda w: F.linear(x, w))


def use_few_row_kernels(model: nn.Module) -> nn.Module:
    """Swap every plain nn.Linear of model for a FewRowLinear holding the same parameters."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                swapped = FewRowLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                       device="meta")
                swapped.weight, swapped.bias = child.weight, child.bias
                setattr(parent, name, swapped)
    return model


if __name__ == "__main__":  # what the kernels see on this CPU
    print(f"cpu flags: {cpu_flags() or 'none'}; bfloat16 is fast: {cpu_bf16_is_fast()}")

"""CPU kernel choice and timing: what decoding uses to run fast on the CPU it finds.

A decode pass multiplies every weight matrix by a few rows (one token, or the accepted tokens and
their masks). Which kernel streams the weights fastest for that depends on the CPU and the dtype,
so it is measured on this machine, once per case, rather than assumed:
- cpu_bf16_is_fast: does this CPU compute bfloat16 faster than float32 (AVX512-BF16 or AMX), or
  ~50-200x slower (AVX2 only)?
- use_few_row_kernels(model): swap every nn.Linear for FewRowLinear, with the fastest of F.linear,
  W @ x^T, oneDNN's and MKL's packed GEMMs for each dtype, row count and weight shape, timed on the
  model's own weights (a gated-LoRA adapter's products too); a pass of r rows may run padded to a
  row count where a kernel is faster.
"""
import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import GatedLoRALinear
from model import Linear
from support.timing import best_seconds


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


def machine(device="cpu") -> str:
    """The machine class a speed figure belongs to: the CPU model, cores, the flags that decide bfloat16
    speed and whether it is fast here (or the GPU's name)."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    try:
        name = Path("/proc/cpuinfo").read_text().split("model name", 1)[1].split(":", 1)[1].split("\n")[0].strip()
    except (OSError, IndexError):
        name = "unknown CPU"
    bf16 = "bfloat16 fast" if cpu_bf16_is_fast() else "bfloat16 slow (float32 only)"
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {cpu_flags() or 'no avx2'}, {bf16}, torch {torch.__version__}"


def fast_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """dtype, unless it is a half type on a CPU that computes it slowly: then float32."""
    slow = torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_bf16_is_fast()
    return torch.float32 if slow else dtype


# -----------------------------------------------------------------------------
# the few-row kernels of a decode pass, chosen by timing them on the model's own weights

BUCKETS = (1, 2, 4, 8, 16, 32)  # row counts that are timed; a pass of r rows runs at a bucket >= r
SAMPLE_BYTES = 64 << 20  # the weights of one shape timed per kernel: more than the caches hold


def mkl_packed_works() -> bool:
    """Does this torch build have MKL's packed float32 GEMM (the path of torch's CPU compiler for
    frozen linears), and does it compute a product right here?"""
    try:
        w, x = torch.randn(8, 16), torch.randn(4, 16)
        y = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 4), w, None, 4)
        return torch.allclose(y, F.linear(x, w), atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


def dnnl_packed_works(dtype: torch.dtype) -> bool:
    """Does this torch build have oneDNN's linear on a weight reordered once into its own blocked
    layout (the path of torch's CPU compiler for frozen bfloat16 linears), for this dtype, and does
    it compute a product right here?"""
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(8, 16, generator=g).to(dtype), torch.randn(4, 16, generator=g).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], "")
        return torch.allclose(y.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2)  # bfloat16: one ulp
    except (AttributeError, RuntimeError):
        return False


class FewRowLinear(nn.Linear):
    """nn.Linear with the fastest measured kernel for the few rows of a decode pass on a CPU. plan
    maps a row count to (kernel, rows it runs at): a pass of 3 rows may run padded to 4, where a
    kernel is faster. Kernels: F.linear; W @ x^T (a matrix-vector product for one row; bfloat16 with
    AMX is faster this way); oneDNN's GEMM, with the weight reordered once for every row count
    (dnnl: 2-3x F.linear in float32 on an AMD EPYC); MKL's packed GEMM, float32, with the weight
    packed once for one row count (packed[rows]). Gradients, GPUs, autocast, larger passes and a
    weight changed since it was packed use nn.Linear."""
    plan: dict = {}
    packed: dict = {}
    dnnl = None
    packed_version = None

    @classmethod
    def on(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "FewRowLinear":
        """A FewRowLinear holding these very tensors (no copy)."""
        layer = cls(weight.size(1), weight.size(0), bias=bias is not None, device="meta")
        layer.weight, layer.bias = weight, bias
        return layer

    def forward(self, x, gate=None):  # gate: as model.Linear, which this stands in for, it is not read
        rows = x.numel() // x.size(-1)
        run = self.plan.get(rows)
        if run is None or torch.is_grad_enabled() or not x.is_cpu or torch.is_autocast_enabled("cpu") or \
                (self.packed_version is not None and self.weight._version != self.packed_version):
            return F.linear(x, self.weight, self.bias)
        kernel, run_rows = run
        if run_rows == rows and kernel in ("linear", "dnnl-packed"):  # these take x as it is (..., in)
            return KERNELS[kernel](self, x)
        x2 = x.reshape(rows, -1)
        if run_rows > rows:
            x2 = F.pad(x2, (0, 0, 0, run_rows - rows))
        y = KERNELS[kernel](self, x2)[:rows]
        return y.reshape(*x.shape[:-1], -1)


def linear_kernel(layer, x):
    return F.linear(x, layer.weight, layer.bias)


def mv_kernel(layer, x):
    y = torch.mv(layer.weight, x[0])[None] if len(x) == 1 else torch.mm(layer.weight, x.t()).t().contiguous()
    return y if layer.bias is None else y + layer.bias


def mkl_kernel(layer, x):
    return torch.ops.mkl._mkl_linear(x, layer.packed[len(x)], layer.weight, layer.bias, len(x))


def dnnl_kernel(layer, x):
    return torch.ops.mkldnn._linear_pointwise(x, layer.dnnl, layer.bias, "none", [], "")


KERNELS = {"linear": linear_kernel, "mv": mv_kernel, "dnnl-packed": dnnl_kernel, "mkl-packed": mkl_kernel}
PACKED = ("dnnl-packed", "mkl-packed")  # the kernels that hold a copy of the weight


def available_kernels(dtype: torch.dtype, pack: bool) -> tuple[str, ...]:
    """The kernels that can serve this dtype here (pack: the packed ones too, each checked once)."""
    if not pack:
        return ("linear", "mv")
    packed = (["dnnl-packed"] if dnnl_packed_works(dtype) else []) + \
        (["mkl-packed"] if dtype == torch.float32 and mkl_packed_works() else [])
    return ("linear", "mv", *packed)


TIMED = {}  # (dtype, weight shape, rows, kernels) -> kernel_seconds


def kernel_seconds(layers: list[FewRowLinear], rows: int, kernels: tuple[str, ...]) -> dict[str, float]:
    """Seconds for `rows` rows through these layers (one weight shape and dtype) by each of these
    kernels, the best of 3; each case is timed once per process."""
    w = layers[0].weight
    key = (w.dtype, tuple(w.shape), rows, kernels)
    if key not in TIMED:
        TIMED[key] = time_kernels(layers, rows, kernels)
    return TIMED[key]


def time_kernels(layers, rows, kernels):
    """kernel_seconds, timed. The weights packed for it stay on the layers, for use_few_row_kernels
    to keep or drop."""
    w = layers[0].weight
    x = torch.randn(rows, w.size(1), dtype=w.dtype)
    for layer in layers:
        if "dnnl-packed" in kernels and layer.dnnl is None:
            layer.dnnl = torch.ops.mkldnn._reorder_linear_weight(layer.weight, None)
        if "mkl-packed" in kernels:
            layer.packed = {**layer.packed, rows: torch.ops.mkl._mkl_reorder_linear_weight(layer.weight, rows)}
    return {k: best_seconds(lambda: [KERNELS[k](layer, x) for layer in layers], reps=3) for k in kernels}


def plan_of(seconds: dict[int, dict[str, float]]) -> dict[int, tuple[str, int]]:
    """rows -> (kernel, rows it runs at): the fastest kernel at any timed bucket that holds the rows.
    F.linear and W @ x^T run a pass at its own rows unless a larger bucket is faster (bfloat16 W @ x^T
    with AMX: 2 rows cost less than one); the packed GEMM runs at the bucket it was packed for."""
    plan = {}
    for rows in range(1, max(seconds) + 1):
        holds = [b for b in seconds if b >= rows]
        _, kernel, b = min((seconds[b][k], k, b) for b in holds for k in seconds[b])
        plan[rows] = (kernel, b if kernel == "mkl-packed" or b > min(holds) else rows)
    return plan


class FewRowGatedLoRA(GatedLoRALinear):
    """A gated-LoRA projection (lora.py) whose update, in a decode pass, runs its two products x A^T and
    h B^T with their own few-row kernels: at rank 128 on SmolLM2 they read 27% more bytes than the
    base's products in a pass with masks. The products are FewRowLinear on the same weights, held as a
    plain attribute, not submodules, so that nothing is saved twice."""

    def forward(self, x, gate):
        if gate is None or gate is True:  # no <MTP> row, or training's branch passes: as lora.py computes it
            return super().forward(x, gate)
        down, up = self.products
        return torch.add(self.base(x), up(down(x) * gate), alpha=self.scale)


def adapter_products(layer: GatedLoRALinear, give: bool = True) -> tuple:
    """A gated-LoRA layer's two products (give: made the first time, the layer becoming a FewRowGatedLoRA)."""
    if give and "products" not in layer.__dict__:
        layer.__dict__["products"] = tuple(FewRowLinear.on(w) for w in (layer.lora_a, layer.lora_b))
        layer.__class__ = FewRowGatedLoRA
    return layer.__dict__.get("products", ())


def few_row_layers(model: nn.Module, give_products: bool = True) -> list[FewRowLinear]:
    """model's FewRowLinear modules, and its gated-LoRA layers' products (adapter_products;
    give_products=False: only those already given)."""
    layers = [m for m in model.modules() if isinstance(m, FewRowLinear)]
    adapters = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]
    return layers + [p for m in adapters for p in adapter_products(m, give_products)]


def packed_copies(layer: FewRowLinear) -> int:
    """How many packed copies of its weight a layer holds."""
    return len(layer.packed) + (layer.dnnl is not None)


def packed_summary(model: nn.Module) -> str:
    """One line on the packed weights a model holds, and their memory ('' if none)."""
    given = few_row_layers(model, give_products=False)
    layers = [m for m in given if packed_copies(m)]
    if not layers:
        return ""
    extra = sum(packed_copies(layer) * layer.weight.nbytes for layer in layers)
    dnnl = sum(layer.dnnl is not None for layer in layers)
    rows = sorted({b for layer in layers for b in layer.packed})
    kinds = ([f"oneDNN's for {dnnl} of {len(given)} products"] if dnnl else []) + \
        ([f"MKL's for passes of {', '.join(map(str, rows))} rows"] if rows else [])
    return (f"kernels: packed weights where they are the fastest kernel measured, {' and '.join(kinds)} "
            f"(+{extra / 2**20:.0f} MiB)")


@torch.no_grad()
def use_few_row_kernels(model: nn.Module, max_rows: int = 32, pack: bool = False) -> nn.Module:
    """Swap every plain nn.Linear of model for a FewRowLinear holding the same parameters, and give
    each the fastest kernel, timed here on the model's own weights, for passes of 1..max_rows rows
    (at most 32). pack: oneDNN's and MKL's packed GEMMs are candidates too, and their packed weights
    are kept where they win, within a quarter of the memory still free; only for weights that stay
    as they are (decoding). packed_summary says what they cost. A model that is not on the CPU is
    left as it is: these are CPU kernels."""
    if next(model.parameters()).device.type != "cpu":
        return model
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in (nn.Linear, Linear):
                setattr(parent, name, FewRowLinear.on(child.weight, child.bias))
    groups = {}  # layers by weight dtype and shape: each group gets one plan
    for layer in few_row_layers(model):
        if layer.weight.device.type == "cpu":
            groups.setdefault((layer.weight.dtype, tuple(layer.weight.shape)), []).append(layer)
    buckets = [b for b in BUCKETS if b < 2 * min(max_rows, 32)]
    budget, packed_bytes = free_memory_bytes() / 4, 0
    kernels = {dtype: available_kernels(dtype, pack) for dtype, _ in groups}
    for (dtype, _), group in groups.items():
        sample = group[:max(1, SAMPLE_BYTES // group[0].weight.nbytes)]
        seconds = {b: kernel_seconds(sample, b, kernels[dtype]) for b in buckets}
        group_bytes = sum(layer.weight.nbytes for layer in group)
        for left_out in ((), ("mkl-packed",), PACKED):  # the packed kernels that fit the memory left
            plan = plan_of({b: {k: s for k, s in ks.items() if k not in left_out} for b, ks in seconds.items()})
            mkl_rows = sorted({b for kernel, b in plan.values() if kernel == "mkl-packed"})
            dnnl = any(kernel == "dnnl-packed" for kernel, _ in plan.values())
            if packed_bytes + (len(mkl_rows) + dnnl) * group_bytes <= budget:
                break
        for layer in group:
            layer.plan = plan
            layer.packed = {b: layer.packed[b] if b in layer.packed else
                            torch.ops.mkl._mkl_reorder_linear_weight(layer.weight, b) for b in mkl_rows}
            layer.dnnl = (layer.dnnl if layer.dnnl is not None else
                          torch.ops.mkldnn._reorder_linear_weight(layer.weight, None)) if dnnl else None
            layer.packed_version = layer.weight._version if packed_copies(layer) else None
            packed_bytes += packed_copies(layer) * layer.weight.nbytes
    return model


def free_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else what the machine has."""
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


if __name__ == "__main__":  # what the kernels see on this CPU
    print(f"cpu flags: {cpu_flags() or 'none'}; bfloat16 is fast: {cpu_bf16_is_fast()}")
    print(f"machine: {machine()}")


def use_decode_kernels(model):
    """Time and choose the few-row kernels for the passes the model's block can feed."""
    k_max = model.cfg.k_max or 16
    use_few_row_kernels(model, max_rows=min(k_max * k_max, 32), pack=True)

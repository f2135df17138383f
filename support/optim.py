"""Precision and memory: the optimizer, autocast, and what a run costs per device.

AdamW keeps a float32 master copy of every low-precision weight, so that bfloat16 training keeps
every update; memory_estimate says what a run needs before it starts, and plan_memory turns
activation checkpointing on when the device would not hold it otherwise.
"""
import contextlib
import ctypes
import ctypes.util
import functools
import math
import os

import torch
import torch.nn as nn

from support.cpu_kernels import cpu_bf16_is_fast, cpu_flags


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay), the same arithmetic as torch.optim.AdamW, except that a
    parameter stored in a low-precision dtype gets a float32 master copy in the optimizer state: the
    update is applied to the master and the parameter becomes its rounding. A bfloat16 weight alone
    silently drops every update smaller than half its ulp (|w| / 256): at lr 1e-5 most of the model."""

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.dtype != torch.float32:
                        state["master"] = p.detach().float()
                w = state.get("master", p)
                g = p.grad.float()
                state["step"] += 1
                t = state["step"].item()
                w.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                w.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
                if w is not p:
                    p.copy_(w)

    def load_state_dict(self, state_dict):
        """As torch's, except that the moments and the master copy keep the float32 they were saved in
        (torch casts them to the parameter's dtype, which would round a bfloat16 run's master copy)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for p, i in zip(params, ids):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step":
                    self.state[p][key] = value.to(device=p.device)


def make_optimizer(student, args) -> AdamW:
    """AdamW over the trained parameters, with weight decay on the matrices only."""
    trainable = [p for p in student.parameters() if p.requires_grad]
    return AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}], lr=args.lr, betas=args.betas)


def memory_estimate(cfg, n_params, args, world=1, checkpointing=False, n_trained=None):
    """GiB per device for a run: weights, gradients, AdamW moments, master copy, teacher, activations.
    Activations: what backward keeps per token and layer (norms, q/k/v, attention, the SwiGLU
    products) at the longest layout (k = k_max), plus the float32 logits at the predicted slots.
    Gated LoRA (n_trained adapter parameters): no teacher copy, and backward keeps only the branch
    slots; the ground truth leaves its keys and values in a cache."""
    w = torch.finfo(getattr(torch, args.dtype)).bits // 8
    c = 2 if args.amp in ("bfloat16", "float16") else w  # bytes of what the matmuls produce
    shard = world if args.fsdp else 1
    n, t = n_params, n_params if n_trained is None else n_trained
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    branches = math.ceil(args.seq_len / args.branch_every)
    tokens = args.batch_size * ((0 if args.lora else args.seq_len) + branches * (args.k_max - 1))
    cache = 2 * w * kvd * cfg.n_layers * args.batch_size * args.seq_len if args.lora else 0
    per_token_layer = (8 + 2 * c) * cfg.dim + c * (4 * qd + 4 * kvd) + 4 * c * cfg.hidden_dim
    per_token_layer += (4 + c) * (qd + kvd) if cfg.qk_norm else 0  # Qwen3's q/k norms keep float32 inputs
    layers = tokens * per_token_layer * (1 if checkpointing else cfg.n_layers)
    if checkpointing:  # block inputs of every layer, and one block recomputed at a time
        layers += tokens * c * cfg.dim * cfg.n_layers
    logits = 3 * 4 * args.batch_size * branches * args.k_max * cfg.vocab_size
    parts = {"weights": n * w / shard, "grads": t * w / shard, "adamw": 8 * t / shard,
             "master": (4 * t if w < 4 else 0) / shard, "autocast copies": (2 * n if c < w else 0) / shard,
             "teacher": 0 if args.lora else n * w / shard, "activations": layers + logits + cache}
    return {k: v / 2**30 for k, v in parts.items()}


def plan_memory(student, args, world, log):
    """Print the memory estimate; turn activation checkpointing on if the device needs it."""
    n = sum(p.numel() for p in student.parameters())
    n_trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    if args.device.startswith("cuda"):
        available = torch.cuda.get_device_properties(args.device).total_memory / 2**30
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gib = memory_estimate(student.cfg, n, args, world, n_trained=n_trained)
    on = args.checkpoint_activations == "on" or (args.checkpoint_activations == "auto"
                                                 and sum(gib.values()) > 0.9 * available)
    if on:
        gib = memory_estimate(student.cfg, n, args, world, checkpointing=True, n_trained=n_trained)
    student.checkpointing = on
    log("memory per device (GiB, estimate): " + ", ".join(f"{k} {v:.2f}" for k, v in gib.items() if v)
        + f"; total {sum(gib.values()):.1f} of {available:.0f}" + (" (activation checkpointing on)" if on else ""))


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # no glibc (macOS, musl): nothing to call
        return None


def return_freed_memory():
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). A CPU step frees tensors of
    many sizes and glibc keeps their pages for later use: without this, the CPU hour's process held about
    twice the memory it used by its second pass over the data (docs/LOG.md)."""
    if trim := _malloc_trim():
        trim(0)


@contextlib.contextmanager
def autocast(args, model=None):
    """torch.autocast to --amp (nothing for none); given the model, its frozen projections and output
    layer are read from low-precision copies made once (cast_frozen_weights)."""
    if args.amp == "none":
        yield
        return
    dtype = getattr(torch, args.amp)
    with torch.autocast(args.device.split(":")[0], dtype=dtype), \
            cast_frozen_weights(None if getattr(args, "fsdp", False) else model, dtype):  # FSDP owns its weights
        yield


@contextlib.contextmanager
def cast_frozen_weights(model, dtype):
    """Inside, each frozen float32 nn.Linear of model holds a `dtype` copy of its weight (and bias),
    made the first time and kept while the weight is unchanged. torch's autocast keeps its casts of
    trained weights only: a frozen one is cast anew at every call, 16% of a gated-LoRA step on a CPU
    (scripts/profile_step.py). A copy is the rounding autocast makes, so every product is the same."""
    swapped = []
    for layer in () if model is None else model.modules():
        w = getattr(layer, "weight", None)
        if not isinstance(layer, nn.Linear) or w.requires_grad or w.dtype != torch.float32:
            continue
        version = (dtype, w._version)
        if getattr(layer, "cast_copy", (None,))[0] != version:
            cast = lambda t: None if t is None else nn.Parameter(t.detach().to(dtype), requires_grad=False)  # noqa: E731
            layer.cast_copy = (version, cast(w), cast(layer.bias))
        swapped.append((layer, w, layer.bias))
        layer.weight, layer.bias = layer.cast_copy[1:]
    try:
        yield
    finally:
        for layer, w, bias in swapped:
            layer.weight, layer.bias = w, bias


def drop_frozen_copies(model):
    """Let go of cast_frozen_weights' copies (a run that chose float32 has no use for them)."""
    for layer in model.modules():
        layer.__dict__.pop("cast_copy", None)


def describe_setup(student, args, world: int) -> str:
    """The log lines of a run's model and precision: its weights and its matrix products."""
    where = f"{args.device} ({cpu_flags() or 'no avx2/avx512 flags'})" if args.device == "cpu" else args.device
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    model = (f"model {args.init}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params, "
             f"{f'gated LoRA rank {args.lora}: {trained / 1e6:.2f}M trained' if args.lora else 'all trained'}, "
             f"mask id {student.cfg.mask_id}, {world} process(es) on {where}")
    matmuls = {"auto": "bfloat16 or float32, timed on a real step below", "none": args.dtype}.get(args.amp, args.amp)
    fast = f" (bfloat16 is {'fast' if cpu_bf16_is_fast() else 'slow'} on this CPU, measured)" if args.device == "cpu" else ""
    return (f"{model}\nprecision: {args.dtype} weights{' + float32 master copy' if args.dtype != 'float32' else ''}, "
            f"matmuls in {matmuls}{fast}")

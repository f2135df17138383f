"""A training run's plan, made before any download: the model's shape from its config alone, what each
way of training it holds in memory (support.optim.memory_estimate), and the first that fits the device.

    plan = plan_run(args, world)      # python train.py --init qwen3-4b --plan [--gpu-memory 24]
    print(plan.line())

"Fits" means an estimate of at most FITS of the memory that is free: on a GPU what torch says is free
(or --gpu-memory GiB, a card that is not there), on a CPU MemAvailable. The ways, in order: the recipe
as it is (the paper's full fine-tune on a GPU), with activation checkpointing, then with smaller
micro-batches at the same global batch, then gated LoRA with fewer trained blocks. A flag given on
the command line (--lora, --checkpoint-activations, --batch-size) is kept, or the run is refused.
"""
import argparse
import bisect
import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from support.cpu_kernels import free_memory_bytes
from support.optim import memory_estimate
from support.weights import PRESETS

FITS = 0.9  # of the free memory
# gated LoRA where the full fine-tune does not fit: (rank, top blocks, 0 = all), the most first
LORA_CHOICES = ((128, 0), (128, 16), (64, 8), (32, 4))
FROZEN_GIB = 8  # at most this much memory for the frozen rows kept between passes over the data (keep_frozen_rows)
# a CPU run's process beyond what memory_estimate counts: torch, the tokenizer, the data, the weights' loading
# (a process that loads SmolLM2 peaks at 1.3 GiB resident, 0.5 of it the float32 weights)
PROCESS_GIB = 1.0
LORA_LR = 1e-3  # the CPU hour's gated-LoRA learning rate, chosen on SmolLM2 (docs/LOG.md)
# seconds per step measured for Qwen3-4B's shape under the paper's recipe on one H200 (docs/GPU.md)
STEP_SECONDS = {("qwen3-4b", "full", False): 2.7, ("qwen3-4b", "full", True): 3.98}


def n_params(cfg) -> int:
    """The parameters of a model of this shape (with the <MTP> row's embedding)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    block = cfg.dim * (2 * q + 2 * kv) + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim
    block += 2 * cfg.head_dim if cfg.qk_norm else 0
    block += q + 2 * kv if cfg.attn_bias else 0
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * block + cfg.dim


def n_adapter(cfg, rank: int, layers: int) -> int:
    """Gated LoRA's trained parameters: A and B of every projection in the top `layers` blocks (0: all)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_block = rank * ((cfg.dim + q) * 2 + (cfg.dim + kv) * 2 + (cfg.dim + cfg.hidden_dim) * 3)
    return (layers or cfg.n_layers) * per_block + cfg.dim


@dataclass
class Plan:
    method: str               # "full fine-tune" or "gated LoRA rank R in the top N blocks"
    lora: int
    lora_layers: int
    checkpointing: bool
    batch_size: int
    grad_accum: int
    gib: float                # the estimate
    free_gib: float
    where: str                # "GPU", "a 24 GiB GPU (--gpu-memory)", "CPU"
    checkpoint_gib: float     # one training checkpoint (in host memory while it is written, under --fsdp)
    step_seconds: float | None
    steps_in_budget: int | None
    switched: bool = False    # gated LoRA where the recipe is the full fine-tune
    frozen_gib: float = 0.0   # gated LoRA: memory for the frozen rows kept between passes over the data

    def line(self) -> str:
        step = (f"a step about {self.step_seconds:.1f} s (measured on an H200), about {self.steps_in_budget:,} "
                f"steps in the budget" if self.step_seconds else "the step time is not measured for this plan")
        paper = " (not the paper's full fine-tune; --lr 1e-3, the CPU hour's)" if self.switched else ""
        frozen = f"; frozen rows kept in up to {self.frozen_gib:.1f} GiB" if self.frozen_gib else ""
        return (f"plan: {self.method}{paper}, activation checkpointing {'on' if self.checkpointing else 'off'}, "
                f"micro-batch {self.batch_size} x {self.grad_accum}{frozen}; {self.gib:.1f} GiB estimated of "
                f"{self.free_gib:.1f} free on {self.where} (fits: at most {FITS:.0%}); checkpoints of "
                f"{self.checkpoint_gib:.1f} GiB, twice that on disk while one replaces the other; {step}")


def free_memory(args) -> tuple[float, str]:
    """GiB free for the run, and where."""
    if args.gpu_memory:
        return args.gpu_memory, f"a {args.gpu_memory:g} GiB GPU (--gpu-memory)"
    if args.device.startswith("cuda"):
        return torch.cuda.mem_get_info(args.device)[0] / 2**30, torch.cuda.get_device_name(args.device)
    return available_host_gib(), "this CPU (MemAvailable)"


def available_host_gib() -> float:
    return free_memory_bytes() / 2**30


def candidates(cfg, args):
    """(lora, lora_layers, checkpointing, batch_size, grad_accum) in the order they are tried."""
    given = args.given
    loras = [(args.lora, args.lora_layers)]
    if "lora" not in given and not args.lora and args.device != "cpu" and not args.fsdp:
        loras += [(rank, min(layers, cfg.n_layers)) for rank, layers in LORA_CHOICES if rank <= cfg.dim]
    checkpointing = {"on": [True], "off": [False]}.get(args.checkpoint_activations, [False, True])
    batches = [args.batch_size]
    if "batch_size" not in given:
        while batches[-1] > 1:
            batches.append(batches[-1] // 2)
    for lora, layers in loras:
        for batch in batches:
            for ckpt in checkpointing if batch == batches[0] else checkpointing[-1:]:
                yield lora, layers, ckpt, batch, args.batch_size * args.grad_accum // batch


def plan_run(args, cfg, world: int = 1) -> Plan:
    """The first way to train that fits, or a ValueError that says what is missing."""
    free, where = free_memory(args)
    smallest = None
    for lora, layers, ckpt, batch, accum in candidates(cfg, args):
        trial = argparse.Namespace(**{**vars(args), "lora": lora, "batch_size": batch})
        trained = n_adapter(cfg, lora, layers) if lora else None
        gib = sum(memory_estimate(cfg, n_params(cfg) + (trained or 0), trial, world, ckpt, trained).values())
        gib += PROCESS_GIB if args.device == "cpu" else 0
        smallest = min(smallest or gib, gib)
        if gib <= FITS * free:
            return finish_plan(args, cfg, lora, layers, ckpt, batch, accum, gib, free, where)
    instead = "shard it over several GPUs (--fsdp)" if args.device != "cpu" else "use a machine with more memory"
    raise ValueError(f"{args.init} does not fit {where}: the smallest way to train it needs about "
                     f"{smallest:.1f} GiB, and {FITS:.0%} of {free:.1f} GiB free is {FITS * free:.1f}; free memory, "
                     f"use a smaller model, or {instead}")


def finish_plan(args, cfg, lora, layers, ckpt, batch, accum, gib, free, where) -> Plan:
    w = torch.finfo(getattr(torch, args.dtype)).bits // 8
    trained = n_adapter(cfg, lora, layers) if lora else n_params(cfg)
    state_bytes = trained * (w + (4 if w < 4 else 0) + 8)  # weights, float32 master copy, two moments
    blocks = f"the top {layers}" if layers and layers < cfg.n_layers else f"all {cfg.n_layers}"
    method = f"gated LoRA rank {lora} in {blocks} blocks" if lora else "full fine-tune"
    preset = next((name for name, repo in PRESETS.items() if args.init in (name, repo)), args.init)
    recipe_batch = batch == args.batch_size and not {"batch_size", "grad_accum", "seq_len"} & set(args.given)
    step = STEP_SECONDS.get((preset, "lora" if lora else "full", ckpt)) if recipe_batch else None  # measured so only
    steps = int(args.max_minutes * 60 / step) if step and args.max_minutes else None
    frozen = min(FROZEN_GIB, FITS * free - gib) if lora and args.cache_frozen == "on" else 0.0
    return Plan(method, lora, layers, ckpt, batch, accum, gib, free, where, state_bytes / 2**30, step, steps,
                switched=bool(lora) and not args.lora, frozen_gib=frozen)


def plan_before_download(args, cfg) -> bool:
    """The plan, said on the first process; on a GPU put into args. True: --plan, nothing to run."""
    plan = plan_run(args, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if os.environ.get("RANK", "0") == "0":
        print(plan.line(), flush=True)
    if not args.plan:
        apply_plan(plan, args, Path(args.out))
    return args.plan


def apply_plan(plan: Plan, args, out: Path):
    """The settings of the plan, into the run's arguments. On a GPU a run is refused before it starts if two
    checkpoints would not fit the disk of its --out, or, under --fsdp, where one is gathered whole in host
    memory to be written (support/checkpoint.py), one the memory available. On a CPU they are small, and a
    save that meets a full disk says so in one line (support/files.py)."""
    if plan.switched and "lr" not in args.given:
        args.lr = LORA_LR
    args.lora, args.lora_layers = plan.lora, plan.lora_layers
    args.checkpoint_activations = "on" if plan.checkpointing else "off"
    args.batch_size, args.grad_accum = plan.batch_size, plan.grad_accum
    args.frozen_gib = plan.frozen_gib
    if not args.device.startswith("cuda"):
        return
    if args.fsdp and plan.checkpoint_gib > (host := available_host_gib()):
        raise ValueError(f"a checkpoint of this run is gathered in host memory to be written: {plan.checkpoint_gib:.1f} "
                         f"GiB, and {host:.1f} GiB is available; free memory, or train with --lora")
    existing = out if out.exists() else out.resolve().parent
    free = shutil.disk_usage(existing).free / 2**30
    if 2 * plan.checkpoint_gib > free:
        raise ValueError(f"{out} has {free:.1f} GiB free on its disk; the run's checkpoints need "
                         f"{2 * plan.checkpoint_gib:.1f} (old and new side by side while one is written)")


def keep_frozen_rows(frozen, model, args, n_texts: int, log):
    """Under gated LoRA the real rows, the mask slots below the lowest adapter and the original's argmax are
    the same in every pass over the data (distill.py, FrozenRowsForwards): the texts whose rows fit in the
    plan's frozen_gib are kept, and the others' are made for each step alone. None where none fit."""
    precision = getattr(torch, args.amp) if args.amp != "none" else None
    dtype = model.embed_tokens.weight.dtype
    limit = getattr(args, "frozen_gib", FROZEN_GIB) * 2**30
    running = list(itertools.accumulate(frozen.text_bytes(i, model.cfg, dtype, precision) for i in range(n_texts)))
    kept, total = bisect.bisect_right(running, limit), running[-1] if running else 0
    say = "all kept between passes over the data" if kept == n_texts else \
        f"{running[kept - 1] / 2**30:.2f} GiB of them kept (about {kept} texts), the rest made every step"
    log(f"frozen rows: {total / 2**30:.2f} GiB for {n_texts} texts, {say}" if kept else
        f"frozen rows: {total / 2**30:.2f} GiB for {n_texts} texts, none fit in {limit / 2**30:.1f} GiB: computed every step")
    frozen.limit_bytes = limit
    return frozen if kept else None

"""The command lines' shared plumbing: a parser whose errors are one line, train.py's checks of its
settings and its table of recipes, and decode.py's options."""
import argparse
import math
import os
import sys
from pathlib import Path

import torch

from support.cpu_kernels import cpu_bf16_is_fast
from support.files import IN_USE, folder_holder
from support.sampling import add_sampling_args, check_sampling_args


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: bad input says what is wrong and stops
        sys.exit(f"error: {message} (see --help)")


def recipe_table(recipes: dict) -> str:
    """The recipes side by side, a setting per line (train.py --help's epilog)."""
    keys = list(next(iter(recipes.values())))
    rows = [f"  {'setting':<14}" + "".join(f"{name:>14}" for name in recipes)]
    rows += [f"  {k:<14}" + "".join(f"{str(r[k]):>14}" for r in recipes.values()) for k in keys]
    return "recipes (a flag overrides its setting; lora_lr is --lr with --lora):\n" + "\n".join(rows)


def fill_from_recipe(a, recipes: dict, p):
    """Every setting left unset takes its recipe's value; the recipe defaults by device (cpu-hour on a
    CPU, one-gpu on one GPU, paper-gpu on several). --lr takes lora_lr under --lora. --amp auto stays
    auto (timed on the job: support.step_timing.faster_precision) only on a CPU with fast bfloat16."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    a.given = sorted(k for k, v in vars(a).items() if v is not None)  # what the command line set (support/plan.py)
    if a.gpu_memory is not None:  # a plan for a card that is not there: the one-GPU recipe, nothing run
        if not a.gpu_memory > 0:
            p.error(f"--gpu-memory must be a positive number of GiB, not {a.gpu_memory}")
        a.plan, a.device, a.recipe = True, "cuda", a.recipe or "one-gpu"
    elif a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available here (use --device cpu)")
    a.recipe = a.recipe or ("cpu-hour" if not a.device.startswith("cuda") else "paper-gpu" if several else "one-gpu")
    recipe = recipes[a.recipe]
    if a.lora is None:
        a.lora = 0 if a.fsdp else recipe["lora"]
    if a.lr is None:
        a.lr = recipe["lora_lr"] if a.lora else recipe["lr"]
    a.lora_layers_from_recipe = a.lora_layers is None  # the recipe's top N blocks: all of a smaller model
    for key, value in recipe.items():
        if key != "lora_lr" and getattr(a, key) is None:
            setattr(a, key, value)
    if a.amp == "auto" and not (a.device == "cpu" and cpu_bf16_is_fast()):
        a.amp = "none"


def check_train_args(a, p, fresh_out: bool):
    """train.py's settings in range, each error naming its flag; fresh_out: an --out that holds an earlier
    run needs --resume or --overwrite."""
    if a.lora < 0:
        p.error("--lora must be 0 (full fine-tuning) or a rank of 1 or more")
    if a.lora and a.fsdp:
        p.error("--lora with --fsdp is not supported: the adapter is small, use data parallelism")
    if a.k_max < 2:
        p.error("--k-max must be at least 2")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "branch_every", "log_every", "save_every",
                 "eval_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "eval_every", "eval_prompts", "self_answers", "lora_layers"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("lr", "clip"):
        if not 0 < getattr(a, name) < math.inf:
            p.error(f"--{name} must be a positive number")
    if a.max_minutes is not None and not 0 < a.max_minutes < math.inf:
        p.error("--max-minutes must be a positive number")
    if a.k_weights is not None and (len(a.k_weights) != a.k_max - 1 or min(a.k_weights) < 0 or
                                    not 0 < sum(a.k_weights) < math.inf):
        p.error(f"--k-weights needs {a.k_max - 1} weights of 0 or more (one per k of 2..{a.k_max}), not all 0")
    if a.seq_len <= a.k_max:
        p.error(f"--seq-len ({a.seq_len}) must be longer than --k-max ({a.k_max})")
    if a.dtype not in ("float32", "bfloat16", "float16"):
        p.error(f"--dtype must be float32, bfloat16 or float16, not {a.dtype}")
    if a.amp not in ("float32", "bfloat16", "float16", "none", "auto"):
        p.error(f"--amp must be bfloat16, float16, float32, none or auto, not {a.amp}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} exists and is not a folder")
    if out.is_dir() and (holder := folder_holder(out)):
        p.error(IN_USE.format(out=out, holder=holder))
    earlier = (out / "ckpt.pt").exists() or (out / "model").exists() or (out / "model.old").exists()
    if earlier and fresh_out and not (a.resume or a.overwrite):
        p.error(f"{out} holds an earlier run; pass --resume to continue it, --overwrite to replace it, "
                f"or another --out")


def check_model_settings(cfg, args):
    """train.py's settings whose range depends on the model, each named in its message."""
    last = args.seq_len + args.k_max - 1  # the last position a branch reaches
    if last > cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} with --k-max {args.k_max} reaches position {last}, beyond "
                         f"the model's context of {cfg.max_seq_len} positions")
    if args.lora_layers > cfg.n_layers and getattr(args, "lora_layers_from_recipe", False):
        args.lora_layers = 0  # every block
    if args.lora_layers > cfg.n_layers:
        raise ValueError(f"--lora-layers {args.lora_layers} is more than the model's {cfg.n_layers} blocks")
    if args.lora > min(cfg.dim, cfg.n_heads * cfg.head_dim):
        raise ValueError(f"--lora {args.lora} is more than the model's width ({cfg.dim}); gated LoRA needs a "
                         f"rank below it")


# -----------------------------------------------------------------------------
# decode.py (evaluate.py shares check_decoding_args)

TREE = 1  # --verify: the candidates tried at each draft position (--tree)


def decode_args(argv, description: str):
    """decode.py's command line, checked: (args, parser)."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default=None, help="preset, hub repo id, HF directory, .gguf or adapter folder "
                   "(default: out/model if train.py wrote one, else smollm2-135m)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--k", type=int, default=None, help="static k: accept k tokens per pass (1 = plain decoding)")
    p.add_argument("--threshold", type=float, default=None, help="ConfAdapt: accept while top-1 prob >= this")
    p.add_argument("--k-max", type=int, default=None, help="ConfAdapt block size, --verify: up to k_max - 1 "
                   "drafts per pass (default: the model's, else 16)")
    p.add_argument("--verify", action="store_true", help="lossless: the output of k = 1, with the model checking "
                   "its own drafts (several tokens per pass where they hold)")
    p.add_argument("--draft-threshold", type=float, default=None, help="--verify: feed only the leading drafts "
                   "whose top-1 prob is >= this (default: as many as pay off)")
    p.add_argument("--tree", type=int, default=None, help=f"--verify: the candidates tried at each draft position, "
                   f"a tree of the likeliest paths (default {TREE}; 1: a chain of drafts, the only kind with "
                   f"--temperature > 0, whose speculative sampling checks one draft per position)")
    p.add_argument("--full-block", action="store_true", help="ConfAdapt and --verify: feed the whole block every "
                   "pass, as the paper does (default: the masks and drafts that pay off on this machine, measured; "
                   "also the case when --k-max or --draft-threshold is given)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-chat", dest="chat", action="store_false", help="raw text, no chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--show-chunks", action="store_true", help="colour the tokens of each pass by how many it accepted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    p.add_argument("--eager", action="store_true", help="on a GPU, run the passes as on a CPU: one kernel at a "
                   "time, of the shapes they have (default: fixed shapes, captured; support/static_passes.py)")
    add_sampling_args(p)
    add_cpu_kernels_arg(p)
    a = p.parse_args(argv)
    if a.show_chunks and a.json:
        p.error("--show-chunks colours the streamed text: not with --json")
    if not a.prompt.strip():
        p.error("--prompt is empty")
    if a.threshold is not None and a.k is not None:
        p.error("give either --k (static) or --threshold (ConfAdapt), not both")
    if a.verify and (a.k is not None or a.threshold is not None):
        p.error("--verify checks its own drafts; it takes no --k or --threshold")
    for option, value in (("--draft-threshold", a.draft_threshold), ("--tree", a.tree)):
        if value is not None and not a.verify:
            p.error(f"{option} is an option of --verify")
    if a.tree is not None and not 1 <= a.tree <= 8:
        p.error(f"--tree must be 1..8, not {a.tree}")
    if a.temperature and (a.tree or 1) > 1:
        p.error("--verify with --temperature > 0 samples over a chain of drafts: --tree 1, or leave --tree out")
    a.tree = a.tree or (1 if a.temperature else TREE)
    if a.verify and a.k_max is not None and a.k_max < 2:
        p.error(f"--verify needs --k-max >= 2 (k_max - 1 drafts per pass), not {a.k_max}")
    for t in (a.threshold, a.draft_threshold):
        if t is not None and not 0 < t <= 1:
            p.error(f"threshold {t} is outside (0, 1]")
    check_decoding_args(a, p)
    check_sampling_args(a, p)
    return a, p


def add_cpu_kernels_arg(p):
    p.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false", help="on a CPU, keep every layer "
                   "the plain one model.py and lora.py define (default: the few-row kernels measured fastest here, "
                   "support/cpu_kernels.py; the same tokens)")


def check_decoding_args(a, p):
    """The settings decode.py and evaluate.py share."""
    if a.k_max is not None and a.k_max < 1:
        p.error(f"--k-max must be at least 1, not {a.k_max}")
    if a.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available here (use --device cpu)")
    if a.dtype not in (None, "float32", "bfloat16", "float16"):
        p.error(f"--dtype must be float32, bfloat16 or float16, not {a.dtype}")


def check_fits(model, n_prompt: int, max_new_tokens: int, n_masks: int):
    """The last position a decode can reach, n_prompt + max_new_tokens + n_masks, must lie within the
    model's context; if not, the message names the setting that takes the room."""
    context = model.cfg.max_seq_len
    if n_masks + 2 > context:
        raise ValueError(f"k_max {n_masks + 1} (--k-max) does not fit the model's context of {context} positions")
    if max_new_tokens + n_masks + 1 > context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} with {n_masks} mask slots leaves no room for a prompt "
                         f"in the model's context of {context} positions")
    if n_prompt + max_new_tokens + n_masks > context:
        raise ValueError(f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                         f"{context}; shorten the prompt or --max-new-tokens")

"""Turn a next-token model into a multi-token predictor by online self-distillation.

    python train.py --init qwen3-4b                        # one GPU, the paper's recipe
    python train.py                                        # SmolLM2-135M on a CPU: the hour-long recipe
    torchrun --nproc_per_node 8 train.py --init llama-3.1-8b --data metamathqa --fsdp
    python train.py --resume                               # continue exactly where it stopped

The student starts as the model, the teacher is a frozen copy of it (METHOD.md, "Training"); with
--lora R the model is frozen and gated adapters act on <MTP> rows only, so it is its own teacher.
Output: out/model, a Hugging Face directory that decode.py and transformers load as they are (with
--lora: the adapter and the name of the untouched original, which decode.py loads together).
Read main() at the bottom first: set-up, the loop, one step.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import format_example, gsm8k_prompt, load_dataset, load_gsm8k
from decode import encode_prompt, generate, generate_batch
from distill import build_batch, mtp_loss, mtp_loss_gated
from evaluate import teacher_nll
from model import (Transformer, cpu_bf16_is_fast, cpu_flags, recover_dir, rope_frequencies,
                   write_file_atomically)

T0 = time.time()  # the run's wall-clock budget (--max-minutes) counts from here
FINISH_RESERVE_S = 150  # kept for the final quick eval and the save
# settings that shape a run: --resume refuses a checkpoint written with other values
SHAPING = ("init", "data", "format", "k_max", "batch_size", "grad_accum", "seq_len", "branch_every",
           "branch_from", "self_answers", "loss", "seed", "dtype", "lora", "lora_alpha")
MAX_BAD_STEPS = 3  # non-finite steps in a row before training stops


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: bad input says what is wrong and stops
        sys.exit(f"error: {message} (see --help)")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="smollm2-135m", help="preset, hub repo id, HF directory or .gguf")
    p.add_argument("--data", default=None, help="gsm8k (CPU default), metamathqa (GPU default) or a JSONL file")
    p.add_argument("--format", default="chat", choices=["chat", "plain"],
                   help="chat: the model's chat template; plain: BOS + question + blank line + answer")
    p.add_argument("--out", default="out", help="output folder: ckpt.pt while training, model/ at the end")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds an earlier run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="weights: float32 / bfloat16 (default: bfloat16 GPU, float32 "
                   "CPU); low-precision weights get a float32 master copy in the optimizer")
    p.add_argument("--amp", default=None, help="autocast matmuls to this dtype, 'none' for off (default: none on "
                   "GPU; on a CPU bfloat16 if it computes bfloat16 fast, measured at start, else none)")
    p.add_argument("--checkpoint-activations", default="auto", choices=["auto", "on", "off"],
                   help="recompute each block in backward instead of storing it (auto: if memory needs it)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 100k GPU, 300 CPU)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the whole run (own answers, "
                   "training, final eval, save); training stops in time (default: 60 CPU, none GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch (default 16 GPU, 4 CPU)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 8 GPU, 1 CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="ground-truth tokens per row (default 160 GPU, 256 CPU)")
    p.add_argument("--k-max", type=int, default=None, help="k is drawn from 2..k_max every micro-batch (default 16 GPU, 4 CPU)")
    p.add_argument("--branch-every", type=int, default=None, help="tokens between branch cuts (default 32 GPU, 4 CPU)")
    p.add_argument("--branch-from", default=None, choices=["all", "response"],
                   help="cut branches anywhere (paper) or only in the answer (default: all GPU, response CPU)")
    p.add_argument("--self-answers", type=int, default=None, help="train on the model's own greedy answers to N "
                   "of the training questions instead of the dataset's answers (0: the paper's ground truth; "
                   "default 0 GPU, 512 CPU)")
    p.add_argument("--lora", type=int, default=None, help="gated LoRA of this rank instead of full fine-tuning: "
                   "the original weights stay frozen and real tokens see them exactly; 0 = full fine-tuning "
                   "(default 32 CPU, 0 GPU)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default alpha = rank)")
    p.add_argument("--loss", default="hard", choices=["hard", "soft"])
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-5 GPU; CPU: 1e-3 with "
                   "--lora, 1e-4 without)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 2000 GPU, 20 CPU)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=None, help="quick decode eval, 0 = never (default 1000 GPU, 60 CPU)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts of the quick eval (default 4 GPU, "
                   "8 CPU)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default 1000 GPU, 50 CPU)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--fsdp", action="store_true", help="shard student, grads and optimizer across GPUs (FSDP2)")
    p.add_argument("--bench-step", type=int, default=0, help="time N MTP steps vs N plain fine-tuning steps, then exit")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available here (use --device cpu)")
    gpu = a.device.startswith("cuda")
    # the CPU defaults are the recipe that did best in an hour (README "Results", runs 3 to 5): the
    # model's own answers, k up to 4, a branch after every answer token, gated LoRA (1.55x the
    # predictions/s of full fine-tuning in float32, and k=1 stays the original model)
    if a.lora is None:
        a.lora = 0 if gpu or a.fsdp else 32
    defaults = dict(data="metamathqa" if gpu else "gsm8k", dtype="bfloat16" if gpu else "float32",
                    amp="none" if gpu else None, lr=1e-5 if gpu else 1e-3 if a.lora else 1e-4,
                    k_max=16 if gpu else 4,
                    self_answers=0 if gpu else 512, max_minutes=None if gpu else 60.0,
                    steps=100_000, batch_size=16 if gpu else 4, grad_accum=8 if gpu else 1,
                    seq_len=160 if gpu else 320, branch_every=32 if gpu else 1,
                    branch_from="all" if gpu else "response", warmup=2000 if gpu else 20,
                    eval_every=1000 if gpu else 60, eval_prompts=4 if gpu else 8, save_every=1000 if gpu else 50)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.amp is None:  # a CPU: bfloat16 only where it is fast (measured, see model.cpu_bf16_is_fast)
        a.amp = "bfloat16" if cpu_bf16_is_fast() else "none"
    if a.lora < 0:
        p.error("--lora must be 0 (full fine-tuning) or a rank of 1 or more")
    if a.lora and a.fsdp:
        p.error("--lora with --fsdp is not supported: the adapter is small, use data parallelism")
    if a.k_max < 2:
        p.error("--k-max must be at least 2")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "branch_every", "log_every", "save_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "eval_every", "eval_prompts", "self_answers", "bench_step"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("lr", "clip"):
        if not 0 < getattr(a, name) < math.inf:
            p.error(f"--{name} must be a positive number")
    if a.max_minutes is not None and not 0 < a.max_minutes < math.inf:
        p.error("--max-minutes must be a positive number")
    if a.seq_len <= a.k_max:
        p.error(f"--seq-len ({a.seq_len}) must be longer than --k-max ({a.k_max})")
    for name in ("dtype", "amp"):
        if getattr(a, name) not in ("float32", "bfloat16", "float16") + (("none",) if name == "amp" else ()):
            p.error(f"--{name} must be float32, bfloat16 or float16, not {getattr(a, name)}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} exists and is not a folder")
    earlier = (out / "ckpt.pt").exists() or (out / "model").exists() or (out / "model.old").exists()
    if earlier and not (a.resume or a.overwrite or a.bench_step):
        p.error(f"{out} holds an earlier run; pass --resume to continue it, --overwrite to replace it, "
                f"or another --out")
    return a


# -----------------------------------------------------------------------------
# data: tokenized examples, in a fixed order derived from (seed, epoch), so resuming is exact

def tokenize(rows, tok, style, seq_len):
    examples = []
    for row in rows:
        ids = format_example(tok, row, style)[:seq_len]
        prompt_len = 0
        if "question" in row:  # where the answer starts (for --branch-from response)
            prompt_len = len(tok.encode_chat([{"role": "user", "content": row["question"]}])
                             if style == "chat" and tok.chat_format else tok.encode(row["question"] + "\n\n"))
        examples.append((ids, min(prompt_len, len(ids))))
    return examples


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def get_rows(examples, first: int, count: int, seed: int, pad_id: int):
    """Rows first .. first+count-1 of the endless stream: epoch e is a permutation seeded by seed+e."""
    n = len(examples)
    picked = []
    for i in range(first, first + count):
        epoch, j = divmod(i, n)
        picked.append(examples[epoch_order(n, seed + epoch)[j]])
    L = max(len(ids) for ids, _ in picked)
    tokens = torch.full((count, L), pad_id, dtype=torch.long)
    for r, (ids, _) in enumerate(picked):
        tokens[r, :len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for ids, _ in picked])
    starts = torch.tensor([max(p - 1, 0) for _, p in picked])  # first cut: the last prompt token
    return tokens, lengths, starts


def write_self_answers(model, tok, rows, n, max_new, prompt_of, path, log, header, batch=32):
    """Write the model's own greedy answers to n questions to path, one {ids, prompt_len} per line
    after a first line that says what made them. METHOD.md: the authors recommend tuning on prompts
    from the deployment domain; with the model's own answers the training prefixes are exactly the
    contexts that decoding meets. Questions whose prompts have the same length are answered
    together, the largest groups first."""
    groups = {}
    for row in rows:
        prompt = encode_prompt(tok, prompt_of(row["question"]), True)
        groups.setdefault(len(prompt), []).append(prompt)
    batches = [g[i:i + batch] for g in sorted(groups.values(), key=len, reverse=True)
               for i in range(0, len(g), batch)]
    t0, lines = time.time(), []
    for prompts in batches:
        if len(lines) >= n:
            break
        for p, a in zip(prompts, generate_batch(model, prompts, max_new, tok.stop_ids)):
            lines.append(json.dumps({"ids": p + a, "prompt_len": len(p)}))
        log(f"self-answers: {len(lines)}/{n} in {time.time() - t0:.0f} s")
    text = "\n".join([header] + lines[:n]) + "\n"
    write_file_atomically(path, lambda tmp: tmp.write_text(text), len(text))


def self_answer_examples(run_args, teacher, tok, rows, path, log, write: bool):
    """The model's own answers (write_self_answers), generated once (by the first process) and kept
    in the output folder: a resumed or repeated run with the same model and count reuses them."""
    header = json.dumps({"meta": {"init": run_args.init, "n": run_args.self_answers, "max_new": run_args.seq_len // 2}})
    if write and not (path.exists() and path.read_text().split("\n", 1)[0] == header):
        prompt_of = gsm8k_prompt if run_args.data.startswith("gsm8k") else (lambda q: q)
        questions = [r for r in rows if "question" in r]
        if not questions:
            raise ValueError(f"--self-answers needs questions, and {run_args.data} has only text rows")
        write_self_answers(teacher, tok, questions, run_args.self_answers, run_args.seq_len // 2, prompt_of,
                           path, log, header)
    if dist.is_initialized():
        dist.barrier()
    answers = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    return [(r["ids"][:run_args.seq_len], r["prompt_len"]) for r in answers]


# -----------------------------------------------------------------------------
# precision: an AdamW that never loses an update, and what a run costs in memory

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
             "teacher": 0 if args.lora else n * w, "activations": layers + logits + cache}
    return {k: v / 2**30 for k, v in parts.items()}


def autocast(args):
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(args.device.split(":")[0], dtype=getattr(torch, args.amp))


def lr_at(step, args):
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1))  # warm-up, then constant (paper)


# -----------------------------------------------------------------------------
# checkpoints

def gather_state(student, optimizer):
    """Model and optimizer state as whole tensors keyed by name (collected from every process when
    the student is sharded with FSDP, so every process must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_floating_point(t))


def save_checkpoint(run, step):
    """OUT/ckpt.pt, replaced atomically; never written from non-finite weights."""
    model_state, optim_state = gather_state(run.student, run.optimizer)
    if run.master:
        if not all_finite(model_state.values()):
            raise ValueError(f"the weights are not finite at step {step}; nothing was saved, "
                             f"{run.ckpt_path} keeps the last good checkpoint")
        state = {"model": model_state, "optimizer": optim_state, "step": step, "args": vars(run.args)}
        nbytes = 2 * sum(t.numel() * t.element_size() for t in model_state.values())
        write_file_atomically(run.ckpt_path, lambda tmp: torch.save(state, tmp), nbytes)
    return model_state


def load_checkpoint(run):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    path = run.ckpt_path
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # our own file, tensors only
        saved = state["args"]
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); remove it or "
                         f"use --overwrite to start afresh") from None
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(run.args, k)}" for k in SHAPING
               if saved.get(k) != getattr(run.args, k)]
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings ({'; '.join(changed)}); "
                         f"use the same ones, or --overwrite to start afresh")
    set_state_dict(run.student, run.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    return state["step"]


def save_model(run, step, model_state):
    """The final Hugging Face folder (model.safetensors, config.json, tokenizer, train_args.json),
    from model_state: what save_checkpoint gathered and checked to be finite just before."""
    final = run.student
    if run.args.fsdp:  # a plain copy of the gathered weights to write out
        with torch.device("meta"):
            final = Transformer(run.student.cfg)
        final.load_state_dict(model_state, assign=True)
        if final.cfg.tie_embeddings:
            final.lm_head.weight = final.embed_tokens.weight
        final.inv_freq = rope_frequencies(final.cfg)
        final.tokenizer = run.tok
    final.cfg.k_max = run.args.k_max  # decode.py uses as many masks as the model was trained for
    final.save_pretrained(run.out / "model", {"train_args.json": json.dumps(vars(run.args), indent=2) + "\n"})
    run.log(f"saved {run.out / 'model'} (step {step})")


# -----------------------------------------------------------------------------
# the run: set-up, one step, the loop

@dataclass
class Run:
    args: argparse.Namespace
    student: torch.nn.Module          # the model being tuned (FSDP-sharded in place with --fsdp)
    model: torch.nn.Module            # what the step calls: the student, or its DDP wrapper
    teacher: torch.nn.Module          # the frozen original
    optimizer: torch.optim.Optimizer
    tok: object
    examples: list                    # (token ids, prompt length) per training text
    eval_prompts: list
    out: Path
    rank: int = 0
    world: int = 1
    log: callable = print
    step: int = 0
    last_eval: tuple = (-1, "")       # (step, result line) of the latest quick eval
    k1_texts: dict = field(default_factory=dict)  # quick eval: (k=1 text, its teacher NLL) per prompt, if fixed
    hits: torch.Tensor = field(default=None)  # agreement per offset since the last log line
    counts: torch.Tensor = field(default=None)

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world > 1

    @property
    def ckpt_path(self):
        return self.out / "ckpt.pt"


def make_logger(master):
    def log(*a):
        if not master:
            return
        try:
            print(*a, flush=True)
        except BrokenPipeError:  # stdout closed (e.g. piped into head): keep training, stop printing
            sys.stdout = open(os.devnull, "w")
    return log


def setup(args) -> Run:
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    log = make_logger(rank == 0)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if rank == 0:
        recover_dir(out / "model")  # a save that a kill interrupted: keep the last complete model
        if args.overwrite and not args.resume:
            (out / "ckpt.pt").unlink(missing_ok=True)
            shutil.rmtree(out / "model", ignore_errors=True)

    # data first: bad data fails in seconds, before a large model is loaded
    rows = load_dataset(args.data)
    if args.data.startswith("gsm8k"):  # held-out prompts for the quick eval: GSM8K test, else the last rows
        held_out = load_gsm8k("test")[:args.eval_prompts]
    else:
        if len(rows) <= args.eval_prompts:
            raise ValueError(f"{args.data} has {len(rows)} rows; it needs more than --eval-prompts "
                             f"({args.eval_prompts}), which are held out for the quick eval")
        held_out, rows = rows[len(rows) - args.eval_prompts:], rows[:len(rows) - args.eval_prompts]

    dtype = getattr(torch, args.dtype)
    student = Transformer.from_pretrained(args.init, device=args.device, dtype=dtype)
    tok = student.tokenizer
    if args.lora:  # gated LoRA: real tokens see the frozen original, so it is its own teacher
        init = str(Path(args.init).resolve()) if Path(args.init).exists() else args.init
        teacher = student.add_lora(args.lora, args.lora_alpha, base=init)
    else:
        teacher = copy.deepcopy(student).requires_grad_(False).eval()  # frozen original
    student.train()
    where = f"{args.device} ({cpu_flags() or 'no avx2/avx512 flags'})" if args.device == "cpu" else args.device
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log(f"model {args.init}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params, "
        f"{f'gated LoRA rank {args.lora}: {trained / 1e6:.2f}M trained' if args.lora else 'all trained'}, "
        f"mask id {student.cfg.mask_id}, {world} process(es) on {where}")
    log(f"precision: {args.dtype} weights{' + float32 master copy' if args.dtype != 'float32' else ''}, "
        f"matmuls in {args.amp if args.amp != 'none' else args.dtype}"
        + (f" (bfloat16 is {'fast' if cpu_bf16_is_fast() else 'slow'} on this CPU, measured)"
           if args.device == "cpu" else ""))
    plan_memory(student, args, world, log)

    if args.max_minutes:
        log(f"plan: {args.max_minutes:.0f} min in all: {f'{args.self_answers} own answers, then ' if args.self_answers else ''}"
            f"training until minute {args.max_minutes - FINISH_RESERVE_S / 60:.1f} (now {(time.time() - T0) / 60:.1f}), "
            f"then a quick eval and the save")
    if args.self_answers:
        examples = self_answer_examples(args, teacher, tok, rows, out / "self_answers.jsonl", log, rank == 0)
    else:
        examples = tokenize(rows, tok, args.format, args.seq_len)
    check_branches(examples, args)
    eval_prompts = [encode_prompt(tok, gsm8k_prompt(r["question"]), args.format == "chat")
                    for r in held_out if "question" in r]
    log(f"data {args.data}: {len(examples)} examples, {sum(len(e[0]) for e in examples) / len(examples):.0f} "
        f"tokens on average (format {args.format}, at most {args.seq_len})")

    model = student
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in student.layers:
            fully_shard(block)
        fully_shard(student)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student)
    trainable = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = AdamW([{"params": decay, "weight_decay": args.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=args.betas)
    run = Run(args, student, model, teacher, optimizer, tok, examples, eval_prompts, out, rank, world, log,
              hits=torch.zeros(args.k_max), counts=torch.zeros(args.k_max))
    if args.resume:
        run.step = load_checkpoint(run)
        log(f"resumed from {run.ckpt_path} at step {run.step}")
    return run


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


def check_branches(examples, args):
    """Fail now, not after an hour, if no training text is long enough to hold one branch."""
    need = 2  # a branch at cut i needs k >= 2 targets x_{i+1}..x_{i+k} before the last token
    starts = [max(p - 1, 0) if args.branch_from == "response" else 0 for _, p in examples]
    if not any(len(ids) - 1 - s >= need for (ids, _), s in zip(examples, starts)):
        raise ValueError(f"no training text leaves room for a branch: with --branch-from {args.branch_from} and "
                         f"--seq-len {args.seq_len}, every answer is shorter than 2 tokens (longer --seq-len, "
                         f"--branch-from all, or other data)")


def micro_batches(run, step):
    """This rank's micro-batches of `step`: rows, k and branch offsets depend only on the global
    micro-batch index, so N processes see what 1 process with N times the accumulation sees."""
    args, out = run.args, []
    for m in range(args.grad_accum):
        micro = step * args.grad_accum * run.world + m * run.world + run.rank  # global micro-batch index
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + micro)
        k = int(torch.randint(2, args.k_max + 1, (1,), generator=g))
        tokens, lengths, starts = get_rows(run.examples, micro * args.batch_size, args.batch_size, args.seed,
                                           run.tok.eos_id)
        starts = starts.to(args.device) if args.branch_from == "response" else None
        out.append(build_batch(tokens.to(args.device), lengths.to(args.device), k, run.student.cfg.mask_id,
                               args.branch_every, starts, g))
    return out


def train_step(run, step):
    """One optimizer step over the global batch: student + teacher on every micro-batch
    (distill.mtp_loss), clip, AdamW. Returns its figures; a non-finite loss or gradient skips it."""
    args, batches = run.args, micro_batches(run, step)
    denom = torch.tensor(float(sum(b.valid.sum().item() for b in batches)), device=args.device)
    if run.ddp:
        dist.all_reduce(denom)
    lr = lr_at(step, args)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, preds = 0.0, 0
    for m, batch in enumerate(batches):
        sync = m == len(batches) - 1 or not run.ddp or args.fsdp
        with run.model.no_sync() if not sync else contextlib.nullcontext():
            # DDP averages gradients over processes; the loss is a sum over the global batch
            with autocast(args):
                loss_args = dict(soft=args.loss == "soft", denom=denom.clamp(min=1) / run.world)
                loss, metrics = mtp_loss_gated(run.model, batch, **loss_args) if args.lora else \
                    mtp_loss(run.model, run.teacher, batch, **loss_args)
            loss.backward()
        loss_sum += loss.item() / run.world
        run.hits[:batch.k] += metrics["agree_hit"].cpu()
        run.counts[:batch.k] += metrics["agree_n"].cpu()
        preds += metrics["n"]
    if run.ddp:
        t = torch.tensor([loss_sum], device=args.device)
        dist.all_reduce(t)
        loss_sum = t.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), args.clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP
    ok = denom.item() > 0 and math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if ok:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return dict(ok=ok, loss=loss_sum, grad_norm=grad_norm, lr=lr, preds=preds * run.world, empty=denom.item() == 0)


@torch.no_grad()
def quick_eval(run, max_new=128) -> str:
    """ConfAdapt(0.9) against the same model's own next-token decoding on the held-out prompts, and
    the teacher loss of both texts (the original model's NLL per token, METHOD.md "Evaluation")."""
    model, stop_ids = run.student, run.tok.stop_ids
    model.eval()
    accel, same, nll, n_tokens = [], 0, [0.0, 0.0], [0, 0]
    for i, p in enumerate(run.eval_prompts):
        if i in run.k1_texts:  # with gated LoRA k=1 is the untouched original: its text and loss never change
            ref, ref_nll = run.k1_texts[i]
        else:
            ref = generate(model, p, max_new, k=1, stop_ids=stop_ids).tokens
            ref_nll = teacher_nll(run.teacher, p, ref)
            if run.args.lora:
                run.k1_texts[i] = ref, ref_nll
        mtp = generate(model, p, max_new, threshold=0.9, k_max=run.args.k_max, stop_ids=stop_ids)
        accel.append(mtp.acceleration)
        same += mtp.tokens == ref
        nll[0] += ref_nll
        nll[1] += teacher_nll(run.teacher, p, mtp.tokens)
        n_tokens[0] += len(ref)
        n_tokens[1] += len(mtp.tokens)
    model.train()
    return (f"ConfAdapt(0.9) on {len(run.eval_prompts)} held-out prompts: acceleration "
            f"{sum(accel) / len(accel):.2f}, same text as k=1 {same}/{len(run.eval_prompts)}, teacher loss "
            f"{nll[1] / max(n_tokens[1], 1):.3f} (k=1 {nll[0] / max(n_tokens[0], 1):.3f})")


def train(run):
    """The loop: steps until --steps or --max-minutes, logging, quick evals and checkpoints.
    Ctrl-C or SIGTERM finishes the step, saves and exits."""
    args, log = run.args, run.log
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    t_start, first_step, t_log, preds_since = time.time(), run.step, time.time(), 0
    deadline = T0 + args.max_minutes * 60 - FINISH_RESERVE_S if args.max_minutes else math.inf
    bad, learned = 0, 0
    while run.step < args.steps and not stop["now"]:
        r = train_step(run, run.step)
        if not r["ok"]:
            bad += 1
            why = "no valid branch in this batch" if r["empty"] else \
                f"non-finite {'loss' if not math.isfinite(r['loss']) else 'gradient'}"
            log(f"step {run.step + 1}: {why}; step skipped ({bad} in a row)")
            if bad >= MAX_BAD_STEPS:
                raise ValueError(f"{bad} steps in a row were skipped ({why}); stopping. Nothing was saved from "
                                 f"this run after step {run.step}" + ("; try a lower --lr" if not r["empty"] else ""))
            run.step += 1
            continue
        bad, learned = 0, learned + r["preds"]
        run.step += 1
        preds_since += r["preds"]
        if run.step % args.log_every == 0 or run.step == 1:
            dt = time.time() - t_log
            shown = min(6, args.k_max)
            agree = " ".join(f"{h / c:.2f}" if c else "-" for h, c in zip(run.hits[:shown], run.counts[:shown]))
            elapsed = time.time() - t_start
            eta = min(elapsed / (run.step - first_step) * (args.steps - run.step), deadline - time.time())
            log(f"step {run.step} | loss {r['loss']:.4f} | agree@1..{shown} {agree} | gnorm {r['grad_norm']:.2f} "
                f"| lr {r['lr']:.2e} | {preds_since / dt:.0f} preds/s | eta {eta / 60:.1f} min")
            t_log, preds_since = time.time(), 0
            run.hits.zero_(), run.counts.zero_()
        if (run.master or args.fsdp) and args.eval_every and run.eval_prompts and run.step % args.eval_every == 0:
            run.last_eval = (run.step, quick_eval(run))
            log(f"eval step {run.step} | minute {(time.time() - T0) / 60:.1f} | {run.last_eval[1]}")
        if run.step % args.save_every == 0:
            save_checkpoint(run, run.step)
        if time.time() > deadline:
            log(f"time budget: training stops at step {run.step}, {(time.time() - T0) / 60:.1f} min into the run")
            break
    if learned == 0 and run.step > first_step:
        raise ValueError("no prediction was trained on (every branch ran past the end of its text); "
                         "nothing was saved")
    return run.step


def summary(run):
    """What the hour bought: the saved model on the held-out prompts, and how to use it."""
    if run.eval_prompts:
        result = run.last_eval[1] if run.last_eval[0] == run.step else quick_eval(run)
        run.log(f"done in {(time.time() - T0) / 60:.1f} min | {result}")
    run.log(f"model: {run.out / 'model'}; try: python decode.py --init {run.out / 'model'} --threshold 0.9 "
            f"--show-chunks --prompt \"What is 15% of 80?\"")


def main(args):
    run = setup(args)
    if args.bench_step:
        return bench_step(run)
    step = train(run)
    model_state = save_checkpoint(run, step)
    if run.master:
        save_model(run, step, model_state)
    if run.master or args.fsdp:  # a sharded student needs every process for a forward pass
        summary(run)
    if run.ddp:
        dist.destroy_process_group()


def bench_step(run):
    """The cost of one MTP step against one plain fine-tuning step (student forward + backward with
    next-token cross-entropy) on the same ground-truth rows. METHOD.md expects about 4/3."""
    args, model = run.args, run.model

    def mtp(b):
        with autocast(args):
            loss, _ = mtp_loss_gated(model, b) if args.lora else mtp_loss(model, run.teacher, b)
        loss.backward()

    def plain(b):
        L = b.idx.size(1) - b.fill.size(1)
        tokens = b.idx[:, :L]
        with autocast(args):
            logits = model(tokens)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()

    times = {"mtp": 0.0, "plain": 0.0}
    for step in range(args.bench_step + 1):
        batches = micro_batches(run, step)
        for name, fn in (("mtp", mtp), ("plain", plain)):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step:  # the first step is warm-up
                times[name] += time.perf_counter() - t0
            run.optimizer.zero_grad(set_to_none=True)
    ratio = times["mtp"] / times["plain"]
    run.log(f"bench: {args.bench_step} steps | mtp {times['mtp'] / args.bench_step:.3f} s/step | plain "
            f"{times['plain'] / args.bench_step:.3f} s/step | ratio {ratio:.2f} (METHOD.md: about 1.33)")
    return ratio


if __name__ == "__main__":
    try:
        main(get_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

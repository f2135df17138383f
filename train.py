"""Turn a next-token model into a multi-token predictor by online self-distillation.

    python train.py                                        # SmolLM2-135M on a CPU: the hour-long recipe
    python train.py --init qwen3-4b                        # one GPU: the paper's recipe
    torchrun --nproc_per_node 8 train.py --init llama-3.1-8b --fsdp
    python train.py --resume                               # continue exactly where it stopped

The student starts as the model and the teacher is a frozen copy of it (docs/METHOD.md, "Training");
with --lora R the model is frozen and gated adapters act on <MTP> rows only, so it is its own
teacher (lora.py). Output: OUT/model, a Hugging Face directory that decode.py and transformers load
as they are (with --lora: the adapter and the name of the untouched original). A recipe (RECIPES
below) gives every setting a default; a flag overrides it. The file reads top to bottom: recipes,
arguments, set-up, one step, the loop, main.
"""
import argparse
import contextlib
import copy
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import check_branches, get_rows, gsm8k_prompt, load_dataset, load_gsm8k, tokenize
from data.own_answers import own_answer_examples
from decode import against_original, describe_against_original, encode_prompt, quick_eval
from distill import build_batch, distill_loss
from lora import add_lora
from support.budget import Budget, resume_command
from support.checkpoint import Diverged, load_checkpoint, restore_last_good, save_checkpoint, save_final_model
from support.cli import ArgumentParser, check_train_args, recipe_table
from support.cpu_kernels import cpu_bf16_is_fast, cpu_flags, use_few_row_kernels
from support.files import recover_dir
from support.optim import AdamW, autocast, plan_memory
from support.processes import make_logger, rank0_values, start_processes
from support.timing import wait_for
from support.weights import load_model

# the paper's recipe (docs/METHOD.md, "Training"): its data, k up to 16, a branch every 32 tokens
PAPER = dict(data="metamathqa", dtype="bfloat16", amp="none", lora=0, lora_layers=0, lr=1e-5, lora_lr=1e-5, k_max=16,
             batch_size=16, grad_accum=8, seq_len=160, branch_every=32, branch_from="all", self_answers=0, warmup=2000,
             decay="none", steps=100_000, max_minutes=None, eval_every=1000, eval_prompts=4, save_every=1000)
RECIPES = {
    "paper-gpu": PAPER,
    # the paper's recipe on one GPU, stopped after 8 hours: about 10,700 steps at the 2.7 s a step of
    # Qwen3-4B's shape took on an H200 (docs/GPU.md), a tenth of the paper's 100,000
    "one-gpu": dict(PAPER, max_minutes=480),
    # what decoded fastest against the original model after the same CPU time (docs/RESULTS.md, "Choosing
    # the CPU hour's recipe"): gated LoRA in the top 4 blocks, the model's own answers to 512 GSM8K
    # questions, k up to 4, a branch after every answer token
    "cpu-hour": dict(data="gsm8k", dtype="float32", amp="auto", lora=128, lora_layers=4, lr=1e-4, lora_lr=1e-3,
                     k_max=4, batch_size=4, grad_accum=1, seq_len=320, branch_every=1, branch_from="response",
                     self_answers=512, warmup=20, decay="none", steps=100_000, max_minutes=60, eval_every=60,
                     eval_prompts=8, save_every=50),
}
MAX_BAD_STEPS = 3  # non-finite steps in a row before training stops


def get_args(argv=None, fresh_out: bool = True):
    """fresh_out: refuse an --out that holds an earlier run unless --resume or --overwrite say what to do."""
    p = ArgumentParser(description=__doc__, epilog=recipe_table(RECIPES), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="the defaults of every setting below (default: one-gpu on one GPU, paper-gpu on several, "
                   "cpu-hour on a CPU)")
    p.add_argument("--init", default="smollm2-135m", help="preset, hub repo id, HF directory or .gguf")
    p.add_argument("--data", help="gsm8k, metamathqa or a JSONL file of question/answer or text rows")
    p.add_argument("--format", default="chat", choices=["chat", "plain"],
                   help="chat: the model's chat template; plain: BOS + question + blank line + answer")
    p.add_argument("--out", default="out", help="output folder: ckpt.pt while training, model/ at the end")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds an earlier run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="weights: float32, bfloat16 or float16; low-precision weights get a float32 "
                   "master copy in the optimizer")
    p.add_argument("--amp", help="autocast matmuls to this dtype, none for off, auto: where this CPU computes "
                   "bfloat16 fast, bfloat16 autocast or float32, whichever runs a real step of this job faster "
                   "(timed at start); elsewhere none")
    p.add_argument("--checkpoint-activations", default="auto", choices=["auto", "on", "off"],
                   help="recompute each block in backward instead of storing it (auto: if memory needs it)")
    p.add_argument("--lora", type=int, help="gated LoRA of this rank (0: full fine-tuning); the original "
                   "weights stay frozen and real tokens see them exactly")
    p.add_argument("--lora-layers", type=int, help="gated LoRA in the top N blocks only (0: all), with a fixed "
                   "<MTP> embedding: a decode pass then runs fewer small products, and backward stops at the lowest of them")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default alpha = rank)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--k-max", type=int, help="k is drawn from 2..k_max every micro-batch")
    p.add_argument("--k-weights", type=float, nargs="+", default=None, help="how often each k of 2..k_max is "
                   "drawn, one relative weight per k (default: all alike)")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, help="ground-truth tokens per row")
    p.add_argument("--branch-every", type=int, help="tokens between branch cuts")
    p.add_argument("--branch-from", choices=["all", "response"], help="cut branches anywhere (the paper) or "
                   "only in the answer")
    p.add_argument("--self-answers", type=int, help="train on the model's own greedy answers to N training "
                   "questions instead of the dataset's answers (0: the dataset's)")
    p.add_argument("--loss", default="hard", choices=["hard", "soft"], help="hard: cross-entropy to the teacher's "
                   "argmax; soft: KL(teacher || student) (docs/METHOD.md, \"Loss\")")
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--decay", choices=["none", "linear", "cosine"], help="none: the peak after the warm-up (the "
                   "paper); linear, cosine: the lower of the warm-up ramp and a fall from the peak at the start to "
                   "zero at the end of the budget (--steps or --max-minutes)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget of the whole run (own answers, training, "
                   "final eval, save); training stops in time")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, help="quick decode eval every N steps, 0 = never")
    p.add_argument("--eval-prompts", type=int, help="held-out prompts of the quick eval")
    p.add_argument("--eval-tokens", type=int, default=128, help="new tokens per prompt in the quick eval")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--fsdp", action="store_true", help="shard student, grads and optimizer across GPUs (FSDP2)")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available here (use --device cpu)")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    a.recipe = a.recipe or ("cpu-hour" if not a.device.startswith("cuda") else "paper-gpu" if several else "one-gpu")
    recipe = RECIPES[a.recipe]
    if a.lora is None:
        a.lora = 0 if a.fsdp else recipe["lora"]
    if a.lr is None:
        a.lr = recipe["lora_lr"] if a.lora else recipe["lr"]
    a.lora_layers_from_recipe = a.lora_layers is None  # the recipe's top N blocks: all of a smaller model
    for key, value in recipe.items():
        if key != "lora_lr" and getattr(a, key) is None:
            setattr(a, key, value)
    if a.amp == "auto" and not (a.device == "cpu" and cpu_bf16_is_fast()):  # else timed on the job (choose_amp)
        a.amp = "none"
    check_train_args(a, p, fresh_out)
    return a


# -----------------------------------------------------------------------------
# the learning rate

def lr_at(step, args, progress=0.0):
    """Linear warm-up, then the peak (the paper); with --decay, the lower of the warm-up ramp and a
    fall from the peak to zero over the whole budget. progress: the fraction spent, 0..1 (Budget.spent)."""
    warm = min(1.0, (step + 1) / max(args.warmup, 1))
    decayed = {"none": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[args.decay]
    return args.lr * min(warm, decayed)


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
    budget: Budget = None             # --max-minutes and the stop signals (support/budget.py)
    step: int = 0
    last_good_step: int | None = None  # of the latest checkpoint that passed the probe (support.checkpoint.save_checkpoint)
    probe: object = None              # a fixed batch (probe_batch) that every checkpoint is checked on
    good_probe: dict = None           # probe() of the last good checkpoint (at the start: of the model)
    progress: float = 0.0             # the fraction of the budget spent, which --decay follows (Budget.spent)
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


def setup(args) -> Run:
    """Processes, data, models and optimizer: everything the loop needs, in a Run."""
    budget = Budget(args.max_minutes)  # the run's wall-clock budget counts from here
    rank, world, args.device = start_processes(args.device)
    log = make_logger(rank == 0)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if rank == 0:
        recover_dir(out / "model")  # a save that a kill interrupted: keep the last complete model
        if args.overwrite and not args.resume:
            (out / "ckpt.pt").unlink(missing_ok=True)
            shutil.rmtree(out / "model", ignore_errors=True)
    rows, held_out = load_rows(args)  # data first: bad data fails in seconds, before a large model loads
    student, teacher = load_student_and_teacher(args, world, log)
    tok = student.tokenizer
    if plan := budget.plan(args.self_answers):
        log(plan)
    if args.self_answers:
        examples = own_answer_examples(args, teacher, tok, rows, out / "self_answers.jsonl", log, rank == 0,
                                       budget.own_answers_deadline)
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
    run = Run(args, student, model, teacher, make_optimizer(student, args), tok, examples, eval_prompts, out, rank, world, log,
              budget=budget, hits=torch.zeros(args.k_max), counts=torch.zeros(args.k_max))
    if args.resume:
        run.step = run.last_good_step = load_checkpoint(run)  # also the precision the run started in
        log(f"resumed from {run.ckpt_path} at step {run.step}")
    if args.amp == "auto":
        choose_amp(run)
    run.probe = probe_batch(run)
    run.good_probe = probe(run)  # the model as it starts: the original, or the checkpoint resumed
    return run


def make_optimizer(student, args) -> AdamW:
    """AdamW over the trained parameters, with weight decay on the matrices only."""
    trainable = [p for p in student.parameters() if p.requires_grad]
    return AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}], lr=args.lr, betas=args.betas)


def choose_amp(run):
    """--amp auto on a CPU with fast bfloat16: time a real micro-batch of this job (student, teacher,
    backward) in float32 and under bfloat16 autocast, after an untimed round of each, and keep the
    faster: about 50 s of the CPU hour. A small product can favour bfloat16 where the step does not
    (autocast casts the frozen base again on every pass). The timing takes at most a share of the
    training time left (Budget): on a busy machine it stops early and decides by what it measured."""
    args, batch, log = run.args, micro_batches(run, 0)[0], run.log
    t_begin, left, allowed = time.time(), run.budget.deadline - time.time(), run.budget.amp_timing_seconds
    seconds, cut = {}, False
    for amp in ("none", "bfloat16") * 2:  # the first round warms up
        if time.time() - t_begin > allowed:
            cut = True
            break
        args.amp, t0 = amp, time.perf_counter()
        with autocast(args):
            loss, _ = batch_loss(run, batch)
        loss.backward()
        seconds[amp] = time.perf_counter() - t0  # a warm-up's time, until the timed round replaces it
    run.optimizer.zero_grad(set_to_none=True)
    faster = min(seconds, key=seconds.get) if len(seconds) == 2 else "none"
    if run.ddp:  # one precision for every process: rank 0's timing
        faster = "bfloat16" if rank0_values(args.device, faster == "bfloat16")[0] else "none"
    args.amp = faster
    matmuls = "bfloat16" if faster == "bfloat16" else "float32"
    if len(seconds) < 2:
        log(f"precision: no time in the budget to time both ({time.time() - t_begin:.0f} s of {left:.0f} s of "
            f"training left): matmuls in {matmuls} (--amp auto)")
        return
    log(f"precision: a micro-batch of this job took {1e3 * seconds['none']:.1f} ms in float32, "
        f"{1e3 * seconds['bfloat16']:.1f} ms under bfloat16 autocast: matmuls in {matmuls} (--amp auto"
        f"{', cut short by the time budget' if cut else ''})")


def load_rows(args):
    """The training rows, and the held-out ones of the quick eval (GSM8K test, else the last rows)."""
    rows = load_dataset(args.data)
    if args.data.startswith("gsm8k"):
        return rows, load_gsm8k("test")[:args.eval_prompts]
    if len(rows) <= args.eval_prompts:
        raise ValueError(f"{args.data} has {len(rows)} rows; it needs more than --eval-prompts "
                         f"({args.eval_prompts}), which are held out for the quick eval")
    return rows[:len(rows) - args.eval_prompts], rows[len(rows) - args.eval_prompts:]


def load_student_and_teacher(args, world, log):
    """The student, and the frozen original as its teacher: a copy, or with gated LoRA the student
    itself (real tokens see the frozen original)."""
    student = load_model(args.init, device=args.device, dtype=getattr(torch, args.dtype))
    check_settings_against(student.cfg, args)
    if args.lora:
        init = str(Path(args.init).resolve()) if Path(args.init).exists() else args.init
        teacher = add_lora(student, args.lora, args.lora_alpha, base=init, layers=args.lora_layers or None)
    else:
        teacher = copy.deepcopy(student).requires_grad_(False).eval()
    if args.device == "cpu":  # the quick eval and the own answers decode a few rows at a time
        use_few_row_kernels(student), use_few_row_kernels(teacher)
    student.train()
    where = f"{args.device} ({cpu_flags() or 'no avx2/avx512 flags'})" if args.device == "cpu" else args.device
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log(f"model {args.init}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params, "
        f"{f'gated LoRA rank {args.lora}: {trained / 1e6:.2f}M trained' if args.lora else 'all trained'}, "
        f"mask id {student.cfg.mask_id}, {world} process(es) on {where}")
    matmuls = {"auto": "bfloat16 or float32, timed on a real step below", "none": args.dtype}.get(args.amp, args.amp)
    log(f"precision: {args.dtype} weights{' + float32 master copy' if args.dtype != 'float32' else ''}, "
        f"matmuls in {matmuls}"
        + (f" (bfloat16 is {'fast' if cpu_bf16_is_fast() else 'slow'} on this CPU, measured)"
           if args.device == "cpu" else ""))
    plan_memory(student, args, world, log)
    return student, teacher


def check_settings_against(cfg, args):
    """The settings whose range depends on the model, each named in its message."""
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


def micro_batches(run, step):
    """This rank's micro-batches of `step`: rows, k and branch offsets depend only on the global
    micro-batch index, so N processes see what 1 process with N times the accumulation sees."""
    args, out = run.args, []
    for m in range(args.grad_accum):
        micro = step * args.grad_accum * run.world + m * run.world + run.rank  # global micro-batch index
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + micro)
        k = 2 + int(torch.multinomial(torch.tensor(args.k_weights), 1, generator=g) if args.k_weights else
                    torch.randint(args.k_max - 1, (1,), generator=g))
        out.append(rows_batch(run, micro * args.batch_size, k, g))
    return out


def rows_batch(run, first: int, k: int, g: torch.Generator):
    """distill's batch of --batch-size rows from the first-th of the data order, block size k."""
    args = run.args
    tokens, lengths, starts = get_rows(run.examples, first, args.batch_size, args.seed, run.tok.eos_id)
    starts = starts.to(args.device) if args.branch_from == "response" else None
    return build_batch(tokens.to(args.device), lengths.to(args.device), k, run.student.cfg.mask_id,
                       args.branch_every, starts, g)


def probe_batch(run):
    """The fixed batch every checkpoint is checked on (probe): the first rows, k = k_max."""
    return rows_batch(run, 0, run.args.k_max, torch.Generator().manual_seed(run.args.seed))


@torch.no_grad()
def probe(run) -> dict:
    """The model on run.probe, a fixed batch (probe_batch), in eval mode: the training loss
    ("loss", every offset) and the teacher loss at the cut ("teacher": cross-entropy of the student's
    next-token logits to the original's argmax; with gated LoRA it cannot move). A model whose
    logits are not finite gives a non-finite loss; finite weights can still overflow."""
    training = run.student.training
    run.student.eval()
    with autocast(run.args):  # every process calls it: an FSDP-sharded student needs them all
        loss, metrics = distill_loss(run.student, run.teacher, run.probe, bool(run.args.lora))
    run.student.train(training)
    n = metrics["agree_n"][0].clamp(min=1)
    return {"loss": loss.item(), "teacher": (metrics["loss_sum"][0] / n).item()}


def batch_loss(run, batch, denom=None):
    """distill's loss of one micro-batch and its metrics: with gated LoRA the model is its own teacher
    (mtp_loss_gated), else the student against the frozen copy (mtp_loss)."""
    return distill_loss(run.model, run.teacher, batch, bool(run.args.lora), run.args.loss == "soft", denom)


def train_step(run, step):
    """One optimizer step over the global batch: student + teacher on every micro-batch
    (distill.mtp_loss), clip, AdamW. Returns its figures; a non-finite loss or gradient skips it."""
    args, batches = run.args, micro_batches(run, step)
    denom = torch.tensor(float(sum(b.valid.sum().item() for b in batches)), device=args.device)
    if run.ddp:
        dist.all_reduce(denom)
    lr = lr_at(step, args, run.progress)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, preds = 0.0, 0
    for m, batch in enumerate(batches):
        sync = m == len(batches) - 1 or not run.ddp or args.fsdp
        with run.model.no_sync() if not sync else contextlib.nullcontext():
            # DDP averages gradients over processes; the loss is a sum over the global batch
            with autocast(args):
                loss, metrics = batch_loss(run, batch, denom=denom.clamp(min=1) / run.world)
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


def mtp_step_cost(run, n_steps: int) -> float:
    """Seconds of an MTP step over seconds of a plain fine-tuning step (student forward + backward,
    next-token loss, every weight trained) on the same ground-truth rows, after a step of warm-up:
    the paper reports about 4/3 (docs/METHOD.md, "Training"). Nothing is updated."""
    frozen = [p for p in run.student.parameters() if not p.requires_grad]

    def plain(b):
        tokens = b.idx[:, :b.idx.size(1) - b.fill.size(1)]
        for p in frozen:
            p.requires_grad_(True)
        logits = run.model(tokens)[:, :-1].float()
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        for p in frozen:
            p.requires_grad_(False), setattr(p, "grad", None)

    seconds = {"mtp": 0.0, "plain": 0.0}
    for step in range(n_steps + 1):
        for name, one in (("mtp", lambda b: batch_loss(run, b)[0].backward()), ("plain", plain)):
            t0 = time.perf_counter()
            with autocast(run.args):
                for b in micro_batches(run, step):
                    one(b)
            wait_for(run.args.device)
            seconds[name] += (time.perf_counter() - t0) if step else 0.0
            run.optimizer.zero_grad(set_to_none=True)
    ratio = seconds["mtp"] / seconds["plain"]
    run.log(f"bench: {n_steps} steps | mtp {seconds['mtp'] / n_steps:.3f} s/step | plain "
            f"{seconds['plain'] / n_steps:.3f} s/step | ratio {ratio:.2f} (the paper: about 1.33)")
    return ratio


def train(run):
    """The loop (train_loop), where Ctrl-C or SIGTERM finishes the step, then saves and exits.
    Returns the last step and whether a signal stopped it."""
    with run.budget.stop_on_signals() as budget:
        return train_loop(run), budget.signalled


def train_loop(run):
    """Steps until --steps, --max-minutes or a stop signal, with logging, quick evals and checkpoints."""
    args, log, budget = run.args, run.log, run.budget
    budget.start_training(run.progress, bool(args.self_answers))
    t_start, first_step, t_log, preds_since, bad, learned = time.time(), run.step, time.time(), 0, 0, 0
    while run.step < args.steps and not budget.signalled:
        run.progress = budget.spent(run.step, args.steps)
        if run.ddp:  # one learning rate for every process: rank 0's clock
            run.progress, = rank0_values(args.device, run.progress)
        r = train_step(run, run.step)
        if not r["ok"]:
            bad += 1
            why = "no valid branch in this batch" if r["empty"] else \
                f"non-finite {'loss' if not math.isfinite(r['loss']) else 'gradient'}"
            log(f"step {run.step + 1}: {why}; step skipped ({bad} in a row)")
            if bad >= MAX_BAD_STEPS and r["empty"]:
                raise ValueError(f"{bad} steps in a row were skipped ({why}); stopping")
            if bad >= MAX_BAD_STEPS:
                raise Diverged(run.step + 1, f"{bad} steps in a row were skipped ({why})")
            run.step += 1
            continue
        bad, learned = 0, learned + r["preds"]
        run.step += 1
        preds_since += r["preds"]
        if run.step % args.log_every == 0 or run.step == 1:
            dt = time.time() - t_log
            shown = min(6, args.k_max)
            agree = " ".join(f"{h / c:.2f}" if c else "-" for h, c in zip(run.hits[:shown], run.counts[:shown]))
            eta = budget.eta((time.time() - t_start) / (run.step - first_step), args.steps - run.step)
            log(f"step {run.step} | loss {r['loss']:.4f} | agree@1..{shown} {agree} | gnorm {r['grad_norm']:.2f} "
                f"| lr {r['lr']:.2e} | {preds_since / dt:.0f} preds/s | eta {eta / 60:.1f} min")
            t_log, preds_since = time.time(), 0
            run.hits.zero_(), run.counts.zero_()
        if (run.master or args.fsdp) and args.eval_every and run.eval_prompts and run.step % args.eval_every == 0:
            quick = quick_eval(run.student, run.teacher, run.eval_prompts, args.eval_tokens, args.k_max,
                               run.tok.stop_ids, run.k1_texts if args.lora else None)
            log(f"eval step {run.step} | minute {budget.minutes_in():.1f} | {quick}")
        if run.step % args.save_every == 0:
            save_checkpoint(run, run.step, probe(run))
        out_of_time = budget.out_of_time()
        if run.ddp:  # every process stops after the same step: rank 0's clock and signals decide
            out_of_time, budget.signalled = map(bool, rank0_values(args.device, out_of_time, budget.signalled))
        if out_of_time:
            log(f"time budget: training stops at step {run.step}, {budget.minutes_in():.1f} min into the run")
            break
    if learned == 0 and run.step > first_step:
        raise ValueError("no prediction was trained on (every branch ran past the end of its text); "
                         "nothing was saved")
    return run.step


# a held-out GSM8K test problem (454) in the training prompts' words: the domain the hour trains on
NEXT_PROMPT = ("Marin and his neighbor Nancy each eat 4 apples a day. How many apples do they eat in 30 days? "
               "Solve step by step and end with 'The answer is N.'")


def summary(run):
    """What the run bought, in the units a user cares about: the tuned model's ConfAdapt(0.9) and
    --verify against the ORIGINAL model's k=1 on the held-out prompts, in tokens/s (decode.against_original),
    as far as the time budget allows; then the command that decodes with it."""
    original = run.teacher  # the frozen copy, or with gated LoRA the model itself (its k=1 is the original)
    end = run.budget.end
    measured = 0
    if run.eval_prompts and time.time() < end:
        run.student.eval()
        table, measured = against_original(original, run.student, run.tok, run.eval_prompts, run.args.eval_tokens,
                                           0.9, run.args.k_max, deadline=end)
    if measured:
        run.log(f"done in {run.budget.minutes_in():.1f} min | on {measured} held-out prompts"
                f"{f' of {len(run.eval_prompts)} (the time budget ended)' if measured < len(run.eval_prompts) else ''}, "
                f"interleaved, against the original model's k=1:")
        for line in describe_against_original(table):
            run.log("  " + line)
    elif run.eval_prompts:
        run.log(f"done in {run.budget.minutes_in():.1f} min | no time left in the budget to measure decoding")
    init = "" if run.out.resolve() == Path("out").resolve() else f" --init {run.out / 'model'}"
    run.log(f'next: python decode.py{init} --prompt "{NEXT_PROMPT}" --threshold 0.9')


def main(args, argv=()):
    run = setup(args)
    try:
        step, interrupted = train(run)
        model_state = save_checkpoint(run, step, probe(run))  # a signal's save comes first, before anything else
    except Diverged as diverged:  # nothing from what diverged is kept: OUT/model is the last good checkpoint
        raise ValueError(restore_last_good(run, diverged)) from None
    if run.master:
        save_final_model(run, step, model_state)
    if interrupted:  # a scheduler's grace period is short: no evaluation, only the way back
        run.log(f"stopped by a signal after step {step}; to continue: {resume_command(argv)}")
    elif run.master or args.fsdp:  # a sharded student needs every process for a forward pass
        summary(run)
    if run.ddp:
        dist.destroy_process_group()


def cli(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(get_args(argv), argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()

"""Turn a next-token model into a multi-token predictor by online self-distillation.

    python train.py                                        # SmolLM2-135M on a CPU: the hour-long recipe
    python train.py --init qwen3-4b                        # one GPU: the paper's recipe
    torchrun --nproc_per_node 8 train.py --init llama-3.1-8b --fsdp
    python train.py --resume                               # continue exactly where it stopped
    python train.py --init qwen3-4b --plan --gpu-memory 24  # what a 24 GiB card would run, before any download

The student starts as the model and the teacher is a frozen copy of it (docs/METHOD.md, "Training");
with --lora R gated adapters act on <MTP> rows only, so the model is its own teacher (lora.py).
Output: OUT/model, a Hugging Face folder that decode.py and transformers load (with --lora: the
adapter and the name of the original). A recipe gives every setting a default; a flag overrides it.
"""
import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from data import check_branches, first_cuts, get_rows, gsm8k_prompt, load_rows, tokenize
from data.own_answers import own_answer_examples
from data.held_out import closing_table, quick_eval
from distill import FrozenStore, build_batch, forwards_for, mtp_loss
from lora import add_lora
from support.budget import Budget, resume_command, stop_line
from support.checkpoint import Diverged, load_checkpoint, prepare_out, restore_last_good, save_checkpoint, save_final_model
from support.cli import ArgumentParser, add_cpu_kernels_arg, check_model_settings, check_train_args, fill_from_recipe, recipe_table
from support.cpu_kernels import use_few_row_kernels
from support.files import release_folders
from support.optim import autocast, describe_setup, make_optimizer, plan_memory
from support.plan import keep_frozen_rows, plan_before_download
from support.processes import average_gradients, end_processes, make_logger, rank0_values, shard_or_replicate, start_processes, summed_over_processes
from support.step_timing import faster_precision
from support.tokenizer import encode_prompt
from support.weights import load_model, model_config

# the paper's recipe (docs/METHOD.md, "Training"): its data, k up to 16, a branch every 32 tokens
PAPER = dict(data="metamathqa", dtype="bfloat16", amp="none", lora=0, lora_layers=0, lr=1e-5, lora_lr=1e-5, k_max=16,
             batch_size=16, grad_accum=8, seq_len=160, branch_every=32, branch_from="all", self_answers=0, warmup=2000,
             decay="none", steps=100_000, max_minutes=None, eval_every=1000, eval_prompts=4, save_every=1000)
RECIPES = {
    "paper-gpu": PAPER,
    # the paper's recipe on one GPU, stopped after 8 hours: about 10,700 steps at the 2.7 s a step of
    # Qwen3-4B's shape took on an H200 (docs/GPU.md), a tenth of the paper's 100,000
    "one-gpu": dict(PAPER, max_minutes=480),
    # what decoded fastest against the original model after the same CPU time (docs/LOG.md, "Choosing
    # the CPU hour's recipe"): gated LoRA in the top 4 blocks, the model's own answers to 512 GSM8K
    # questions, k up to 4, a branch after every answer token, no quick eval (one costs ~20 steps' time)
    "cpu-hour": dict(data="gsm8k", dtype="float32", amp="auto", lora=128, lora_layers=4, lr=1e-4, lora_lr=1e-3,
                     k_max=4, batch_size=4, grad_accum=1, seq_len=320, branch_every=1, branch_from="response",
                     self_answers=512, warmup=20, decay="none", steps=100_000, max_minutes=60, eval_every=0,
                     eval_prompts=8, save_every=100),
}
MAX_BAD_STEPS = 3  # non-finite steps in a row before training stops


def get_args(argv=None, fresh_out: bool = True):
    """fresh_out: refuse an --out that holds an earlier run unless --resume or --overwrite say what to do."""
    p = ArgumentParser(description=__doc__, epilog=recipe_table(RECIPES), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=list(RECIPES), help="defaults below (one-gpu, paper-gpu on several, cpu-hour on CPU)")
    p.add_argument("--init", default="smollm2-135m", help="preset, hub repo id, HF directory or .gguf")
    p.add_argument("--data", help="gsm8k, metamathqa or a JSONL file of question/answer or text rows")
    p.add_argument("--format", default="chat", choices=["chat", "plain"], help="chat template, or plain text")
    p.add_argument("--out", default="out", help="output folder: ckpt.pt while training, model/ at the end")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds an earlier run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="weights: float32, bfloat16 or float16 (low precision: float32 master copy)")
    p.add_argument("--amp", help="autocast matmuls to this dtype, none for off, auto: on a CPU with fast bfloat16, "
                   "bfloat16 or float32, whichever runs a step of this job faster (timed at start)")
    p.add_argument("--checkpoint-activations", default="auto", choices=["auto", "on", "off"], help="recompute blocks in backward")
    add_cpu_kernels_arg(p)
    p.add_argument("--lora", type=int, help="gated LoRA of this rank, 0: full fine-tuning (lora.py)")
    p.add_argument("--lora-layers", type=int, help="gated LoRA in the top N blocks only (0: all), fixed <MTP> embedding")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / rank (default alpha = rank)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--k-max", type=int, help="k is drawn from 2..k_max every micro-batch")
    p.add_argument("--k-weights", type=float, nargs="+", help="relative weight of each k of 2..k_max (default: alike)")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, help="ground-truth tokens per row")
    p.add_argument("--branch-every", type=int, help="tokens between branch cuts")
    p.add_argument("--branch-from", choices=["all", "response"], help="cut anywhere (the paper) or in answers only")
    p.add_argument("--self-answers", type=int, help="train on the model's own answers to N questions (0: the data's)")
    p.add_argument("--cache-frozen", default="on", choices=["on", "off"], help="keep the frozen rows (support.plan.keep_frozen_rows)")
    p.add_argument("--loss", default="hard", choices=["hard", "soft"], help="teacher argmax, or KL (docs/METHOD.md)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--decay", choices=["none", "linear", "cosine"], help="to zero at the budget's end (none: the paper)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget of the whole run, the closing table included")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, help="quick decode eval every N steps, 0 = never")
    p.add_argument("--eval-prompts", type=int, help="held-out prompts of the quick eval and the closing table")
    p.add_argument("--eval-tokens", type=int, default=128, help="new tokens per prompt in the quick eval and the closing table")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--fsdp", action="store_true", help="shard student, grads and optimizer across GPUs (FSDP2)")
    p.add_argument("--plan", action="store_true", help="print the plan of what fits the device's free memory, and exit")
    p.add_argument("--gpu-memory", type=float, help="plan for a GPU of this many GiB, present or not (implies --plan)")
    a = p.parse_args(argv)
    fill_from_recipe(a, RECIPES, p)  # and --amp auto is none unless this CPU computes bfloat16 fast
    check_train_args(a, p, fresh_out)
    return a


def lr_at(step, args, progress=0.0):
    """Linear warm-up, then the peak (the paper); --decay: to zero over the budget (progress 0..1)."""
    warm = min(1.0, (step + 1) / max(args.warmup, 1))
    decayed = {"none": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[args.decay]
    return args.lr * min(warm, decayed)


# -----------------------------------------------------------------------------
# the run: set-up, one step, the loop

@dataclass
class Run:
    args: argparse.Namespace
    student: torch.nn.Module          # the model being tuned (FSDP-sharded in place with --fsdp)
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
    frozen: FrozenStore = None        # gated LoRA: what the frozen original computes per text, kept (support.plan.keep_frozen_rows)
    k1_texts: dict = field(default_factory=dict)  # quick eval: (k=1 text, its teacher NLL) per prompt, if fixed
    hits: torch.Tensor = field(default=None)  # agreement per offset since the last log line
    counts: torch.Tensor = field(default=None)

    @property
    def master(self):
        return self.rank == 0

    @property
    def several(self):  # processes: data parallel, or sharded with --fsdp
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
        prepare_out(out, args.overwrite and not args.resume)  # a save a kill interrupted; --overwrite
    rows, held_out = load_rows(args.data, args.eval_prompts)  # data first: bad data fails in seconds, before a large model loads
    student, teacher = load_student_and_teacher(args, world, log)
    tok = student.tokenizer
    if plan := budget.plan(args.self_answers):
        log(plan)
    examples = (own_answer_examples(args, teacher, tok, rows, out / "self_answers.jsonl", log, rank == 0,
                                    budget.own_answers_deadline)
                if args.self_answers else tokenize(rows, tok, args.format, args.seq_len))
    check_branches(examples, args)
    eval_prompts = [encode_prompt(tok, gsm8k_prompt(r["question"]), args.format == "chat") for r in held_out if "question" in r]
    log(f"data {args.data}: {len(examples)} examples, {sum(len(e[0]) for e in examples) / len(examples):.0f} "
        f"tokens on average (format {args.format}, at most {args.seq_len})")

    shard_or_replicate(student, args.fsdp, world, teacher, log)
    run = Run(args, student, teacher, make_optimizer(student, args), tok, examples, eval_prompts, out, rank, world, log,
              budget=budget, hits=torch.zeros(args.k_max), counts=torch.zeros(args.k_max))
    if args.resume:
        run.step = run.last_good_step = load_checkpoint(run)  # also the precision the run started in
        log(f"resumed from {run.ckpt_path} at step {run.step}")
    if args.lora and args.cache_frozen == "on":
        first_block = student.cfg.n_layers - student.lora["layers"]
        run.frozen = FrozenStore(examples, first_cuts(examples, args.branch_from), args.k_max, first_block)
    if args.amp == "auto":  # time a real micro-batch of this job in float32 and in bfloat16; keep the faster
        batch = micro_batches(run, 0)[0]
        faster_precision(lambda: batch_loss(run, batch)[0].backward(), args, run.budget.amp_timing_seconds, log,
                         run.several, run.student)
        run.optimizer.zero_grad(set_to_none=True)
    run.frozen = run.frozen and keep_frozen_rows(run.frozen, run.student, args, len(run.examples), run.log)
    run.probe = probe_batch(run)
    run.good_probe = probe(run)  # the model as it starts: the original, or the checkpoint resumed
    return run


def load_student_and_teacher(args, world, log):
    """The student, and the frozen original as its teacher: a copy, or under gated LoRA the student itself."""
    student = load_model(args.init, device=args.device, dtype=getattr(torch, args.dtype))
    check_model_settings(student.cfg, args)
    if args.lora:
        init = str(Path(args.init).resolve()) if Path(args.init).exists() else args.init
        teacher = add_lora(student, args.lora, args.lora_alpha, base=init, layers=args.lora_layers or None)
    else:
        teacher = copy.deepcopy(student).requires_grad_(False).eval()
    if args.device == "cpu" and args.cpu_kernels:  # the own answers decode a few rows at a time
        use_few_row_kernels(student), use_few_row_kernels(teacher)
    student.train()
    log(describe_setup(student, args, world))
    plan_memory(student, args, world, log)
    return student, teacher


def micro_batches(run, step):
    """This rank's micro-batches of `step`: rows, k and cuts follow the global micro-batch index alone."""
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
    tokens, lengths, starts, texts = get_rows(run.examples, first, args.batch_size, args.seed, run.tok.eos_id)
    starts = starts.to(args.device) if args.branch_from == "response" else None
    batch = build_batch(tokens.to(args.device), lengths.to(args.device), k, run.student.cfg.mask_id,
                        args.branch_every, starts, g)
    batch.texts = texts
    return batch


def probe_batch(run):
    """The fixed batch every checkpoint is checked on (probe): the first rows, k = k_max."""
    return rows_batch(run, 0, run.args.k_max, torch.Generator().manual_seed(run.args.seed))


@torch.no_grad()
def probe(run) -> dict:
    """The model on run.probe in eval mode: the training loss, and the teacher loss at the cut (offset 1)."""
    training = run.student.training
    run.student.eval()
    with autocast(run.args, run.student):  # every process calls it: an FSDP-sharded student needs them all
        loss, metrics = mtp_loss(forwards_for(run.student, run.teacher, run.frozen), run.probe)
    run.student.train(training)
    n = metrics["agree_n"][0].clamp(min=1)
    return {"loss": loss.item(), "teacher": (metrics["loss_sum"][0] / n).item()}


def batch_loss(run, batch, denom=None):
    """The objective of one micro-batch (distill.mtp_loss) and its metrics."""
    return mtp_loss(forwards_for(run.student, run.teacher, run.frozen), batch, run.args.loss == "soft", denom)


def train_step(run, step):
    """One optimizer step: distill's loss on every micro-batch, clip, AdamW; a non-finite one is skipped."""
    args, batches = run.args, micro_batches(run, step)
    denom = torch.tensor(float(sum(b.valid.sum().item() for b in batches)), device=args.device)
    if run.several:
        dist.all_reduce(denom)
    lr = lr_at(step, args, run.progress)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, preds = 0.0, 0
    for batch in batches:
        with autocast(args, run.student):  # gradients are averaged over processes: the loss is a sum over the global batch
            loss, metrics = batch_loss(run, batch, denom=denom.clamp(min=1) / run.world)
        loss.backward()
        loss_sum += loss.item() / run.world
        run.hits[:batch.k] += metrics["agree_hit"].cpu()
        run.counts[:batch.k] += metrics["agree_n"].cpu()
        preds += metrics["n"]
    if run.several:
        loss_sum = summed_over_processes(args.device, loss_sum)
        if not args.fsdp:  # sharded, FSDP has averaged them
            average_gradients(run.student, run.world)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), args.clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP
    ok = denom.item() > 0 and math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if ok:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return dict(ok=ok, loss=loss_sum, grad_norm=grad_norm, lr=lr, preds=preds * run.world, empty=denom.item() == 0)


def train_loop(run):
    """Steps until --steps, --max-minutes or a stop signal, with logging, quick evals and checkpoints."""
    args, log, budget = run.args, run.log, run.budget
    budget.start_training(run.progress, bool(args.self_answers))
    t_start, first_step, t_log, preds_since, bad, learned = time.time(), run.step, time.time(), 0, 0, 0
    while run.step < args.steps and not budget.signalled:
        run.progress = budget.spent(run.step, args.steps)
        if run.several:  # one learning rate for every process: rank 0's clock
            run.progress, = rank0_values(args.device, run.progress)
        r = train_step(run, run.step)
        if not r["ok"]:
            bad += 1
            why = "no valid branch in this batch" if r["empty"] else \
                f"non-finite {'loss' if not math.isfinite(r['loss']) else 'gradient'}"
            log(f"step {run.step + 1}: {why}; step skipped ({bad} in a row)")
            if bad >= MAX_BAD_STEPS:  # bad data stops with its reason; a divergence restores the last good model
                raise ValueError(f"{bad} steps in a row were skipped ({why}); stopping") if r["empty"] else \
                    Diverged(run.step + 1, f"{bad} steps in a row were skipped ({why})")
            run.step += 1
            continue
        bad, learned, preds_since, run.step = 0, learned + r["preds"], preds_since + r["preds"], run.step + 1
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
        if run.several:  # every process stops after the same step: rank 0's clock and signals decide
            out_of_time, budget.signalled = map(bool, rank0_values(args.device, out_of_time, budget.signalled))
        if out_of_time:
            log(f"time budget: training stops at step {run.step}, {budget.minutes_in():.1f} min into the run")
            break
    if learned == 0 and run.step > first_step:
        raise ValueError("no prediction was trained on (every branch ran past the end of its text); nothing was saved")
    return run.step


# a held-out GSM8K test problem (454) in the training prompts' words: the domain the hour trains on
NEXT_PROMPT = ("Marin and his neighbor Nancy each eat 4 apples a day. How many apples do they eat in 30 days? "
               "Solve step by step and end with 'The answer is N.'")


def summary(run):
    """What the run bought: the tuned model against the original's k=1 on held-out prompts, as far as
    the budget allows (data.held_out.closing_table); then the command that decodes with it."""
    run.student.eval()
    for line in closing_table(run.teacher, run.student, run.tok, run.eval_prompts, run.args.eval_tokens,
                              run.args.k_max, run.budget, run.args.device if run.args.fsdp else None):
        run.log(line)
    init = "" if run.out.resolve() == Path("out").resolve() else f" --init {run.out / 'model'}"
    run.log(f'next: python decode.py{init} --prompt "{NEXT_PROMPT}" --threshold 0.9')


def main(args, argv=()):
    if plan_before_download(args, model_config(args.init)):  # what fits the device, from the model's config alone
        return
    run = setup(args)
    run.log(f"if this run stops, this continues it: {resume_command(argv)}")
    try:
        with run.budget.stop_on_signals():  # Ctrl-C or SIGTERM: the step in flight finishes, then the save
            step = train_loop(run)
        model_state = save_checkpoint(run, step, probe(run))  # a signal's save comes first, before anything else
    except Diverged as diverged:  # nothing from what diverged is kept: OUT/model is the last good checkpoint
        raise ValueError(restore_last_good(run, diverged)) from None
    except RuntimeError as e:  # out of memory, or another process of the run died: one line, and what to do
        if (line := stop_line(run, e, argv)) is None:
            raise
        raise ValueError(line) from None
    if run.master:
        save_final_model(run, step, model_state)
    if run.budget.signalled:  # a scheduler's grace period is short: no evaluation, only the way back
        run.log(f"stopped by a signal after step {step}; to continue: {resume_command(argv)}")
    elif run.master or args.fsdp:  # sharded: every process decodes, with rank 0's decisions
        summary(run)


def cli(argv=None):
    argv, error = sys.argv[1:] if argv is None else argv, None
    try:
        main(get_args(argv), argv)
    except (ValueError, FileNotFoundError) as e:
        error = f"error: {e}"
    finally:  # the run lets go of its --out (support/files.py); an in-process caller may start another
        release_folders()
    end_processes(error)


if __name__ == "__main__":
    cli()

"""Turn a next-token model into a multi-token predictor by online self-distillation.

    python train.py --init qwen3-4b                        # one GPU, the paper's recipe
    python train.py                                        # SmolLM2-135M on GSM8K, runs on a CPU
    torchrun --nproc_per_node 8 train.py --init llama-3.1-8b --data metamathqa
    python train.py --resume                               # continue exactly where it stopped

The student starts as the model, the teacher is a frozen copy of it (METHOD.md, "Training").
Output: out/model, a Hugging Face directory that decode.py and transformers load as they are.
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import format_example, gsm8k_prompt, load_dataset, load_gsm8k
from decode import encode_prompt, generate, generate_batch
from distill import build_batch, mtp_loss
from model import Transformer, rope_frequencies


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="smollm2-135m", help="preset, hub repo id, HF directory or .gguf")
    p.add_argument("--data", default=None, help="gsm8k (CPU default), metamathqa (GPU default) or a JSONL file")
    p.add_argument("--format", default="chat", choices=["chat", "plain"],
                   help="chat: the model's chat template; plain: BOS + question + blank line + answer")
    p.add_argument("--out", default="out", help="output folder: ckpt.pt while training, model/ at the end")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="weights: float32 / bfloat16 (default: bfloat16 GPU, float32 CPU)")
    p.add_argument("--amp", default=None, help="autocast matmuls to this dtype, 'none' for off (default: bfloat16 "
                   "on CPU, where it is ~2x faster and keeps float32 weights; none on GPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 100k GPU, 300 CPU)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much training time")
    p.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch (default 16 GPU, 4 CPU)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 8 GPU, 1 CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="ground-truth tokens per row (default 160 GPU, 256 CPU)")
    p.add_argument("--k-max", type=int, default=16, help="k is drawn from 2..k_max every micro-batch")
    p.add_argument("--branch-every", type=int, default=None, help="tokens between branch cuts (default 32 GPU, 4 CPU)")
    p.add_argument("--branch-from", default=None, choices=["all", "response"],
                   help="cut branches anywhere (paper) or only in the answer (default: all GPU, response CPU)")
    p.add_argument("--self-answers", type=int, default=0, help="train on the model's own greedy answers to N "
                   "of the training questions instead of the dataset's answers (0: the paper's ground truth)")
    p.add_argument("--loss", default="hard", choices=["hard", "soft"])
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 2000 GPU, 20 CPU)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=None, help="quick decode eval (default 1000 GPU, 100 CPU)")
    p.add_argument("--eval-prompts", type=int, default=4)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default 1000 GPU, 50 CPU)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--fsdp", action="store_true", help="shard student, grads and optimizer across GPUs (FSDP2)")
    p.add_argument("--bench-step", type=int, default=0, help="time N MTP steps vs N plain fine-tuning steps, then exit")
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    defaults = dict(data="metamathqa" if gpu else "gsm8k", dtype="bfloat16" if gpu else "float32",
                    amp="none" if gpu else "bfloat16",
                    steps=100_000 if gpu else 300, batch_size=16 if gpu else 4, grad_accum=8 if gpu else 1,
                    seq_len=160 if gpu else 256, branch_every=32 if gpu else 4,
                    branch_from="all" if gpu else "response", warmup=2000 if gpu else 20,
                    eval_every=1000 if gpu else 100, save_every=1000 if gpu else 50)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.k_max < 2:
        p.error("--k-max must be at least 2")
    for name in ("dtype", "amp"):
        if getattr(a, name) not in ("float32", "bfloat16", "float16") + (("none",) if name == "amp" else ()):
            p.error(f"--{name} must be float32, bfloat16 or float16, not {getattr(a, name)}")
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


def write_self_answers(model, tok, rows, n, max_new, prompt_of, path, log, batch=32):
    """Write the model's own greedy answers to n questions to path, one {ids, prompt_len} per line.
    METHOD.md: the authors recommend tuning on prompts from the deployment domain; with the model's
    own answers the training prefixes are exactly the contexts that decoding meets. Questions whose
    prompts have the same length are answered together, the largest groups first."""
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
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("\n".join(lines[:n]) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# helpers

def memory_estimate(model, dtype, world, fsdp):
    n = sum(p.numel() for p in model.parameters())
    b = torch.finfo(dtype).bits // 8
    shard = world if fsdp else 1
    parts = {"student": n * b / shard, "grads": n * b / shard, "adamw": 2 * n * b / shard, "teacher": n * b}
    gib = {k: v / 2**30 for k, v in parts.items()}
    return n, gib


def autocast(args):
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(args.device.split(":")[0], dtype=getattr(torch, args.amp))


def lr_at(step, args):
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1))  # warm-up, then constant (paper)


@torch.no_grad()
def quick_eval(model, prompts, stop_ids, k_max, max_new=128):
    """ConfAdapt(0.9) vs the same model's own next-token decoding on held-out prompts."""
    model.eval()
    accel, same = [], 0
    for p in prompts:
        ref = generate(model, p, max_new, k=1, stop_ids=stop_ids)
        mtp = generate(model, p, max_new, threshold=0.9, k_max=k_max, stop_ids=stop_ids)
        accel.append(mtp.acceleration)
        same += mtp.tokens == ref.tokens
    model.train()
    return sum(accel) / len(accel), same / len(prompts)


def gather_state(student, optimizer):
    """Model and optimizer state as whole tensors keyed by name (collected from every process when
    the student is sharded with FSDP, so every process must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path, student, optimizer, step, args, master):
    model_state, optim_state = gather_state(student, optimizer)
    if master:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model_state, "optimizer": optim_state, "step": step, "args": vars(args)}, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact
    return model_state


def main(args):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"

    student = Transformer.from_pretrained(args.init, device=args.device, dtype=dtype)
    tok = student.tokenizer
    teacher = copy.deepcopy(student).requires_grad_(False).eval()  # frozen original
    student.train()
    n_params, gib = memory_estimate(student, dtype, world, args.fsdp)
    log(f"model {args.init}: {n_params / 1e6:.1f}M params, mask id {student.cfg.mask_id}, {args.dtype}, "
        f"{world} process(es) on {args.device}")
    log("memory per device (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in gib.items())
        + f", total {sum(gib.values()):.2f} + activations")

    rows = load_dataset(args.data)
    if args.data.startswith("gsm8k"):  # held-out prompts for the quick eval: GSM8K test, else the last rows
        held_out = load_gsm8k("test")[:args.eval_prompts]
    else:
        held_out, rows = rows[len(rows) - args.eval_prompts:], rows[:len(rows) - args.eval_prompts]
    if args.self_answers:
        prompt_of = gsm8k_prompt if args.data.startswith("gsm8k") else (lambda q: q)
        path = out / "self_answers.jsonl"
        if master and not path.exists():  # kept in the output folder: a resumed run reuses them
            write_self_answers(teacher, tok, [r for r in rows if "question" in r], args.self_answers,
                               args.seq_len // 2, prompt_of, path, log)
        if ddp:
            dist.barrier()
        answers = map(json.loads, path.read_text().splitlines())
        examples = [(r["ids"][:args.seq_len], r["prompt_len"]) for r in answers]
    else:
        examples = tokenize(rows, tok, args.format, args.seq_len)
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
    elif ddp:
        model = torch.nn.parallel.DistributedDataParallel(student)
    decay = [p for n, p in student.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=tuple(args.betas))
    step = 0
    if args.resume:
        if not ckpt_path.exists():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # our own file, tensors only
        set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        step = state["step"]
        log(f"resumed from {ckpt_path} at step {step}")

    def micro_batches(step):
        """This rank's micro-batches of `step`: rows, k and branch offsets depend only on the global
        micro-batch index, so N processes see what 1 process with N times the accumulation sees."""
        out = []
        for m in range(args.grad_accum):
            micro = step * args.grad_accum * world + m * world + rank  # global micro-batch index
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + micro)
            k = int(torch.randint(2, args.k_max + 1, (1,), generator=g))
            first = micro * args.batch_size
            tokens, lengths, starts = get_rows(examples, first, args.batch_size, args.seed, tok.eos_id)
            starts = starts if args.branch_from == "response" else None
            batch = build_batch(tokens.to(args.device), lengths.to(args.device), k, student.cfg.mask_id,
                                args.branch_every, None if starts is None else starts.to(args.device), g)
            out.append(batch)
        return out

    if args.bench_step:
        return bench_step(model, teacher, micro_batches, optimizer, args, log)

    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))  # Ctrl-C: finish the step, save, exit
    t_start, first_step = time.time(), step
    t_log, preds_since = time.time(), 0
    hits = torch.zeros(args.k_max)
    counts = torch.zeros(args.k_max)
    while step < args.steps and not stop["now"]:
        batches = micro_batches(step)
        denom = torch.tensor(float(sum(b.valid.sum().item() for b in batches)), device=args.device)
        if ddp:
            dist.all_reduce(denom)
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1 or not ddp or args.fsdp
            ctx = model.no_sync() if not sync else torch.enable_grad()
            with ctx:
                # DDP averages gradients over processes; the loss is a sum over the global batch
                with autocast(args):
                    loss, metrics = mtp_loss(model, teacher, batch, soft=args.loss == "soft",
                                             denom=denom.clamp(min=1) / world)
                loss.backward()
            loss_sum += loss.item() / world
            hits[:batch.k] += metrics["agree_hit"].cpu()
            counts[:batch.k] += metrics["agree_n"].cpu()
            preds_since += metrics["n"]
        if ddp:
            t = torch.tensor([loss_sum], device=args.device)
            dist.all_reduce(t)
            loss_sum = t.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == 1:
            dt = time.time() - t_log
            shown = min(6, len(hits))
            agree = " ".join(f"{h / c:.2f}" if c else "-" for h, c in zip(hits[:shown], counts[:shown]))
            elapsed = time.time() - t_start
            eta = elapsed / (step - first_step) * (args.steps - step)
            if args.max_minutes:
                eta = min(eta, args.max_minutes * 60 - elapsed)
            log(f"step {step} | loss {loss_sum:.4f} | agree@1..{shown} {agree} | gnorm {grad_norm:.2f} | lr {lr:.2e} "
                f"| {preds_since * world / dt:.0f} preds/s | eta {eta / 60:.1f} min")
            t_log, preds_since = time.time(), 0
            hits.zero_(), counts.zero_()
        if (master or args.fsdp) and args.eval_every and eval_prompts and step % args.eval_every == 0:
            acc, same = quick_eval(student, eval_prompts, tok.stop_ids, args.k_max)
            log(f"eval step {step} | ConfAdapt(0.9) acceleration {acc:.2f} | same text as k=1 {same:.2f}")
        if step % args.save_every == 0:
            save_checkpoint(ckpt_path, student, optimizer, step, args, master)
        if args.max_minutes and (time.time() - t_start) / 60 > args.max_minutes:
            log(f"time budget of {args.max_minutes} min reached at step {step}")
            break
    model_state = save_checkpoint(ckpt_path, student, optimizer, step, args, master)
    if master:
        final = student
        if args.fsdp:  # a plain copy of the gathered weights to write out
            with torch.device("meta"):
                final = Transformer(student.cfg)
            final.load_state_dict(model_state, assign=True)
            if final.cfg.tie_embeddings:
                final.lm_head.weight = final.embed_tokens.weight
            final.inv_freq = rope_frequencies(final.cfg)
            final.tokenizer = tok
        final.cfg.k_max = args.k_max  # decode.py uses as many masks as the model was trained for
        final.save_pretrained(out / "model")
        (out / "model" / "train_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        log(f"saved {out / 'model'} (step {step})")
    if ddp:
        dist.destroy_process_group()


def bench_step(model, teacher, micro_batches, optimizer, args, log):
    """The cost of one MTP step against one plain fine-tuning step (student forward + backward with
    next-token cross-entropy) on the same ground-truth rows. METHOD.md expects about 4/3."""
    def mtp(b):
        with autocast(args):
            loss, _ = mtp_loss(model, teacher, b)
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
        batches = micro_batches(step)
        for name, fn in (("mtp", mtp), ("plain", plain)):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step:  # the first step is warm-up
                times[name] += time.perf_counter() - t0
            optimizer.zero_grad(set_to_none=True)
    ratio = times["mtp"] / times["plain"]
    log(f"bench: {args.bench_step} steps | mtp {times['mtp'] / args.bench_step:.3f} s/step | plain "
        f"{times['plain'] / args.bench_step:.3f} s/step | ratio {ratio:.2f} (METHOD.md: about 1.33)")
    return ratio


if __name__ == "__main__":
    try:
        main(get_args())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

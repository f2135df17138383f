"""The model's own answers as training text: the CPU recipe's data (train.py --self-answers N).

The paper recommends tuning on prompts from the deployment domain (docs/METHOD.md, "Training");
with the model's own greedy answers the training prefixes are exactly the contexts decoding meets.
They are generated once, in batches of prompts of the same length, and kept in the output folder.
"""
import json
import math
import time

import torch.distributed as dist

from data import gsm8k_prompt
from decode import encode_prompt, generate_batch
from support.files import write_file_atomically


def write_own_answers(model, tok, rows, n, max_new, prompt_of, path, log, header, batch=32, deadline=math.inf):
    """Write the model's own greedy answers to n questions to path, one {ids, prompt_len} per line
    after a first line that says what made them. Questions whose prompts have the same length are
    answered together, the largest groups first. At the deadline (time.time()) it stops with the
    answers it has, at least one batch."""
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
        if lines and time.time() > deadline:
            log(f"self-answers: stopped at {len(lines)}/{n}, the share of the time budget they may take "
                f"(--max-minutes); training uses these")
            break
        prompts = prompts[:n - len(lines)]
        for p, a in zip(prompts, generate_batch(model, prompts, max_new, tok.stop_ids)):
            lines.append(json.dumps({"ids": p + a, "prompt_len": len(p)}))
        log(f"self-answers: {len(lines)}/{n} in {time.time() - t0:.0f} s")
    text = "\n".join([header] + lines[:n]) + "\n"
    write_file_atomically(path, lambda tmp: tmp.write_text(text), len(text))


def own_answer_examples(run_args, teacher, tok, rows, path, log, write: bool, deadline=math.inf):
    """The model's own answers (write_own_answers), generated once (by the first process) and kept
    in the output folder: a resumed or repeated run with the same model and count reuses them.
    deadline: when generating them must stop (a time budget's share), with fewer answers."""
    header = json.dumps({"meta": {"init": run_args.init, "n": run_args.self_answers, "max_new": run_args.seq_len // 2}})
    if write and not (path.exists() and path.read_text().split("\n", 1)[0] == header):
        prompt_of = gsm8k_prompt if run_args.data.startswith("gsm8k") else (lambda q: q)
        questions = [r for r in rows if "question" in r]
        if not questions:
            raise ValueError(f"--self-answers needs questions, and {run_args.data} has only text rows")
        write_own_answers(teacher, tok, questions, run_args.self_answers, run_args.seq_len // 2, prompt_of,
                           path, log, header, deadline=deadline)
    if dist.is_initialized():
        dist.barrier()
    answers = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    return [(r["ids"][:run_args.seq_len], r["prompt_len"]) for r in answers]

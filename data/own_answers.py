"""The model's own answers as training text: the CPU recipe's data (train.py --self-answers N).

The paper recommends tuning on prompts from the deployment domain (docs/METHOD.md, "Training");
with the model's own greedy answers the training prefixes are exactly the contexts decoding meets.
They are generated once, in batches of prompts of the same length, and kept in the output folder.
"""
import errno
import hashlib
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist

from data import gsm8k_prompt
from support.files import write_file_atomically
from support.static_passes import BatchedSteps, uses_static_passes
from support.tokenizer import encode_prompt


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), steps=None) -> list[list[int]]:
    """Plain greedy decoding of several prompts of the same length at once, each output cut after
    its first stop token. On a CPU a batch costs about what one prompt costs (the weights are read
    once per step), which makes it cheap to collect a model's own answers as training text.
    steps: a BatchedSteps (a GPU's captured passes, support/static_passes.py), else eager passes."""
    device, n = model.embed_tokens.weight.device, len(prompts)
    if steps is not None:
        assert n <= steps.batch, f"{n} prompts in a batch of {steps.batch}"
        prompts = prompts + prompts[:1] * (steps.batch - n)  # one batch size: one graph
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    B, T = idx.shape
    if steps is None:
        cache = model.new_cache(T + max_new_tokens, batch=B)
        logits = model.output(model.hidden(idx, cache=cache)[:, -1])
        # the eager step: the cache knows its position
        steps = lambda tokens, position: model(tokens[:, None], cache=cache)[:, -1]  # noqa: E731
    else:
        logits = steps.prefill(idx)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out = []
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1)
        out.append(nxt)
        done |= torch.isin(nxt[:n], stop)
        if done.all():
            break
        logits = steps(nxt, T + i)
    rows = torch.stack(out, 1)[:n].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def write_own_answers(model, tok, rows, n, max_new, prompt_of, path, log, header, batch=32, deadline=math.inf):
    """Write the model's own greedy answers to n questions to path, one {ids, prompt_len} per line
    after a first line that says what made them, and a last line {"complete": count, "sha256": of the rest}. Questions whose
    prompts have the same length are answered together, the largest groups first. Each batch is
    appended as it comes: a run killed meanwhile keeps them, and the next one with the same header
    answers only the batches after them. At the deadline (time.time()) it stops with the answers it
    has, at least one batch."""
    groups = {}
    for row in rows:
        prompt = encode_prompt(tok, prompt_of(row["question"]), True)
        groups.setdefault(len(prompt), []).append(prompt)
    batches = [g[i:i + batch] for g in sorted(groups.values(), key=len, reverse=True)
               for i in range(0, len(g), batch)]
    lines = written_batches(path, header, batches, n)
    text = "\n".join([header] + lines) + "\n"  # without a batch that a kill cut short
    write_file_atomically(path, lambda tmp: tmp.write_text(text), len(text))
    if lines:
        log(f"self-answers: {len(lines)}/{n} kept from an interrupted run")
    t0, done = time.time(), 0
    longest = max((len(p) for b in batches for p in b), default=0)
    steps = BatchedSteps(model, batch, longest + max_new) if uses_static_passes(model, None) and batches else None
    for prompts in batches:
        prompts = prompts[:n - done]
        if not prompts:
            break
        if done + len(prompts) <= len(lines):  # written before the kill
            done += len(prompts)
            continue
        if done and time.time() > deadline:
            log(f"self-answers: stopped at {done}/{n}, the share of the time budget they may take "
                f"(--max-minutes); training uses these")
            break
        new = [json.dumps({"ids": p + a, "prompt_len": len(p)})
               for p, a in zip(prompts, generate_batch(model, prompts, max_new, tok.stop_ids, steps))]
        append_lines(path, new)
        done += len(new)
        log(f"self-answers: {done}/{n} in {time.time() - t0:.0f} s")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # a byte that changes later is caught where it is read
    append_lines(path, [json.dumps({"complete": done, "sha256": digest})])


def written_batches(path, header, batches, n) -> list[str]:
    """The answer lines of an interrupted earlier write with this header, up to its last whole batch."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").split("\n")
    if lines[0] != header:
        return []
    done = 0
    for prompts in batches:
        size = len(prompts[:n - done])
        batch_lines = lines[1 + done:1 + done + size]
        if size == 0 or len(batch_lines) < size or not all(map(is_answer, batch_lines)):
            break
        done += size
    return lines[1:1 + done]


def is_answer(line: str) -> bool:
    try:
        return isinstance(json.loads(line)["ids"], list)
    except (ValueError, KeyError, TypeError):
        return False


def append_lines(path, lines: list[str]):
    """Append lines to path and make them durable, or say how much a full disk lacked."""
    text = "".join(line + "\n" for line in lines)
    try:
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise ValueError(f"the disk is full: appending {len(text)} bytes to {path} failed with "
                         f"{shutil.disk_usage(path.parent).free} bytes free; the answers written so far are kept, "
                         f"and the next run continues after them") from None


def own_answer_examples(run_args, teacher, tok, rows, path, log, write: bool, deadline=math.inf):
    """The model's own answers (write_own_answers), generated once (by the first process) and kept
    in the output folder: a resumed or repeated run with the same model and count reuses them.
    deadline: when generating them must stop (a time budget's share), with fewer answers."""
    header = json.dumps({"meta": {"init": run_args.init, "n": run_args.self_answers, "max_new": run_args.seq_len // 2}})
    if write and not is_complete(path, header):
        prompt_of = gsm8k_prompt if run_args.data.startswith("gsm8k") else (lambda q: q)
        questions = [r for r in rows if "question" in r]
        if not questions:
            raise ValueError(f"--self-answers needs questions, and {run_args.data} has only text rows")
        write_own_answers(teacher, tok, questions, run_args.self_answers, run_args.seq_len // 2, prompt_of,
                          path, log, header, deadline=deadline)
    if dist.is_initialized():
        dist.barrier()
    if not is_complete(path, header):
        raise ValueError(f"{path} holds no complete answers for this run; remove the file to write them again")
    examples = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines()[1:-1], 2):
        try:
            r = json.loads(line)
            ids, prompt_len = r["ids"], r["prompt_len"]
            if not all(isinstance(t, int) and 0 <= t < tok.n_vocab for t in ids) or not 0 < prompt_len < len(ids):
                raise TypeError
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {i}: not an answer ({type(e).__name__}); remove the file to write "
                             f"the answers again") from None
        examples.append((ids[:run_args.seq_len], prompt_len))
    return examples


def is_complete(path, header) -> bool:
    """path holds answers written under this header to their end. One whose last line says so but
    whose sha256 no longer matches changed after it was written: an error, never silently reused."""
    if not path.exists():
        return False
    data = path.read_bytes()
    body, _, last = data.rstrip(b"\n").rpartition(b"\n")
    if not data.startswith(header.encode() + b"\n"):
        return False
    try:
        end = json.loads(last)
    except (ValueError, UnicodeDecodeError):
        return False
    if not (isinstance(end, dict) and "complete" in end):
        return False
    if end.get("sha256") != hashlib.sha256(body + b"\n").hexdigest():
        raise ValueError(f"{path} does not match its sha256: it changed after it was written; remove the file "
                         f"to write the answers again")
    return True

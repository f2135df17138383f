"""What a tuned model buys on held-out problems: its decoding against the original model's k=1, the
closing table train.py ends with (and bench.py --against-original), and train.py's quick evaluation."""
import time

import torch

from data import extract_number
from decode import generate
from distill import teacher_nll
from support.cli import TREE
from support.processes import rank0_values
from support.sizing import measure_pass_cost


@torch.no_grad()
def against_original(original, model, tok, prompts, max_new_tokens: int, threshold: float = 0.9,
                     k_max: int | None = None, deadline: float = float("inf"), teacher_loss: bool = False,
                     trees=(None,), rank0_on: str | None = None, sampler=None) -> tuple[dict, int]:
    """The tuned model's decoding against the ORIGINAL model's k=1, prompt by prompt, interleaved so
    that load on the machine hits every strategy alike: tokens/s and its ratio to the original's, tokens
    per pass, how often the text and the final number are the original's, and if asked the teacher loss
    (the original's NLL per new token, distill.teacher_nll). Passes are sized by their cost, as
    decode.py sizes them. original may be model itself (gated LoRA: its k=1 is the original).
    No prompt starts after the deadline (time.time()). rank0_on: a device, in a sharded run, whose every process
    measures alike and takes rank 0's decisions (the deadline, the passes' sizes: sizing.PassCost.agreed).
    Returns the table ({} if no prompt was measured)
    and the number of prompts it measured. trees: the --verify trees to measure (None: decode.py's).
    sampler (support/sampling.py): every strategy samples, the original's k=1 too."""
    k_max = k_max or model.cfg.k_max or 16
    tuned_k1 = original is not model
    stop = dict(stop_ids=sorted(tok.stop_ids), sampler=sampler)  # how every strategy ends and draws
    strategies = {"original k=1": lambda p, _, n=max_new_tokens: generate(original, p, n, k=1, **stop)}
    if tuned_k1:  # full fine-tuning: the tuned model's own k=1 is another model
        strategies["k=1"] = lambda p, _, n=max_new_tokens: generate(model, p, n, k=1, **stop)
    strategies[f"ConfAdapt({threshold})"] = lambda p, c, n=max_new_tokens: generate(
        model, p, n, threshold=threshold, k_max=k_max, pass_cost=c, **stop)
    costs = {"original k=1": None, "k=1": None, f"ConfAdapt({threshold})": measure_pass_cost(model, k_max, False)}
    for tree in trees:
        name = "--verify" if len(trees) == 1 else f"--verify, tree {tree or TREE}"
        tree = 1 if sampler is not None else tree or TREE  # speculative sampling checks a chain
        strategies[name] = lambda p, c, n=max_new_tokens, tree=tree: generate(
            model, p, n, verify=True, k_max=k_max, pass_cost=c, tree=tree, **stop)
        costs[name] = measure_pass_cost(model, k_max, True, tree)
    for cost in costs.values():
        if cost is not None:
            cost.rank0_on = rank0_on
    for name, run in strategies.items():  # warm-up: every kernel has chosen for its rows
        run(prompts[0][:16], costs[name], 8)
    totals = {name: dict(tokens=0, seconds=0.0, passes=0, same=0, same_answer=0, nll=0.0, per_prompt=[])
              for name in strategies}
    measured = 0
    for prompt in prompts:
        late = time.time() > deadline
        if rank0_on is not None:  # every process stops at rank 0's clock
            late = bool(rank0_values(rank0_on, late)[0])
        if late:
            break
        measured += 1
        ref = None
        for name, run in strategies.items():
            r = run(prompt, costs[name])
            ref = r.tokens if ref is None else ref  # the original's k=1 runs first
            t = totals[name]
            t["tokens"] += len(r.tokens)
            t["seconds"] += r.seconds
            t["passes"] += r.passes
            t["same"] += r.tokens == ref
            t["same_answer"] += extract_number(tok.decode(r.tokens)) == extract_number(tok.decode(ref))
            nll = teacher_nll(original, prompt, r.tokens) if teacher_loss else 0.0
            t["nll"] += nll
            t["per_prompt"].append((nll, len(r.tokens)))
    if not measured:
        return {}, 0
    base = totals["original k=1"]["tokens"] / totals["original k=1"]["seconds"]
    return {name: {"tokens_per_s": t["tokens"] / t["seconds"], "vs_original": t["tokens"] / t["seconds"] / base,
                   "tokens_per_pass": t["tokens"] / max(t["passes"], 1), "same_text": t["same"] / measured,
                   "same_answer": t["same_answer"] / measured,
                   **({"teacher_loss": t["nll"] / max(t["tokens"], 1), "teacher_nll_and_tokens": t["per_prompt"]}
                      if teacher_loss else {})}
            for name, t in totals.items()}, measured


def describe_against_original(table: dict) -> list[str]:
    """against_original's table, a line per strategy."""
    return [f"{name:<16} {t['tokens_per_s']:6.1f} tokens/s {t['vs_original']:5.2f}x the original's k=1 | "
            f"{t['tokens_per_pass']:.2f} tokens per pass | final answer = the original's {t['same_answer']:.0%}, "
            f"text {t['same_text']:.0%}" + (f" | teacher loss {t['teacher_loss']:.3f}" if "teacher_loss" in t else "")
            for name, t in table.items()]


def closing_table(original, model, tok, prompts, max_new_tokens: int, k_max: int, budget,
                  rank0_on: str | None = None) -> list[str]:
    """train.py's closing lines: ConfAdapt(0.9) and --verify against the original model's k=1 on the
    held-out prompts (against_original), with as many prompts as the run's budget (support/budget.py) leaves;
    rank0_on: a sharded run's device, whose processes all decode, taking rank 0's decisions."""
    if not prompts:
        return []
    measured = 0
    if time.time() < budget.end:
        table, measured = against_original(original, model, tok, prompts, max_new_tokens, 0.9, k_max,
                                           deadline=budget.end, rank0_on=rank0_on)
    if not measured:
        return [f"done in {budget.minutes_in():.1f} min | no time left in the budget to measure decoding"]
    cut = f" of {len(prompts)} (the time budget ended)" if measured < len(prompts) else ""
    return ([f"done in {budget.minutes_in():.1f} min | on {measured} held-out prompts{cut}, interleaved, against "
             f"the original model's k=1:"] + ["  " + line for line in describe_against_original(table)])


@torch.no_grad()
def quick_eval(model, teacher, prompts, max_new_tokens: int, k_max: int, stop_ids, k1_texts: dict | None = None) -> str:
    """ConfAdapt(0.9) against the same model's own next-token decoding on held-out prompts, and the
    teacher loss of both texts (the original model's NLL per token, docs/METHOD.md, "Evaluation").
    k1_texts: where k=1 is the untouched original (gated LoRA), its texts and losses, kept between calls."""
    training = model.training
    model.eval()
    accel, same, nll, n_tokens = [], 0, [0.0, 0.0], [0, 0]
    for i, p in enumerate(prompts):
        if k1_texts is not None and i in k1_texts:
            ref, ref_nll = k1_texts[i]
        else:
            ref = generate(model, p, max_new_tokens, k=1, stop_ids=stop_ids).tokens
            ref_nll = teacher_nll(teacher, p, ref)
            if k1_texts is not None:
                k1_texts[i] = ref, ref_nll
        mtp = generate(model, p, max_new_tokens, threshold=0.9, k_max=k_max, stop_ids=stop_ids)
        accel.append(mtp.acceleration)
        same += mtp.tokens == ref
        nll[0] += ref_nll
        nll[1] += teacher_nll(teacher, p, mtp.tokens)
        n_tokens[0] += len(ref)
        n_tokens[1] += len(mtp.tokens)
    model.train(training)
    return (f"ConfAdapt(0.9) on {len(prompts)} held-out prompts: acceleration {sum(accel) / len(accel):.2f} tokens "
            f"per pass (k=1: 1.00), same text as k=1 {same}/{len(prompts)}, teacher loss "
            f"{nll[1] / max(n_tokens[1], 1):.3f} (k=1 {nll[0] / max(n_tokens[0], 1):.3f})")

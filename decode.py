"""Decode with a multi-token-prediction model: plain next-token, static k, ConfAdapt, or --verify.

    python decode.py --prompt "What is 7 * 8?" --threshold 0.9     # ConfAdapt, k_max 16
    python decode.py --init smollm2-135m --prompt "..." --k 3       # static k = 3
    python decode.py --prompt "..." --verify                        # lossless: the output of k = 1
    python decode.py --prompt "..." --threshold 0.9 --show-chunks   # colour each pass's tokens

Every forward pass feeds the tokens accepted in the previous pass as real inputs, followed by
<MTP> mask slots, under a plain causal mask (docs/METHOD.md, "Decoding"). Mask slots never stay in the
KV cache: after each pass it is cut back to the committed real tokens. --verify feeds the drafts of
the previous pass as real inputs and keeps them only where the model agrees (generate_verify).
"""
import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from data import extract_number
from distill import teacher_nll
from support.cli import ArgumentParser
from support.cpu_kernels import fast_dtype, packed_summary, use_few_row_kernels
from support.sizing import Acceptance, PassCost, RankAcceptance, best_n, draft_tree
from support.weights import load_model, trained_model

DEFAULT_OUT = "out"  # where train.py writes (train.py --out)
TREE = 1  # --verify: the candidates tried at each draft position (--tree)


@dataclass
class Result:
    tokens: list[int]                  # new tokens, cut after the first stop token
    passes: int                        # forward passes, the first (prompt) pass included
    seconds: float
    chunks: list[int] = field(default_factory=list)  # tokens accepted per pass
    drafts_fed: int = 0       # --verify: drafts fed as real inputs, over all passes
    drafts_accepted: int = 0  # --verify: of those, the ones equal to the model's own next token
    rows_fed: int = 0         # rows (tokens and masks) fed in the passes after the prompt's

    @property
    def acceleration(self):  # tokens per forward pass (docs/METHOD.md, "Decoding")
        return len(self.tokens) / max(self.passes, 1)

    @property
    def draft_acceptance(self):
        return self.drafts_accepted / max(self.drafts_fed, 1)

    @property
    def rows_per_pass(self):  # after the prompt's pass
        return self.rows_fed / max(self.passes - 1, 1)

    @property
    def tokens_per_s(self):
        return len(self.tokens) / max(self.seconds, 1e-9)


def candidates(model, logits, trusted: int, top: int | None = None):
    """(top-1 probability, argmax) per slot; top c: (probabilities, tokens) of the c likeliest, (slots, c).
    <MTP> is an input, never a token of the text. The first `trusted` slots are accepted whatever their
    confidence, so they must be finite; elsewhere a non-finite confidence just never clears a threshold."""
    if not torch.isfinite(logits[:trusted]).all():
        raise ValueError("the model produced non-finite logits (NaN/inf weights?); nothing to decode")
    if model.cfg.mask_id is not None:
        logits[:, model.cfg.mask_id] = -float("inf")
    probs = logits.softmax(-1)
    return probs.max(-1) if top is None else probs.topk(top, -1)


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


def commit(tokens: list[int], stop_ids, out: list[int], chunks: list[int], on_tokens) -> bool:
    """Append one pass's accepted tokens to the output, cut after a stop token; True if it stopped."""
    stop_at = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    tokens = tokens if stop_at is None else tokens[:stop_at + 1]
    out += tokens
    chunks.append(len(tokens))
    if on_tokens:
        on_tokens(tokens)
    return stop_at is not None


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int = 256, k: int = 1, threshold: float | None = None,
             k_max: int = 16, stop_ids=(), on_tokens=None, cache=None, verify: bool = False,
             draft_threshold: float | None = None, layout: str = "quadratic", pass_cost: PassCost | None = None,
             tree: int = 1) -> Result:
    """Greedy batch-1 decoding. threshold None: static k (k=1 is plain next-token decoding).
    threshold T: ConfAdapt, up to k_max - 1 masks per pass, accept the longest leading run of
    candidates whose top-1 probability is >= T, and always at least one.
    verify: the output of k=1 decoding, with up to k_max - 1 drafts per pass checked by the model
    itself (generate_verify; draft_threshold, layout and tree are its options).
    pass_cost None: every pass feeds the whole block (the paper's ConfAdapt); a PassCost: each pass
    feeds the masks (or drafts) that pay off on this machine (support/sizing.py)."""
    if verify:
        if k != 1 or threshold is not None:
            raise ValueError("--verify checks its own drafts; it takes no --k or --threshold")
        return generate_verify(model, prompt, max_new_tokens, k_max, draft_threshold, layout, stop_ids,
                               on_tokens, cache, pass_cost, tree)
    if draft_threshold is not None or tree != 1:
        raise ValueError("a draft threshold and a tree are options of --verify")
    n_masks = (k_max if threshold is not None else k) - 1
    if n_masks and model.cfg.mask_id is None:
        raise ValueError("this model has no <MTP> mask id; use k = 1")
    check_fits(model, len(prompt), max_new_tokens, n_masks)
    need = len(prompt) + max_new_tokens + n_masks
    if cache is None or cache.max_len < need:
        cache = model.new_cache(need)
    cache.truncate(0)
    device = model.embed_tokens.weight.device
    masks = torch.full((n_masks,), model.cfg.mask_id or 0, dtype=torch.long, device=device)
    pending = torch.tensor(prompt, dtype=torch.long, device=device)
    out, chunks, stop_ids, acceptance, rows = [], [], set(stop_ids), Acceptance(n_masks), 0
    t0 = time.perf_counter()
    while len(out) < max_new_tokens:
        t_pass = time.perf_counter()
        m = n_masks  # masks this pass: the whole block, or what pays off (support/sizing.py)
        if threshold is not None and pass_cost is not None:
            m = best_n(n_masks, acceptance.expected, pass_cost, rows=lambda n: len(pending) + n)
        inp = torch.cat([pending, masks[:m]])[None]
        slots = torch.arange(len(pending) - 1, inp.size(1), device=device)[None]  # last real token + masks
        logits = model(inp, cache=cache, slots=slots)[0].float()
        cache.truncate(cache.length - m)  # drop the mask slots' keys/values
        rows += inp.size(1) if chunks else 0
        conf, cand = candidates(model, logits, k if threshold is None else 1)
        if threshold is None:
            n = k
        else:
            clears = conf >= threshold  # (a NaN confidence never clears it)
            n = max(1, len(cand) if clears.all() else int(clears.int().argmin()))
            acceptance.record(m, n - 1)
            if pass_cost is not None:
                pass_cost.observe(inp.size(1), time.perf_counter() - t_pass)
        accepted = cand[:min(n, max_new_tokens - len(out))].tolist()
        if commit(accepted, stop_ids, out, chunks, on_tokens):
            break
        pending = torch.tensor(accepted, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Result(out, len(chunks), time.perf_counter() - t0, chunks, rows_fed=rows)


# -----------------------------------------------------------------------------
# lossless decoding: the model verifies its own drafts (docs/METHOD.md, "Lossless decoding (--verify)")

def branch_layout(n_fed: int, anchors: list[int], n_masks: int, base: int, device, parents=None):
    """RoPE positions (T,) and attention mask (T, base + T) of a pass over `base` cached tokens that
    feeds n_fed real tokens, then a branch of n_masks <MTP> slots after each fed token in `anchors`.
    parents[i]: the fed token that fed token i follows (-1: the cache); default: the one before it.
    A fed token sees the cache and the fed tokens it follows, back to the cache; so a tree of drafts is
    fed as its paths. A branch after fed token i takes the positions after it and sees what i sees, i,
    and its own earlier slots: the training layout (distill.branch_layout), so the branch gives the
    logits of a plain forward over `cache + i's path + masks`."""
    pos, sees = torch.arange(n_fed, device=device), torch.ones(n_fed, n_fed, dtype=torch.bool, device=device).tril()
    parents = parents or []
    off_chain = next((i for i, parent in enumerate(parents) if parent != i - 1), len(parents))
    for i in range(off_chain, len(parents)):  # from the first token that does not follow the one before it
        pos[i], sees[i] = pos[parents[i]] + 1, sees[parents[i]]
        sees[i, i] = True
    anchor = torch.tensor(anchors, dtype=torch.long, device=device).repeat_interleave(n_masks)
    within = torch.arange(n_masks, device=device).repeat(len(anchors))  # 0..n_masks-1 inside a branch
    own_branch = torch.block_diag(*[torch.ones(n_masks, n_masks, dtype=torch.bool, device=device).tril()] *
                                  len(anchors)) if anchors else torch.zeros(0, 0, dtype=torch.bool, device=device)
    T = n_fed + len(anchor)
    mask = torch.zeros(T, base + T, dtype=torch.bool, device=device)
    mask[:, :base] = True
    mask[:n_fed, base:base + n_fed] = sees
    mask[n_fed:, base:base + n_fed] = sees[anchor]
    mask[n_fed:, base + n_fed:] = own_branch
    return base + torch.cat([pos, pos[anchor] + 1 + within]), mask


def draft_rules(branch, mask_id, threshold, stop_ids):
    """Which candidates of a branch, (probabilities, tokens) per slot, may be fed as drafts: never the
    <MTP> id, never a non-finite confidence, each at least `threshold` confident if one is given; and
    nothing is drafted after a stop token. (usable, ends) of sizing.draft_tree."""
    conf, cand = branch

    def usable(depth, rank):
        p = conf[depth - 1][rank]
        return cand[depth - 1][rank] != mask_id and math.isfinite(p) and (threshold is None or p >= threshold)
    return usable, lambda depth, rank: cand[depth - 1][rank] in stop_ids


@torch.no_grad()
def generate_verify(model, prompt: list[int], max_new_tokens: int, k_max: int, draft_threshold=None,
                    layout: str = "quadratic", stop_ids=(), on_tokens=None, cache=None, pass_cost=None,
                    tree: int = 1) -> Result:
    """Each pass feeds, as real inputs, the pending token (the whole prompt in the first pass) and the
    drafts the previous pass proposed. The logit at each fed token is the model's own next-token
    prediction there; drafts are kept while they equal it, and the first mismatch is replaced by it (if
    all are kept, the prediction after the last draft is a bonus token). Every emitted token is thus
    the model's argmax after the committed tokens: exactly what k=1 decoding emits, in fewer passes.
    tree 1: the drafts are a chain, the argmax of each mask slot of a branch. tree c > 1: a tree of the
    c likeliest tokens of each slot, the paths most likely to hold first (sizing.draft_tree); the pass
    keeps the one path the model agrees with, so a first guess that fails can be saved by a second.
    layout "quadratic" (Samragh et al. 2025): a branch of k_max - 1 masks after every fed token, so
    that whichever drafts are accepted, the branch after the last of them holds drafts conditioned on
    them. "simple" (a chain only): one branch after the last draft; after a rejection the next pass has
    no drafts. pass_cost (support/sizing.py): each pass feeds the drafts, and branches, that pay off;
    else the whole block. Which drafts are fed never changes the output, only the number of passes."""
    n_masks, max_nodes = k_max - 1, (k_max - 1) * tree
    if n_masks < 1:
        raise ValueError(f"--verify needs k_max >= 2 (k_max - 1 drafts per pass), not {k_max}")
    if model.cfg.mask_id is None:
        raise ValueError("this model has no <MTP> mask id; it cannot propose drafts")
    if layout not in ("quadratic", "simple"):
        raise ValueError(f"layout must be quadratic or simple, not {layout!r}")
    if tree < 1 or (tree > 1 and layout == "simple"):
        raise ValueError(f"--tree must be at least 1 (1 with the simple layout), not {tree}")
    check_fits(model, len(prompt), max_new_tokens, n_masks)
    need = len(prompt) + max_new_tokens + (1 + max_nodes) * (1 + n_masks)  # the most a pass holds
    if cache is None or cache.max_len < need:
        cache = model.new_cache(need)
    cache.truncate(0)
    device = model.embed_tokens.weight.device
    mask_id, stop_ids = model.cfg.mask_id, set(stop_ids)
    known, branch = list(prompt), None  # branch: (probabilities, tokens) (slots, tree) of the branch after known
    out, chunks, fed_drafts, accepted_drafts, rows = [], [], 0, 0, 0
    ranks = RankAcceptance(n_masks, tree)
    rows_of = lambda n, depth: (1 + n) * (1 + depth) if layout == "quadratic" else 1 + n + depth  # noqa: E731
    t0 = time.perf_counter()
    while len(out) < max_new_tokens:
        t_pass = time.perf_counter()
        n_nodes, width = max_nodes, n_masks  # drafts fed, masks per branch
        rates = ranks.rates()
        if pass_cost is not None:  # the likeliest tree of n nodes and depth d: (1 + n) (1 + d) rows, or 1 + n + d
            plan = draft_tree(rates, max_nodes, n_masks)
            depth = lambda n: max((d for _, d, _, _ in plan[:n]), default=0)  # noqa: E731
            n_nodes = best_n(len(plan), lambda n: sum(p for *_, p in plan[:n]), pass_cost,
                             rows=lambda n: rows_of(n, depth(n)))
            width = depth(n_nodes)
        nodes = []
        if branch is not None and width:
            left = max_new_tokens - len(out) - 1  # tokens the output has room for after the pending one
            nodes = draft_tree(rates, n_nodes, min(width, len(branch[1]), left),
                               *draft_rules(branch, mask_id, draft_threshold, stop_ids))
        fed = known + [branch[1][d - 1][r] for _, d, r, _ in nodes]
        first = len(known) - 1  # the fed token whose logit checks the first drafts
        parents = list(range(-1, first)) + [first if p < 0 else len(known) + p for p, *_ in nodes]
        anchors = (list(range(first, len(fed))) if layout == "quadratic" else [len(fed) - 1]) if width else []
        base = cache.length
        pos, mask = branch_layout(len(fed), anchors, width, base, device, parents) if anchors else (None, None)
        idx = torch.tensor(fed + [mask_id] * (len(anchors) * width), dtype=torch.long, device=device)[None]
        slots = torch.arange(first, idx.size(1), device=device)[None]
        logits = model(idx, pos, mask, cache=cache, slots=slots)[0].float()
        conf, cand = candidates(model, logits, len(nodes) + 1, top=tree)
        conf, cand = conf.tolist(), cand.tolist()
        rows += idx.size(1) if chunks else 0
        # walk down the tree while a draft is the model's own next token after the path before it
        child = {(parents[i], fed[i]): i for i in range(len(known), len(fed))}
        path, at = [], first
        while (at, cand[at - first][0]) in child:
            at = child[at, cand[at - first][0]]
            path.append(at)
        new = [fed[i] for i in path] + [cand[at - first][0]]  # accepted drafts + the model's token
        cache.keep(base + len(known), [base + i for i in path])  # the committed inputs: known + the path
        if branch is not None:  # where the model's tokens ranked among the branch's candidates
            ranks.record([row.index(t) if t in row else tree for t, row in zip(new, branch[1])])
        fed_drafts, accepted_drafts = fed_drafts + len(nodes), accepted_drafts + len(path)
        if pass_cost is not None:
            pass_cost.observe(idx.size(1), time.perf_counter() - t_pass)
        if commit(new, stop_ids, out, chunks, on_tokens) or len(out) == max_new_tokens:
            break
        # the next drafts come from the branch after the last committed input, if there is one
        known, branch = [new[-1]], None
        if at in anchors:
            row = len(fed) - first + anchors.index(at) * width
            branch = (conf[row:row + width], cand[row:row + width])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Result(out, len(chunks), time.perf_counter() - t0, chunks, fed_drafts, accepted_drafts, rows)


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids=()) -> list[list[int]]:
    """Plain greedy decoding of several prompts of the same length at once, each output cut after
    its first stop token. On a CPU a batch costs about what one prompt costs (the weights are read
    once per step), which makes it cheap to collect a model's own answers as training text."""
    device = model.embed_tokens.weight.device
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    B, T = idx.shape
    cache = model.new_cache(T + max_new_tokens, batch=B)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    last = torch.full((B, 1), T - 1, device=device)
    logits = model(idx, cache=cache, slots=last)
    out = []
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        done |= torch.isin(nxt, stop)
        if done.all():
            break
        logits = model(nxt[:, None], cache=cache)
    rows = torch.stack(out, 1).tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


# -----------------------------------------------------------------------------
# the tuned model against the original's k=1: what train.py ends with, and bench.py --against-original

@torch.no_grad()
def against_original(original, model, tok, prompts, max_new_tokens: int, threshold: float = 0.9,
                     k_max: int | None = None, deadline: float = float("inf"), teacher_loss: bool = False,
                     trees=(None,)) -> tuple[dict, int]:
    """The tuned model's decoding against the ORIGINAL model's k=1, prompt by prompt, interleaved so
    that load on the machine hits every strategy alike: tokens/s and its ratio to the original's, tokens
    per pass, how often the text and the final number are the original's, and if asked the teacher loss
    (the original's NLL per new token, distill.teacher_nll). Passes are sized by their cost, as
    decode.py sizes them. original may be model itself (gated LoRA: its k=1 is the original).
    No prompt starts after the deadline (time.time()). Returns the table ({} if no prompt was measured)
    and the number of prompts it measured. trees: the --verify trees to measure (None: decode.py's)."""
    k_max = k_max or model.cfg.k_max or 16
    stop = sorted(tok.stop_ids)
    tuned_k1 = original is not model
    strategies = {"original k=1": lambda p, _, n=max_new_tokens: generate(original, p, n, k=1, stop_ids=stop)}
    if tuned_k1:  # full fine-tuning: the tuned model's own k=1 is another model
        strategies["k=1"] = lambda p, _, n=max_new_tokens: generate(model, p, n, k=1, stop_ids=stop)
    strategies[f"ConfAdapt({threshold})"] = lambda p, c, n=max_new_tokens: generate(
        model, p, n, threshold=threshold, k_max=k_max, stop_ids=stop, pass_cost=c)
    costs = {"original k=1": None, "k=1": None, f"ConfAdapt({threshold})": measure_pass_cost(model, k_max, False)}
    for tree in trees:
        name = "--verify" if len(trees) == 1 else f"--verify, tree {tree or TREE}"
        strategies[name] = lambda p, c, n=max_new_tokens, tree=tree or TREE: generate(
            model, p, n, verify=True, k_max=k_max, stop_ids=stop, pass_cost=c, tree=tree)
        costs[name] = measure_pass_cost(model, k_max, True, tree or TREE)
    for name, run in strategies.items():  # warm-up: every kernel has chosen for its rows
        run(prompts[0][:16], costs[name], 8)
    totals = {name: dict(tokens=0, seconds=0.0, passes=0, same=0, same_answer=0, nll=0.0) for name in strategies}
    measured = 0
    for prompt in prompts:
        if time.time() > deadline:
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
            t["nll"] += teacher_nll(original, prompt, r.tokens) if teacher_loss else 0.0
    if not measured:
        return {}, 0
    base = totals["original k=1"]["tokens"] / totals["original k=1"]["seconds"]
    return {name: {"tokens_per_s": t["tokens"] / t["seconds"], "vs_original": t["tokens"] / t["seconds"] / base,
                   "tokens_per_pass": t["tokens"] / max(t["passes"], 1), "same_text": t["same"] / measured,
                   "same_answer": t["same_answer"] / measured,
                   **({"teacher_loss": t["nll"] / max(t["tokens"], 1)} if teacher_loss else {})}
            for name, t in totals.items()}, measured


def describe_against_original(table: dict) -> list[str]:
    """against_original's table, a line per strategy."""
    return [f"{name:<16} {t['tokens_per_s']:6.1f} tokens/s {t['vs_original']:5.2f}x the original's k=1 | "
            f"{t['tokens_per_pass']:.2f} tokens per pass | final answer = the original's {t['same_answer']:.0%}, "
            f"text {t['same_text']:.0%}" + (f" | teacher loss {t['teacher_loss']:.3f}" if "teacher_loss" in t else "")
            for name, t in table.items()]


def closing_table(original, model, tok, prompts, max_new_tokens: int, k_max: int, budget) -> list[str]:
    """train.py's closing lines: ConfAdapt(0.9) and --verify against the original model's k=1 on the
    held-out prompts (against_original), with as many prompts as the run's budget (support/budget.py) leaves."""
    if not prompts:
        return []
    measured = 0
    if time.time() < budget.end:
        table, measured = against_original(original, model, tok, prompts, max_new_tokens, 0.9, k_max, deadline=budget.end)
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


# -----------------------------------------------------------------------------
# loading and the command line (evaluation has its own: evaluate.py)

def default_init() -> str:
    """No --init: the model train.py last wrote (out/model: a full model or an adapter), else SmolLM2."""
    found = trained_model(DEFAULT_OUT)
    init = str(found) if found else "smollm2-135m"
    kind = " (gated-LoRA adapter)" if found and (found / "adapter_config.json").is_file() else ""
    print(f"no --init given: using {init}{kind}", file=sys.stderr)
    return init


def load(init: str | None, device: str, dtype: str | None, kernels: bool = True):
    """Load a model for decoding (init None: default_init()), with the CPU's fastest few-row kernels
    for the passes its block can feed (kernels=False: use_decode_kernels(model) later)."""
    init = init or default_init()
    model = load_model(init, device=device, dtype=getattr(torch, dtype) if dtype else None)
    weights = model.embed_tokens.weight.dtype
    if dtype is None and fast_dtype(device, weights) != weights:  # a bf16 checkpoint on an AVX2-only CPU
        print(f"{weights} is slow on this CPU (no bf16 hardware): decoding in float32", file=sys.stderr)
        model.float()
    if kernels:
        use_decode_kernels(model)
    return model, model.tokenizer


def use_decode_kernels(model):
    """Time and choose the few-row kernels (support/cpu_kernels.py) for the passes the model's block can feed."""
    k_max = model.cfg.k_max or 16
    use_few_row_kernels(model, max_rows=min(k_max * k_max, 32), pack=True)


def measure_pass_cost(model, k_max: int, verify: bool, tree: int = 1) -> PassCost:
    """The cost of a pass by rows, up to the most a ConfAdapt or --verify pass of this block feeds
    (beyond 64 rows: extrapolated), said in one line. One timed round: the decode passes themselves
    then keep it up to date (sizing.PassCost.observe)."""
    t0 = time.perf_counter()
    most = (1 + (k_max - 1) * tree) * k_max if verify else 2 * k_max - 1
    cost = PassCost.measure(model, min(most, 64), reps=1)
    print(f"pass cost by rows fed: {', '.join(f'{r}: {1e3 * s:.0f} ms' for r, s in zip(cost.rows, cost.seconds))}"
          f" (measured in {time.perf_counter() - t0:.1f} s, then from the passes; each pass feeds what pays "
          f"off; --full-block: the whole block)", file=sys.stderr)
    return cost


def strategy_name(k: int, threshold: float | None) -> str:
    return f"ConfAdapt({threshold})" if threshold is not None else f"k={k}"


def encode_prompt(tok, text: str, chat: bool) -> list[int]:
    if chat and tok.chat_format:
        return tok.encode_chat([{"role": "user", "content": text}])
    return tok.encode(text, bos=tok.bos_id is not None)


class TextStream:
    """generate()'s on_tokens: prints the text as it grows. The whole token list so far is decoded
    and only new, complete text printed, so a character whose bytes span tokens (an emoji, CJK)
    waits for its last byte instead of printing as U+FFFD. Stop tokens are not printed.
    show_chunks: each pass's text on a background colour that says how many tokens it accepted."""

    def __init__(self, tok, show_chunks: bool = False, out=None):
        self.tok, self.show_chunks, self.out = tok, show_chunks, out or sys.stdout
        self.ids, self.shown = [], 0  # tokens so far, characters of their text printed

    def __call__(self, accepted: list[int]):
        self.ids += [t for t in accepted if t not in self.tok.stop_ids]
        text = self.tok.decode(self.ids)
        self.write(text[self.shown:len(text.rstrip("\ufffd"))], len(accepted))

    def finish(self):  # whatever was held back: bytes that never completed a character
        self.write(self.tok.decode(self.ids)[self.shown:], 0)

    def write(self, new: str, chunk: int):
        if new:
            self.shown += len(new)
            print(paint(new, chunk) if self.show_chunks and chunk else new, end="", file=self.out, flush=True)


CHUNK_BACKGROUNDS = {1: 238, 2: 24, 3: 30, 4: 28, 5: 94, 6: 130, 7: 124}  # 256-colour codes; 7: 7 or more


def paint(text: str, chunk: int) -> str:
    """text on the background colour of its chunk size, each line closed (no colour past the line's end)."""
    start = f"\x1b[38;5;15;48;5;{CHUNK_BACKGROUNDS[min(chunk, 7)]}m"
    return "\n".join(f"{start}{line}\x1b[0m" if line else line for line in text.split("\n"))


def chunk_legend() -> str:
    return "tokens accepted per pass: " + " ".join(paint(f" {n}{'+' if n == 7 else ''} ", n) for n in range(1, 8))


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                   f"a tree of the likeliest paths (default {TREE}; 1: a chain of drafts)")
    p.add_argument("--full-block", action="store_true", help="ConfAdapt and --verify: feed the whole block every "
                   "pass, as the paper does (default: the masks and drafts that pay off on this machine, measured; "
                   "also the case when --k-max or --draft-threshold is given)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-chat", dest="chat", action="store_false", help="raw text, no chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--show-chunks", action="store_true", help="colour the tokens of each pass by how many it accepted")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
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
    a.tree = a.tree or TREE
    if a.verify and a.k_max is not None and a.k_max < 2:
        p.error(f"--verify needs --k-max >= 2 (k_max - 1 drafts per pass), not {a.k_max}")
    for t in (a.threshold, a.draft_threshold):
        if t is not None and not 0 < t <= 1:
            p.error(f"threshold {t} is outside (0, 1]")
    check_decoding_args(a, p)
    return a, p


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


def main(argv=None):
    args, parser = get_args(argv)
    model, tok = load(args.init, args.device, args.dtype, kernels=False)  # the settings are checked first
    k_max_given = args.k_max is not None
    args.k_max = args.k_max or model.cfg.k_max or 16
    k = 1 if args.k is None else args.k
    if not 1 <= k <= args.k_max:
        parser.error(f"k = {k} is outside 1..k_max ({args.k_max})")
    prompt = encode_prompt(tok, args.prompt, args.chat)
    block = args.threshold is not None or args.verify
    check_fits(model, len(prompt), args.max_new_tokens, (args.k_max if block else k) - 1)  # before any output
    use_decode_kernels(model)
    if summary := packed_summary(model):
        print(summary, file=sys.stderr)
    pass_cost = None
    if block and not (args.full_block or k_max_given or args.draft_threshold):
        pass_cost = measure_pass_cost(model, args.k_max, args.verify, args.tree)
    stream = None if args.json else TextStream(tok, args.show_chunks)
    r = generate(model, prompt, args.max_new_tokens, k=k, threshold=args.threshold, k_max=args.k_max,
                 stop_ids=tok.stop_ids, on_tokens=stream, verify=args.verify, draft_threshold=args.draft_threshold,
                 pass_cost=pass_cost, tree=args.tree if args.verify else 1)
    if stream:
        stream.finish()
    if args.show_chunks:
        print("\n" + chunk_legend(), end="", file=sys.stderr)
    text = tok.decode([t for t in r.tokens if t not in tok.stop_ids])
    name = strategy_name(k, args.threshold)
    if args.verify:
        name = f"verify(k_max {args.k_max}" + (f", drafts >= {args.draft_threshold}" if args.draft_threshold else "")
        name += f", tree {args.tree}" if args.tree > 1 else ""
        name += ")"
    if args.json:
        print(json.dumps({"text": text, "tokens": r.tokens, "passes": r.passes, "acceleration": r.acceleration,
                          "tokens_per_s": r.tokens_per_s, "chunks": r.chunks, "strategy": name,
                          "drafts_fed": r.drafts_fed, "drafts_accepted": r.drafts_accepted,
                          "draft_acceptance": r.draft_acceptance, "rows_per_pass": r.rows_per_pass}))
    else:
        hist = " ".join(f"{n}:{c}" for n, c in sorted(Counter(r.chunks).items()))
        drafts = ""
        if args.verify:
            drafts = f" | drafts accepted {r.drafts_accepted}/{r.drafts_fed} ({r.draft_acceptance:.0%})"
        print(f"\n[{name}] {len(r.tokens)} new tokens in {r.passes} passes | acceleration {r.acceleration:.2f} | "
              f"{r.tokens_per_s:.1f} tokens/s | {r.rows_per_pass:.1f} rows per pass | chunk sizes {hist}{drafts}",
              file=sys.stderr)


def cli(argv=None):
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    cli()

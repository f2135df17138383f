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
from distill import branch_layout as branch_layout_of_chunk, teacher_nll
from support.cli import ArgumentParser
from support.cpu_kernels import fast_dtype, packed_summary, use_few_row_kernels
from support.sizing import Acceptance, PassCost, best_n
from support.weights import load_model, trained_model

DEFAULT_OUT = "out"  # where train.py writes (train.py --out)


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


def candidates(model, logits, trusted: int):
    """(top-1 probability, argmax) per slot. <MTP> is an input, never a token of the text. The first
    `trusted` slots are accepted whatever their confidence, so they must be finite; elsewhere a
    non-finite confidence just never clears a threshold."""
    if not torch.isfinite(logits[:trusted]).all():
        raise ValueError("the model produced non-finite logits (NaN/inf weights?); nothing to decode")
    if model.cfg.mask_id is not None:
        logits[:, model.cfg.mask_id] = -float("inf")
    return logits.softmax(-1).max(-1)


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
             draft_threshold: float | None = None, layout: str = "quadratic", pass_cost: PassCost | None = None) -> Result:
    """Greedy batch-1 decoding. threshold None: static k (k=1 is plain next-token decoding).
    threshold T: ConfAdapt, up to k_max - 1 masks per pass, accept the longest leading run of
    candidates whose top-1 probability is >= T, and always at least one.
    verify: the output of k=1 decoding, with up to k_max - 1 drafts per pass checked by the model
    itself (generate_verify; draft_threshold and layout are its options).
    pass_cost None: every pass feeds the whole block (the paper's ConfAdapt); a PassCost: each pass
    feeds the masks (or drafts) that pay off on this machine (support/sizing.py)."""
    if verify:
        if k != 1 or threshold is not None:
            raise ValueError("--verify checks its own drafts; it takes no --k or --threshold")
        return generate_verify(model, prompt, max_new_tokens, k_max, draft_threshold, layout, stop_ids,
                               on_tokens, cache, pass_cost)
    if draft_threshold is not None:
        raise ValueError("a draft threshold is an option of --verify")
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
            m = best_n(n_masks, acceptance, pass_cost, rows=lambda n: len(pending) + n)
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

def branch_layout(n_fed: int, anchors: list[int], n_masks: int, base: int, device):
    """RoPE positions (T,) and attention mask (T, base + T) of a pass over `base` cached tokens that
    feeds n_fed real tokens, then a branch of n_masks <MTP> slots after each fed token in `anchors`:
    the training layout (distill.branch_layout), so a branch after fed token i gives the logits of a
    plain forward over `cache + fed[:i+1] + masks`; every query also sees the whole cache."""
    pos, mask = branch_layout_of_chunk(n_fed, torch.tensor(anchors, device=device), n_masks)
    cached = torch.ones(len(pos), base, dtype=torch.bool, device=device)
    return base + pos, torch.cat([cached, mask], 1)


def pick_drafts(cand, conf, mask_id, threshold, limit, stop_ids) -> list[int]:
    """The leading run of usable drafts of a branch: never the <MTP> id, never a non-finite confidence,
    each at least `threshold` confident if one is given, at most `limit`, nothing after a stop token."""
    drafts = []
    for token, p in zip(cand.tolist(), conf.tolist()):
        unsure = not math.isfinite(p) or (threshold is not None and p < threshold)
        if len(drafts) == limit or token == mask_id or unsure:
            break
        drafts.append(token)
        if token in stop_ids:
            break
    return drafts


@torch.no_grad()
def generate_verify(model, prompt: list[int], max_new_tokens: int, k_max: int, draft_threshold=None,
                    layout: str = "quadratic", stop_ids=(), on_tokens=None, cache=None, pass_cost=None) -> Result:
    """Each pass feeds, as real inputs, the pending token (the whole prompt in the first pass) and the
    drafts the previous pass proposed. The logit at each fed token is the model's own next-token
    prediction there; drafts are kept while they equal it, and the first mismatch is replaced by it (if
    all are kept, the prediction after the last draft is a bonus token). Every emitted token is thus
    the model's argmax after the committed tokens: exactly what k=1 decoding emits, in fewer passes.
    layout "quadratic" (Samragh et al. 2025): a branch of k_max - 1 masks after every fed token, so
    that whichever prefix is accepted, the branch after its last token holds drafts conditioned on it.
    "simple": one branch after the last draft; after a rejection the next pass has no drafts.
    pass_cost (support/sizing.py): each pass feeds the n drafts, and branches of n masks, that pay off; else
    n = k_max - 1. Which drafts are fed never changes the output, only the number of passes."""
    n_masks = k_max - 1
    if n_masks < 1:
        raise ValueError(f"--verify needs k_max >= 2 (k_max - 1 drafts per pass), not {k_max}")
    if model.cfg.mask_id is None:
        raise ValueError("this model has no <MTP> mask id; it cannot propose drafts")
    if layout not in ("quadratic", "simple"):
        raise ValueError(f"layout must be quadratic or simple, not {layout!r}")
    check_fits(model, len(prompt), max_new_tokens, n_masks)
    need = len(prompt) + max_new_tokens + k_max * k_max  # a pass holds at most k_max fed tokens + branches
    if cache is None or cache.max_len < need:
        cache = model.new_cache(need)
    cache.truncate(0)
    device = model.embed_tokens.weight.device
    mask_id, stop_ids = model.cfg.mask_id, set(stop_ids)
    known, drafts = list(prompt), []  # fed tokens already committed to the output / to be checked
    out, chunks, fed_drafts, accepted_drafts, rows = [], [], 0, 0, 0
    acceptance, width = Acceptance(n_masks), n_masks  # width: masks per branch, the most drafts of a pass
    t0 = time.perf_counter()
    while len(out) < max_new_tokens:
        t_pass = time.perf_counter()
        if pass_cost is not None:  # n drafts with a branch of n masks: (1 + n)^2 rows, or 1 + 2n (simple)
            width = best_n(n_masks, acceptance, pass_cost,
                           rows=lambda n: (1 + n) ** 2 if layout == "quadratic" else 1 + 2 * n)
            drafts = drafts[:width]
        fed = known + drafts
        first = len(known) - 1  # the fed token whose logit checks the first draft
        anchors = (list(range(first, len(fed))) if layout == "quadratic" else [len(fed) - 1]) if width else []
        base = cache.length
        pos, mask = branch_layout(len(fed), anchors, width, base, device) if anchors else (None, None)
        idx = torch.tensor(fed + [mask_id] * (len(anchors) * width), dtype=torch.long, device=device)[None]
        slots = torch.arange(first, idx.size(1), device=device)[None]
        logits = model(idx, pos, mask, cache=cache, slots=slots)[0].float()
        conf, cand = candidates(model, logits, len(drafts) + 1)  # the model's own tokens at the fed inputs
        rows += idx.size(1) if chunks else 0
        own = cand[:len(drafts) + 1].tolist()  # the model's next token after fed[first], ..., fed[-1]
        n_ok = 0
        while n_ok < len(drafts) and drafts[n_ok] == own[n_ok]:
            n_ok += 1
        cache.truncate(base + len(known) + n_ok)  # the committed inputs are a prefix of the chunk
        fed_drafts, accepted_drafts = fed_drafts + len(drafts), accepted_drafts + n_ok
        acceptance.record(len(drafts), n_ok)
        if pass_cost is not None:
            pass_cost.observe(idx.size(1), time.perf_counter() - t_pass)
        new = drafts[:n_ok] + [own[n_ok]]  # accepted drafts + the model's token (correction or bonus)
        if commit(new, stop_ids, out, chunks, on_tokens) or len(out) == max_new_tokens:
            break
        # the next drafts come from the branch after the last committed input, if there is one
        anchor = first + n_ok
        known, drafts = [own[n_ok]], []
        if anchor in anchors:
            row = len(own) + anchors.index(anchor) * width
            drafts = pick_drafts(cand[row:row + width], conf[row:row + width], mask_id, draft_threshold,
                                 max_new_tokens - len(out) - 1, stop_ids)
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
                     k_max: int | None = None, deadline: float = float("inf"), teacher_loss: bool = False
                     ) -> tuple[dict, int]:
    """The tuned model's decoding against the ORIGINAL model's k=1, prompt by prompt, interleaved so
    that load on the machine hits every strategy alike: tokens/s and its ratio to the original's, tokens
    per pass, how often the text and the final number are the original's, and if asked the teacher loss
    (the original's NLL per new token, distill.teacher_nll). Passes are sized by their cost, as
    decode.py sizes them. original may be model itself (gated LoRA: its k=1 is the original).
    No prompt starts after the deadline (time.time()). Returns the table ({} if no prompt was measured)
    and the number of prompts it measured."""
    k_max = k_max or model.cfg.k_max or 16
    stop = sorted(tok.stop_ids)
    tuned_k1 = original is not model
    strategies = {"original k=1": lambda p, _, n=max_new_tokens: generate(original, p, n, k=1, stop_ids=stop)}
    if tuned_k1:  # full fine-tuning: the tuned model's own k=1 is another model
        strategies["k=1"] = lambda p, _, n=max_new_tokens: generate(model, p, n, k=1, stop_ids=stop)
    strategies[f"ConfAdapt({threshold})"] = lambda p, c, n=max_new_tokens: generate(
        model, p, n, threshold=threshold, k_max=k_max, stop_ids=stop, pass_cost=c)
    strategies["--verify"] = lambda p, c, n=max_new_tokens: generate(model, p, n, verify=True, k_max=k_max,
                                                                     stop_ids=stop, pass_cost=c)
    costs = {"original k=1": None, "k=1": None, f"ConfAdapt({threshold})": measure_pass_cost(model, k_max, False),
             "--verify": measure_pass_cost(model, k_max, True)}
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


def measure_pass_cost(model, k_max: int, verify: bool) -> PassCost:
    """The cost of a pass by rows, up to the most a ConfAdapt or --verify pass of this block feeds
    (beyond 64 rows: extrapolated), said in one line. One timed round: the decode passes themselves
    then keep it up to date (sizing.PassCost.observe)."""
    t0 = time.perf_counter()
    cost = PassCost.measure(model, min(k_max * k_max if verify else 2 * k_max - 1, 64), reps=1)
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
    if a.draft_threshold is not None and not a.verify:
        p.error("--draft-threshold is an option of --verify")
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
        pass_cost = measure_pass_cost(model, args.k_max, args.verify)
    stream = None if args.json else TextStream(tok, args.show_chunks)
    r = generate(model, prompt, args.max_new_tokens, k=k, threshold=args.threshold, k_max=args.k_max,
                 stop_ids=tok.stop_ids, on_tokens=stream, verify=args.verify, draft_threshold=args.draft_threshold,
                 pass_cost=pass_cost)
    if stream:
        stream.finish()
    if args.show_chunks:
        print("\n" + chunk_legend(), end="", file=sys.stderr)
    text = tok.decode([t for t in r.tokens if t not in tok.stop_ids])
    name = strategy_name(k, args.threshold)
    if args.verify:
        name = f"verify(k_max {args.k_max}" + (f", drafts >= {args.draft_threshold}" if args.draft_threshold else "")
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

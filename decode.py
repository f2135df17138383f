"""Decode with a multi-token-prediction model: plain next-token, static k, ConfAdapt, or --verify.

    python decode.py --prompt "What is 7 * 8?" --threshold 0.9     # ConfAdapt, k_max 16
    python decode.py --init smollm2-135m --prompt "..." --k 3       # static k = 3
    python decode.py --prompt "..." --verify                        # lossless: the output of k = 1
    python decode.py --prompt "..." --threshold 0.9 --show-chunks   # colour each pass's tokens

Every forward pass feeds the tokens accepted in the previous pass as real inputs, followed by
<MTP> mask slots, under a plain causal mask (docs/METHOD.md, "Decoding"). Mask slots never count as
committed: after each pass the KV cache is cut back to the real tokens (on a GPU their keys stay in
slots that the mask hides, support/static_passes.py). --verify feeds the drafts of the previous pass
as real inputs and keeps them only where the model agrees (generate_verify).
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from support.cli import check_fits, decode_args
from support.sizing import Acceptance, PassCost, RankAcceptance, best_n, draft_tree, measure_pass_cost
from support.sampling import Sampler, sampler_of
from support.static_passes import decode_cache
from support.stream import TextStream, chunk_legend, print_result, strategy_name
from support.tokenizer import encode_prompt
from support.weights import load, use_cpu_kernels


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


def next_token_probs(model, logits, sampler: Sampler | None = None):
    """Each slot's next-token distribution, tempered and truncated by the sampler if there is one.
    <MTP> is an input, never a token of the text."""
    if model.cfg.mask_id is not None:
        logits[:, model.cfg.mask_id] = -float("inf")
    return logits.softmax(-1) if sampler is None else sampler.probs(logits)


def candidates(model, logits, top: int | None = None, sampler: Sampler | None = None):
    """(top-1 probability, argmax) per slot; top c: (probabilities, tokens) of the c likeliest, (slots, c);
    with a sampler, (top-1 probability, a token drawn) of the sampler's distribution."""
    probs = next_token_probs(model, logits, sampler)
    if sampler is not None:
        return probs.max(-1).values, sampler.draw(probs)
    return probs.max(-1) if top is None else probs.topk(top, -1)


def to_host(finite: torch.Tensor, *tensors: torch.Tensor) -> list[list]:
    """What a pass decided on the device, in one copy to the host: per tensor its values (1-D) or rows
    (2-D), as floats. finite: whether the logits of the slots accepted whatever their confidence are
    finite, as they must be; elsewhere a non-finite confidence just never clears a threshold."""
    flat = torch.cat([finite.double()[None]] + [t.double().flatten() for t in tensors]).tolist()
    if not flat[0]:
        raise ValueError("the model produced non-finite logits (NaN/inf weights?); nothing to decode")
    out, at = [], 1
    for t in tensors:
        values, at = flat[at:at + t.numel()], at + t.numel()
        out.append(values if t.dim() == 1 else [values[i:i + t.size(1)] for i in range(0, len(values), t.size(1))])
    return out


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
             tree: int = 1, static: bool | None = None, sampler: Sampler | None = None) -> Result:
    """Batch-1 decoding, greedy or, with a sampler, each slot's token drawn from its distribution.
    threshold None: static k (k=1 is plain next-token decoding). threshold T: ConfAdapt, up to
    k_max - 1 masks per pass, accept the longest leading run of candidates whose top-1 probability
    is >= T, and always at least one (sampled: the top-1 probability of the sampler's distribution,
    whose drawn tokens are accepted; docs/METHOD.md, "Sampling", says what that changes).
    verify: the output of k=1 decoding, with up to k_max - 1 drafts per pass checked by the model
    itself (generate_verify; draft_threshold, layout and tree are its options).
    pass_cost None: every pass feeds the whole block (the paper's ConfAdapt); a PassCost: each pass
    feeds the masks (or drafts) that pay off on this machine (support/sizing.py).
    static: the passes after the prompt's run at fixed shapes (support/static_passes.py), captured on CUDA; None: on
    CUDA only. The tokens are the same either way."""
    if verify:
        if k != 1 or threshold is not None:
            raise ValueError("--verify checks its own drafts; it takes no --k or --threshold")
        return generate_verify(model, prompt, max_new_tokens, k_max, draft_threshold, layout, stop_ids,
                               on_tokens, cache, pass_cost, tree, static, sampler)
    if draft_threshold is not None or tree != 1:
        raise ValueError("a draft threshold and a tree are options of --verify")
    n_masks = (k_max if threshold is not None else k) - 1
    if n_masks and model.cfg.mask_id is None:
        raise ValueError("this model has no <MTP> mask id; use k = 1")
    check_fits(model, len(prompt), max_new_tokens, n_masks)
    passes, cache = decode_cache(model, cache, len(prompt) + max_new_tokens + n_masks, static)
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
        first = len(pending) - 1  # the last real token: its logits give the next token, the masks' those after
        if passes is not None and chunks:  # the prompt's pass is of a size of its own: eager
            logits = passes(inp, cache.length)[first:]
            cache.length += len(pending)  # the masks' keys and values stay in their slots, hidden from now on
        else:
            logits = model.output(model.hidden(inp, cache=cache)[0, first:])
            cache.truncate(cache.length - m)  # drop the mask slots' keys/values
        rows += inp.size(1) if chunks else 0
        finite = torch.isfinite(logits[:k if threshold is None else 1]).all()
        conf, cand = candidates(model, logits.float(), sampler=sampler)
        if threshold is None:
            n = torch.tensor(k, device=device)
        else:  # ConfAdapt: the leading run that clears the threshold (a NaN never does), at least one
            n = (conf >= threshold).int().cumprod(0).sum().clamp(min=1)
        (n, *cand), = to_host(finite, torch.cat([n[None], cand]))
        n = int(n)
        if threshold is not None:
            acceptance.record(m, n - 1)
            if pass_cost is not None:
                pass_cost.observe(inp.size(1), time.perf_counter() - t_pass)
        accepted = [int(t) for t in cand[:min(n, max_new_tokens - len(out))]]
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


def speculative_step(p, q, drafts, sampler: Sampler):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) of one pass, on the device. p (n + 1,
    vocab): the model's distributions at the fed tokens, before each of the n drafts and after the last;
    q (n, vocab): those the drafts were drawn from. Draft j is kept with probability min(1, p_j(d_j) /
    q_j(d_j)) if every draft before it was; at the first that is not, the token is drawn from
    residual(p_j, q_j); if all are kept, from p_n+1. Each token emitted is then distributed as p's, as if
    k=1 sampling drew it (tests/test_sampling.py). Returns (drafts kept, the token after them)."""
    n = len(drafts)
    kept = (sampler.uniform(n, p.device) < keep_probability(p[:n], q, drafts)).int().cumprod(0).sum()
    q_after = torch.cat([q, torch.zeros_like(p[:1])])  # after the last draft, p itself
    return kept, sampler.draw(residual(p[kept], q_after[kept]))


def keep_probability(p, q, drafts):
    """min(1, p(d) / q(d)) per draft d, drawn from q (so q(d) > 0)."""
    at = torch.arange(len(drafts), device=p.device)
    return (p[at, drafts] / q[at, drafts]).clamp(max=1)


def residual(p, q):
    """max(0, p - q), normalized: what a draft that was not kept leaves of p (p itself where q covers none of it)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


@torch.no_grad()
def generate_verify(model, prompt: list[int], max_new_tokens: int, k_max: int, draft_threshold=None,
                    layout: str = "quadratic", stop_ids=(), on_tokens=None, cache=None, pass_cost=None,
                    tree: int = 1, static: bool | None = None, sampler: Sampler | None = None) -> Result:
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
    else the whole block. Which drafts are fed never changes the output, only the number of passes.
    sampler: speculative sampling (speculative_step) over a chain of drafts, each drawn from its slot's
    distribution: the output is distributed as k=1 sampling's."""
    tree = 1 if sampler is not None else tree
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
    passes, cache = decode_cache(model, cache, need, static)
    device = model.embed_tokens.weight.device
    mask_id, stop_ids = model.cfg.mask_id, set(stop_ids)
    known, branch = list(prompt), None  # branch: (probabilities, tokens) (slots, tree) of the branch after known
    drafted_from = None  # sampled: the distributions (slots, vocab) the branch's tokens were drawn from
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
        if passes is not None and chunks:
            logits = passes(idx, base, pos, mask)[first:]
            cache.length = base + idx.size(1)
        else:
            logits = model.output(model.hidden(idx, pos, mask, cache)[0, first:])
        finite = torch.isfinite(logits[:len(nodes) + 1]).all()
        rows += idx.size(1) if chunks else 0
        if sampler is None:
            conf, cand = candidates(model, logits.float(), top=tree)
            conf, cand = to_host(finite, conf, cand)
            cand = [[int(t) for t in row] for row in cand]
            # walk down the tree while a draft is the model's own next token after the path before it
            child = {(parents[i], fed[i]): i for i in range(len(known), len(fed))}
            path, at = [], first
            while (at, cand[at - first][0]) in child:
                at = child[at, cand[at - first][0]]
                path.append(at)
            new = [fed[i] for i in path] + [cand[at - first][0]]  # accepted drafts + the model's token
        else:  # the chain's drafts kept by speculative sampling, and a draw for every slot of every branch
            probs = next_token_probs(model, logits.float(), sampler)
            drafts = torch.tensor(fed[len(known):], dtype=torch.long, device=device)
            q = drafted_from[:len(nodes)] if nodes else probs[:0]
            kept, token = speculative_step(probs[:len(nodes) + 1], q, drafts, sampler)
            kept_token, conf, cand = to_host(finite, torch.stack([kept, token]), probs.max(-1).values, sampler.draw(probs))
            conf, cand = [[c] for c in conf], [[int(t)] for t in cand]
            path = list(range(len(known), len(known) + int(kept_token[0])))
            at = path[-1] if path else first
            new = [fed[i] for i in path] + [int(kept_token[1])]
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
            drafted_from = probs[row:row + width] if sampler is not None else None  # q: the drafts' distributions
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Result(out, len(chunks), time.perf_counter() - t0, chunks, fed_drafts, accepted_drafts, rows)


# -----------------------------------------------------------------------------
# the command line (its options, loading and printing: support/; evaluation has its own: evaluate.py)


def main(argv=None):
    args, parser = decode_args(argv, __doc__)
    model, tok = load(args.init, args.device, args.dtype, cpu_kernels=False)  # the settings are checked first
    k_max_given = args.k_max is not None
    args.k_max = args.k_max or model.cfg.k_max or 16
    k = 1 if args.k is None else args.k
    if not 1 <= k <= args.k_max:
        parser.error(f"k = {k} is outside 1..k_max ({args.k_max})")
    prompt = encode_prompt(tok, args.prompt, args.chat)
    block = args.threshold is not None or args.verify
    check_fits(model, len(prompt), args.max_new_tokens, (args.k_max if block else k) - 1)  # before any output
    use_cpu_kernels(model, args.cpu_kernels, say=True)
    pass_cost = None
    if block and not (args.full_block or k_max_given or args.draft_threshold):
        pass_cost = measure_pass_cost(model, args.k_max, args.verify, args.tree)
    stream = None if args.json else TextStream(tok, args.show_chunks)
    r = generate(model, prompt, args.max_new_tokens, k=k, threshold=args.threshold, k_max=args.k_max,
                 stop_ids=tok.stop_ids, on_tokens=stream, verify=args.verify, draft_threshold=args.draft_threshold,
                 pass_cost=pass_cost, tree=args.tree if args.verify else 1, static=False if args.eager else None,
                 sampler=sampler_of(args, model.embed_tokens.weight.device))
    if stream:
        stream.finish()
    if args.show_chunks:
        print("\n" + chunk_legend(), end="", file=sys.stderr)
    name = strategy_name(k, args.threshold, args.verify, args.k_max, args.draft_threshold, args.tree)
    print_result(r, tok, name, args.json, args.verify)


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

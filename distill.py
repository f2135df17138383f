"""The MTP self-distillation objective (docs/METHOD.md, "Training"), readable next to the paper.

One step, for a batch of token rows and a block size k:
  1. layout: keep each row's ground truth once and append mask branches after it. A branch cut
     after token x_i holds k-1 <MTP> slots at positions i+1 .. i+k-1, and sees only x_1..x_i and
     the earlier slots of its own branch. Its k predictions are the logit at x_i and at its masks.
  2. student forward (with grad) -> y'_j = argmax s_j (no grad).
  3. teacher forward (frozen, no grad) on the same rows with slot j of every branch holding the
     student's own y'_j: t_j is the teacher's next-token distribution after x_1..x_i, y'_1..y'_{j-1}.
  4. loss: cross-entropy(s_j, argmax t_j) ("hard", the default) or KL(t_j || s_j) ("soft").
This layout gives the logits of a plain causal forward over `x_1..x_i + (k-1) masks` at every
branch (tests/test_distill.py checks exactly that), while the ground truth is read only once.
mtp_loss is these four steps; how the student and the teacher run is the forwards it is given:
TwoModels (two models, the paper's), or under gated LoRA the same numbers from less work
(SharedGroundTruth, FrozenRowsForwards), below it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MTPBatch:
    idx: torch.Tensor    # (B, S) ground truth, then n_branches * (k-1) mask slots
    pos: torch.Tensor    # (B, S) RoPE position of every slot
    mask: torch.Tensor   # (B, S, S) True = query (row) may attend to key (column)
    pred: torch.Tensor   # (B, P) slot of every prediction, P = n_branches * k
    valid: torch.Tensor  # (B, P) False where a branch's targets would run past the end of the text
    offset: torch.Tensor  # (P,) which token ahead each prediction is for: 1..k
    fill: torch.Tensor   # (B, n_branches * (k-1)) the mask slots, in the order predictions 1..k-1 fill them
    k: int
    texts: list | None = None  # which training text each row holds (train.py), for FrozenStore


def branch_layout(n_real: int, anchors: torch.Tensor, n_masks: int):
    """RoPE positions (T,) and attention mask (T, T), True = may attend, of n_real real tokens followed
    by a branch of n_masks <MTP> slots after each real token in `anchors` (T = n_real + branches).
    A branch after token i takes positions i+1 .. i+n_masks and sees real tokens 0..i and its own
    earlier slots only (docs/METHOD.md, "Layout"); real tokens are causal. decode.py's --verify uses it too."""
    T = n_real + len(anchors) * n_masks
    slot = torch.arange(T, device=anchors.device)
    is_real = slot < n_real
    branch = torch.where(is_real, -1, (slot - n_real).div(n_masks, rounding_mode="floor"))
    within = torch.where(is_real, 0, (slot - n_real) % n_masks)  # 0..n_masks-1 inside a branch
    anchor_of = anchors[branch.clamp(min=0)]
    pos = torch.where(is_real, slot, anchor_of + 1 + within)
    sees_upto = torch.where(is_real, slot, anchor_of)  # the last real token each query may see
    q, kk = slot[:, None], slot[None, :]
    real_keys = is_real[None, :] & (kk <= sees_upto[:, None])
    own_branch = ~is_real[:, None] & ~is_real[None, :] & (branch[:, None] == branch[None, :]) & (kk <= q)
    return pos, real_keys | own_branch


def build_batch(tokens, lengths, k, mask_id, branch_every, start=None, generator=None) -> MTPBatch:
    """tokens: (B, L) padded ground truth, lengths: (B,) real tokens per row (the last one EOS).
    Branches are cut every `branch_every` tokens from a random offset (docs/METHOD.md, "Layout": the random offset
    rolls the region boundaries each step); start: (B,) first allowed cut per row (e.g. the end of
    the prompt), default 0. A branch is valid if its k targets x_{i+1}..x_{i+k} are all real tokens;
    a cut valid in no row is left out (unless none is valid), which changes no loss or gradient."""
    B, L = tokens.shape
    dev = tokens.device
    m = k - 1  # mask slots per branch
    offset0 = int(torch.randint(branch_every, (1,), generator=generator))
    cuts = torch.arange(offset0, L, branch_every, device=dev)  # candidate x_i slots, same for all rows
    start = torch.zeros(B, dtype=torch.long, device=dev) if start is None else start
    valid_branch = (cuts[None] >= start[:, None]) & (cuts[None] + k <= lengths[:, None] - 1)  # (B, nb)
    used = valid_branch.any(0)  # a cut no row can use (in every prompt, past every end) costs slots for nothing
    if used.any():
        cuts, valid_branch = cuts[used], valid_branch[:, used]
    nb = len(cuts)
    S = L + nb * m

    pos, mask = branch_layout(L, cuts, m)
    mask = mask[None].expand(B, S, S)

    idx = torch.cat([tokens, torch.full((B, nb * m), mask_id, dtype=tokens.dtype, device=dev)], 1)
    # predictions of branch b: the logit at x_i (offset 1), then at its masks (offsets 2..k)
    branch_slots = L + torch.arange(nb * m, device=dev).view(nb, m)
    pred = torch.cat([cuts[:, None], branch_slots], 1).view(-1)  # (nb * k,)
    offset = torch.arange(1, k + 1, device=dev).repeat(nb)
    valid = valid_branch.repeat_interleave(k, dim=1)
    return MTPBatch(idx=idx, pos=pos[None].expand(B, S), mask=mask, pred=pred[None].expand(B, -1),
                    valid=valid, offset=offset, fill=branch_slots.view(-1)[None].expand(B, -1), k=k)


# -----------------------------------------------------------------------------
# the objective

@dataclass
class Student:
    """The student's forward over a batch's layout, at its P = n_branches * k predictions."""
    logits: torch.Tensor    # (N, V) float32, with gradient, at the predictions `computed` marks, in order
    computed: torch.Tensor  # (B, P) where it ran: the valid predictions (gated LoRA: but for the cuts, see below)
    guess: torch.Tensor     # (B, P) its argmax at every prediction (0 at those that are not valid)


@dataclass
class Teacher:
    """The teacher's forward over the same layout, its branches holding the student's rollout."""
    target: torch.Tensor         # (B, P) its argmax at every prediction (0 at those that are not valid)
    logits: torch.Tensor | None  # (N, V) at the student's computed predictions, for the soft loss
    own_loss: torch.Tensor       # (B, P) where the student did not run: the loss there, without gradient; 0 elsewhere


def mtp_loss(forwards, batch: MTPBatch, soft: bool = False, denom=None):
    """Student-forced online distillation, one batch: returns (loss, metrics). forwards runs the student
    and the frozen teacher over the batch's layout: TwoModels, as the paper does; under gated LoRA the
    same numbers from less work (SharedGroundTruth, FrozenRowsForwards below). denom: how many
    predictions the loss is averaged over (default: the valid ones here; train.py passes the global count
    so that gradient accumulation and data parallelism average over the whole global batch)."""
    k, B = batch.k, batch.idx.size(0)
    s = forwards.student(batch)  # 1. the student's forward, with gradient
    y = s.guess.view(B, -1, k)[:, :, :k - 1].flatten(1)  # 2. its argmax at offsets 1..k-1 fills the k-1 slots of its branch
    with torch.no_grad():
        t = forwards.teacher(batch, y, s.computed, soft)  # 3. the frozen teacher on that rollout
    if soft:  # 4. KL(t || s), or the cross-entropy of s to t's argmax ("hard", the default)
        per = F.kl_div(F.log_softmax(s.logits, -1), F.log_softmax(t.logits.float(), -1), log_target=True,
                       reduction="none").sum(-1)
    else:
        per = F.cross_entropy(s.logits, t.target[s.computed], reduction="none")
    return reduce(t.own_loss.masked_scatter(s.computed, per), s.guess == t.target, batch, denom)


def reduce(per, agree, batch: MTPBatch, denom):
    """(loss, metrics) from the per-prediction losses and agreements in the order of batch.pred."""
    v = batch.valid
    n = v.sum()
    loss = (per * v).sum() / (denom if denom is not None else n.clamp(min=1))
    with torch.no_grad():
        zeros = torch.zeros(batch.k, device=v.device)
        per_offset_n = zeros.index_add(0, batch.offset - 1, v.sum(0).float())
        per_offset_hit = zeros.index_add(0, batch.offset - 1, (agree & v).sum(0).float())
        per_offset_loss = zeros.index_add(0, batch.offset - 1, (per.detach() * v).sum(0).float())
    return loss, {"n": n.item(), "agree_n": per_offset_n, "agree_hit": per_offset_hit, "loss_sum": per_offset_loss}


def at_predictions(h, slots, computed):
    """The rows of h (B, S, dim) at the slots (B, P) of the predictions `computed` marks: (N, dim)."""
    b, p = computed.nonzero(as_tuple=True)
    return h[b, slots[b, p]]


def scattered(values, where):
    """A (B, P) tensor holding values (N,) where `where` is True, 0 elsewhere."""
    return torch.zeros(where.shape, dtype=values.dtype, device=values.device).masked_scatter(where, values)


class TwoModels:
    """The paper's forwards: the student and the frozen teacher (a copy of the original), each over the
    whole layout; the output layer runs at the valid predictions only."""

    def __init__(self, student, teacher):
        self.student_model, self.teacher_model = student, teacher

    def student(self, batch: MTPBatch) -> Student:
        h = self.student_model.hidden(batch.idx, batch.pos, batch.mask)
        logits = self.student_model.output(at_predictions(h, batch.pred, batch.valid)).float()
        return Student(logits, batch.valid, scattered(logits.detach().argmax(-1), batch.valid))

    def teacher(self, batch: MTPBatch, y, computed, soft: bool) -> Teacher:
        h = self.teacher_model.hidden(batch.idx.scatter(1, batch.fill, y), batch.pos, batch.mask)
        logits = self.teacher_model.output(at_predictions(h, batch.pred, computed))
        return Teacher(scattered(logits.argmax(-1), computed), logits if soft else None,
                       torch.zeros(computed.shape, device=h.device))


# -----------------------------------------------------------------------------
# gated LoRA: the same numbers from less work
#
# With gated LoRA (lora.py) real rows see the original weights, so the model is its own teacher, and
# the ground truth part of a row is the same in student and teacher. At a cut (offset 1), a real row,
# the student is the original: its logits there are the teacher's, without gradient, and the loss there
# is the teacher's own (KL(t || t) = 0 for the soft loss). tests/test_lora.py and tests/test_frozen.py
# check that both forwards below give TwoModels(model, model)'s loss and gradients.

def at_cuts_only(cut_loss, computed, k: int):
    """Teacher.own_loss of a gated student, which is the original at the cuts (offset 1): the teacher's own
    loss there, cut_loss (B, n_branches), and 0 elsewhere; 0 everywhere for the soft loss (cut_loss None),
    as KL(t || t) = 0."""
    own_loss = torch.zeros(computed.shape, device=computed.device)
    if cut_loss is not None:
        own_loss[:, ::k] = cut_loss
    return own_loss


class SharedGroundTruth:
    """The ground truth runs once, without gradient, and leaves its keys and values in a cache that both
    passes read; only the branch slots run twice: as <MTP> slots for the student, with gradient, then
    holding the student's rollout for the teacher. One object per batch: teacher() reads what student()
    left (the cache, the logits at the cuts and their argmax)."""

    def __init__(self, model):
        self.model = model

    def student(self, batch: MTPBatch) -> Student:
        k, (B, S), model = batch.k, batch.idx.shape, self.model
        L = S - batch.fill.size(1)  # ground-truth slots; the branch slots follow
        self.cache = model.new_cache(L, B)
        with torch.no_grad():
            h = model.hidden(batch.idx[:, :L], cache=self.cache)
            self.at_cut = model.output(h.gather(1, batch.pred[:, ::k, None].expand(-1, -1, h.size(-1)))).float()
        self.cache.read_only = True
        computed = batch.valid & (batch.offset > 1)
        h = model.hidden(batch.idx[:, L:], batch.pos[:, L:], batch.mask[:, L:], self.cache)
        logits = model.output(at_predictions(h, batch.pred - L, computed)).float()
        self.cut_argmax = self.at_cut.argmax(-1)
        guess = scattered(logits.detach().argmax(-1), computed)
        guess[:, ::k] = self.cut_argmax
        return Student(logits, computed, guess)

    def teacher(self, batch: MTPBatch, y, computed, soft: bool) -> Teacher:
        k, L = batch.k, self.cache.length
        h = self.model.hidden(y, batch.pos[:, L:], batch.mask[:, L:], self.cache)
        logits = self.model.output(at_predictions(h, batch.pred - L, computed))
        target = scattered(logits.argmax(-1), computed)
        target[:, ::k] = self.cut_argmax
        cut_loss = None if soft else F.cross_entropy(self.at_cut.transpose(1, 2), self.cut_argmax, reduction="none")
        return Teacher(target, logits if soft else None, at_cuts_only(cut_loss, computed, k))


# What is known before a step begins. Much of SharedGroundTruth's work is the same in every pass over
# the data: the real rows see the frozen original, so their keys and values are fixed; with adapters in
# the top blocks only and a fixed <MTP> embedding, a mask slot below the lowest adapter depends only on
# its prefix; and along a rollout that equals the text, the teacher at slot j is the original at the real
# row i+j, whose argmax is known. FrozenRows keeps these per training text, and FrozenRowsForwards
# computes only the rest: the adapted blocks on the mask slots, and the teacher where the rollout left the text.

@dataclass
class FrozenRows:
    k: torch.Tensor         # (n_layers, n_kv_heads, L, head_dim) keys of the real rows, in every block
    v: torch.Tensor         # (n_layers, n_kv_heads, L, head_dim) their values (both in the dtype attention reads)
    argmax: torch.Tensor    # (L,) the original's next-token argmax at each real row from first_cut on
    cut_loss: torch.Tensor  # (L,) the cross-entropy of its logits there to that argmax (offset 1's loss)
    masks: torch.Tensor     # (L - 1 - first_cut, k_max - 1, dim) the mask slots of the branch after each
    first_cut: int          # real row from first_cut on, entering the lowest adapted block


def frozen_bytes(cfg, n_tokens: int, n_cuts: int, k_max: int, first_block: int, itemsize: int, kv_itemsize: int) -> int:
    """The size of FrozenRows for a text of n_tokens with n_cuts cuts."""
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * n_tokens * kv_itemsize
    return kv + 12 * n_tokens + (n_cuts * (k_max - 1) * cfg.dim * itemsize if first_block else 0)


@torch.no_grad()
def frozen_rows(model, ids: list[int], first_cut: int, k_max: int, first_block: int, kv_dtype=None,
                branches: tuple[torch.Tensor, int] | None = None) -> FrozenRows:
    """What the frozen original computes for one training text: its real rows in every block, in one
    forward pass that also gives the argmax at every row, and a branch of k_max - 1 <MTP> slots after
    each row from first_cut on, up to the lowest adapted block (first_block; none if it is 0).
    kv_dtype: what the keys and values are kept in (default: the model's dtype). branches: (cuts, k), the
    branches of one step only, for rows that are not kept (FrozenStore): the others' slots stay zero."""
    L, device = len(ids), model.embed_tokens.weight.device
    cache = model.new_cache(L)
    cuts = torch.arange(first_cut, L - 1, device=device)
    logits = model.output(model.hidden(torch.tensor([ids], device=device), cache=cache)[0, cuts]).float()
    argmax = torch.zeros(L, dtype=torch.long, device=device)
    cut_loss = torch.zeros(L, device=device)
    argmax[cuts] = logits.argmax(-1)
    cut_loss[cuts] = F.cross_entropy(logits, argmax[cuts], reduction="none")
    masks = torch.zeros(0, device=device)
    if first_block and len(cuts):
        made, n_masks = (cuts, k_max - 1) if branches is None else branches
        made = made[(made >= first_cut) & (made < L - 1)]  # a cut past this text's end is not valid in its row
        pos, mask = branch_layout(L, made, n_masks)
        idx = torch.full((1, len(made) * n_masks), model.cfg.mask_id, device=device)
        cache.read_only = True
        hidden = model.run_blocks(model.embed_tokens(idx), gate=True, pos=pos[L:], mask=mask[L:], cache=cache,
                                  blocks=range(first_block))  # gate True: every row is an <MTP> row
        masks = torch.zeros(len(cuts), k_max - 1, model.cfg.dim, dtype=hidden.dtype, device=device)
        masks[made - first_cut, :n_masks] = hidden[0].view(len(made), n_masks, -1)
    kv_dtype = kv_dtype or cache.k.dtype
    return FrozenRows(cache.k[:, 0].to(kv_dtype, copy=True), cache.v[:, 0].to(kv_dtype, copy=True), argmax,
                      cut_loss, masks, first_cut)


def at(t, i):
    """t[i], an index past t's end clamped to its last entry (a cut outside a row's text is not valid there)."""
    return t[i.clamp(0, len(t) - 1)]


class FrozenRowsForwards:
    """SharedGroundTruth's numbers, with what is known before the step read from a FrozenStore: only
    the adapted blocks run on the mask slots, and the teacher only on the slots whose rollout left the
    text (every slot for the soft loss, which needs the teacher's whole distribution). One object per
    batch: teacher() reads what student() left (the cache, the batch's frozen rows, the argmax at the cuts)."""

    def __init__(self, model, store):
        self.model, self.store = model, store

    def student(self, batch: MTPBatch) -> Student:
        k, (B, S), model = batch.k, batch.idx.shape, self.model
        L, m, first_block = S - batch.fill.size(1), k - 1, self.store.first_block
        self.cuts = cuts = batch.pred[0, ::k]  # (n_branches,) the same in every row
        self.rows = rows = self.store.get(model, batch.texts, cuts, k)
        self.cache = model.new_cache(L, B)
        for b, f in enumerate(rows):
            self.cache.k[:, b, :, :f.k.size(2)], self.cache.v[:, b, :, :f.v.size(2)] = f.k, f.v
        self.cache.length, self.cache.read_only = L, True
        # the mask slots enter the lowest adapted block as the frozen blocks below left them
        x = torch.stack([at(f.masks, cuts - f.first_cut)[:, :m].flatten(0, 1) for f in rows]) if first_block else \
            model.embed_tokens(batch.idx[:, L:])
        h = model.run_blocks(x, gate=True, pos=batch.pos[:, L:], mask=batch.mask[:, L:], cache=self.cache,
                             blocks=range(first_block, len(model.layers)))  # gate True: every row is an <MTP> row
        computed = batch.valid & (batch.offset > 1)
        logits = model.output(at_predictions(h, batch.pred - L, computed)).float()
        self.cut_argmax = torch.stack([at(f.argmax, cuts) for f in rows])  # the original's, known
        guess = scattered(logits.detach().argmax(-1), computed)
        guess[:, ::k] = self.cut_argmax
        return Student(logits, computed, guess)

    def teacher(self, batch: MTPBatch, y, computed, soft: bool) -> Teacher:
        k, B, L, cuts = batch.k, batch.idx.size(0), self.cache.length, self.cuts
        m = k - 1
        y = y.view(B, -1, m)
        # slot j holds y_j, the guess for row i+j; on the text, the teacher is the original there
        rows = (cuts[:, None] + torch.arange(1, m + 1, device=cuts.device)).clamp(max=L - 1)  # i+1 .. i+m
        on_text = (y == batch.idx[:, rows]).cumprod(2).bool()
        known = torch.stack([at(f.argmax, rows) for f in self.rows])
        need = (torch.ones_like(on_text) if soft else ~on_text) & batch.valid.view(B, -1, k)[:, :, :1]
        target, logits = teacher_where_needed(self.model, self.cache, y, need, cuts, soft)
        target = torch.cat([self.cut_argmax[:, :, None], torch.where(need, target, known)], 2).flatten(1)
        cut_loss = None if soft else torch.stack([at(f.cut_loss, cuts) for f in self.rows])
        if soft:  # the logits at the computed predictions, in order (none when no branch is valid)
            logits = logits[computed.view(B, -1, k)[:, :, 1:].flatten(1)] if logits is not None else \
                torch.zeros(0, self.model.cfg.vocab_size, device=y.device)
        return Teacher(target, logits if soft else None, at_cuts_only(cut_loss, computed, k))


@torch.no_grad()
def teacher_where_needed(model, cache, y, need, cuts, soft: bool):
    """The teacher on the slots `need` marks, (B, n_branches, m) with m = k - 1, each a suffix of its
    branch: slots d..m-1 of a branch whose rollout y follows the text for d slots see the real rows up
    to i+d (the same tokens as y_1..y_d) and their own earlier slots. cache: the real rows, read-only.
    Returns the teacher's argmax per slot (0 where not needed) and, for the soft loss, its logits
    (B, n_branches * m, V)."""
    B, nb, m = y.shape
    L, device = cache.length, y.device
    flat = need.flatten(1)
    T = int(flat.sum(1).max())
    target = torch.zeros(B, nb * m, dtype=torch.long, device=device)
    if T == 0:
        return target.view(B, nb, m), None
    b, p = flat.nonzero(as_tuple=True)  # needed slots, row by row, in branch order
    q = flat.long().cumsum(1)[b, p] - 1  # their query index within the row
    branch, j = p // m, p % m
    first = m - need.sum(2)  # slots on the text before the first needed one
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    pos = torch.zeros(B, T, dtype=torch.long, device=device)
    sees = torch.zeros(B, T, dtype=torch.long, device=device)  # the last real row a query sees
    group = torch.full((B, T), -1, dtype=torch.long, device=device)
    tokens[b, q], pos[b, q] = y.flatten(1)[b, p], cuts[branch] + j + 1
    sees[b, q], group[b, q] = cuts[branch] + first[b, branch], branch
    real = torch.arange(L, device=device)[None, None] <= sees[:, :, None]  # (B, T, L)
    qi = torch.arange(T, device=device)
    own = (group[:, :, None] == group[:, None, :]) & (qi[None, None] <= qi[None, :, None])
    logits = model.output(model.hidden(tokens, pos, torch.cat([real, own], 2), cache)[b, q])
    target[b, p] = logits.argmax(-1)
    t = None
    if soft:
        t = torch.zeros(B, nb * m, logits.size(-1), dtype=logits.dtype, device=device)
        t[b, p] = logits
    return target.view(B, nb, m), t


class FrozenStore:
    """FrozenRows of the training texts, each made alone the first time its text is met, so that a
    resumed run makes the same ones, and made again if the precision of the step changes. Under
    autocast attention reads keys and values in the autocast dtype (scaled_dot_product_attention is
    one of autocast's operators), so they are kept in it: the same products, half the memory.
    Texts are kept while their rows fit in limit_bytes; a text met after that has the rows of its
    step's branches made for that step alone, about what SharedGroundTruth computes."""

    def __init__(self, examples, starts: list[int], k_max: int, first_block: int):
        self.examples, self.starts, self.k_max, self.first_block = examples, starts, k_max, first_block
        self.rows, self.precision = {}, None
        self.limit_bytes, self.kept_bytes = float("inf"), 0

    def text_bytes(self, i: int, cfg, dtype: torch.dtype, precision: torch.dtype | None) -> int:
        """What keeping text i's FrozenRows takes, for a model in dtype and steps under autocast to precision."""
        n = len(self.examples[i][0])
        return frozen_bytes(cfg, n, max(n - 1 - self.starts[i], 0), self.k_max, self.first_block, dtype.itemsize,
                            (precision or dtype).itemsize)

    def nbytes(self, cfg, dtype: torch.dtype, precision: torch.dtype | None) -> int:
        """What keeping every text's FrozenRows takes."""
        return sum(self.text_bytes(i, cfg, dtype, precision) for i in range(len(self.examples)))

    def get(self, model, texts: list[int], cuts: torch.Tensor, k: int) -> list[FrozenRows]:
        device = model.embed_tokens.weight.device.type
        precision = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if precision != self.precision:
            self.rows, self.precision, self.kept_bytes = {}, precision, 0
        rows = []
        for i in texts:
            if i not in self.rows:
                nbytes = self.text_bytes(i, model.cfg, model.embed_tokens.weight.dtype, precision)
                keep = self.kept_bytes + nbytes <= self.limit_bytes
                made = frozen_rows(model, self.examples[i][0], self.starts[i], self.k_max, self.first_block,
                                   kv_dtype=precision, branches=None if keep else (cuts, k - 1))
                if not keep:
                    rows.append(made)
                    continue
                self.rows[i], self.kept_bytes = made, self.kept_bytes + nbytes
            rows.append(self.rows[i])
        return rows


def forwards_for(student, teacher, frozen: FrozenStore | None = None):
    """How mtp_loss runs the student and the teacher of a batch: two models; a student with gated LoRA
    is its own teacher: the ground truth shared, or given a FrozenStore of the texts, read from it."""
    if teacher is not student:
        return TwoModels(student, teacher)
    return FrozenRowsForwards(student, frozen) if frozen is not None else SharedGroundTruth(student)


@torch.no_grad()
def teacher_nll(reference, prompt: list[int], new_tokens: list[int]) -> float:
    """The teacher loss of a decoded text (docs/METHOD.md, "Evaluation"): the sum over the new tokens
    of -log p_reference(token | prompt, the new tokens before it), from one teacher-forced forward
    pass of the reference (original) model over prompt + new tokens."""
    if not new_tokens:
        return 0.0
    if max(new_tokens) >= reference.cfg.vocab_size:
        raise ValueError(f"generated token id {max(new_tokens)} is outside the reference model's vocabulary "
                         f"({reference.cfg.vocab_size}); pass a --reference with the same tokenizer")
    device = reference.embed_tokens.weight.device
    idx = torch.tensor([prompt + new_tokens], device=device)
    logits = reference.output(reference.hidden(idx)[0, len(prompt) - 1:-1]).float()  # each predicts the next
    return F.cross_entropy(logits, idx[0, len(prompt):], reduction="sum").item()

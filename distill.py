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


def mtp_loss(student, teacher, batch: MTPBatch, soft: bool = False, denom=None):
    """Student-forced online distillation. Returns (loss, metrics). denom: how many predictions the
    loss is averaged over (default: the valid ones here; train.py passes the global count so that
    gradient accumulation and data parallelism average over the whole global batch)."""
    k, B = batch.k, batch.idx.size(0)
    s = student(batch.idx, batch.pos, batch.mask, slots=batch.pred).float()  # (B, P, V)
    guess = s.detach().argmax(-1)
    # the student's own block: its guesses at offsets 1..k-1 fill the k-1 slots of its branch
    y = guess.view(B, -1, k)[:, :, :k - 1].reshape(B, -1)
    with torch.no_grad():
        t = teacher(batch.idx.scatter(1, batch.fill, y), batch.pos, batch.mask, slots=batch.pred)
    per, agree = per_prediction(s, t, guess, soft)
    return reduce(per, agree, batch, denom)


def mtp_loss_gated(model, batch: MTPBatch, soft: bool = False, denom=None):
    """mtp_loss for a gated-LoRA model (lora.add_lora), the same loss and gradients, cheaper.
    Real tokens see the original weights, so the teacher is the model itself, and the ground truth
    part of a row is the same in student and teacher: it runs once, without gradient, and leaves its
    keys and values in a cache. Only the branch slots run twice over that cache: as <MTP> slots for
    the student (with gradient), then holding the student's own tokens for the teacher. Offset 1 of
    every branch is the logit at its cut, where student and teacher are one: its loss has no gradient."""
    k, (B, S), n_slots = batch.k, batch.idx.shape, batch.fill.size(1)
    L = S - n_slots  # ground-truth slots; the branch slots follow
    cache = getattr(model, "module", model).new_cache(L, B)  # model may be the DDP wrapper
    with torch.no_grad():
        at_cut = model(batch.idx[:, :L], cache=cache, slots=batch.pred[:, ::k]).float()  # (B, n_branches, V)
    branches = dict(pos=batch.pos[:, L:], mask=batch.mask[:, L:], cache=cache, keep=False)
    s = model(batch.idx[:, L:], **branches).float()  # (B, n_slots, V): offsets 2..k of every branch
    cut_guess, guess = at_cut.argmax(-1), s.detach().argmax(-1)
    y = torch.cat([cut_guess[:, :, None], guess.view(B, -1, k - 1)[:, :, :k - 2]], 2).flatten(1)
    with torch.no_grad():
        t = model(y, **branches)
    per_cut, agree_cut = per_prediction(at_cut, at_cut, cut_guess, soft)
    per, agree = per_prediction(s, t, guess, soft)
    in_order = lambda at, rest: torch.cat([at[:, :, None], rest.view(B, -1, k - 1)], 2).flatten(1)  # noqa: E731
    return reduce(in_order(per_cut, per), in_order(agree_cut, agree), batch, denom)  # in batch.pred's order


def per_prediction(s, t, s_argmax, soft: bool):
    """Student logits s (float32) and teacher logits t, (B, P, V) -> the loss of every prediction and
    whether the student's argmax is the teacher's, (B, P). The hard loss reads only t's argmax."""
    target = t.argmax(-1)
    if soft:
        per = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t.float(), -1), log_target=True, reduction="none").sum(-1)
    else:
        per = F.cross_entropy(s.transpose(1, 2), target, reduction="none")
    return per, s_argmax == target


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


def distill_loss(student, teacher, batch: MTPBatch, gated: bool, soft: bool = False, denom=None):
    """The objective of one batch: mtp_loss against the frozen teacher, or for a gated-LoRA student
    (its own teacher) mtp_loss_gated."""
    if gated:
        return mtp_loss_gated(student, batch, soft=soft, denom=denom)
    return mtp_loss(student, teacher, batch, soft=soft, denom=denom)


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
    slots = torch.arange(len(prompt) - 1, idx.size(1) - 1, device=device)[None]  # each predicts the next
    logits = reference(idx, slots=slots)[0].float()
    return F.cross_entropy(logits, idx[0, len(prompt):], reduction="sum").item()

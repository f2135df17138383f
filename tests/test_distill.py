"""distill.py: the MTP layout gives plain-forward logits; the teacher is student-forced and frozen."""
import copy

import pytest
import torch

from distill import TwoModels, build_batch, mtp_loss
from support.weights import load_model

TOL = 1e-4
MASK = 299


@pytest.fixture
def tiny(make_tiny, tmp_path):
    """Ours on a random 2-layer Qwen3, with <MTP> = MASK."""
    _, path = make_tiny(tmp_path / "tiny", "qwen3", head_dim=16, tie_word_embeddings=False)
    model = load_model(str(path), add_mask=False)
    model.cfg.mask_id = MASK
    return model


def at_predictions(model, b, idx=None):
    """model's logits (B, P, V) at every prediction slot of batch b (its tokens, or idx), from a plain forward."""
    logits = model(b.idx if idx is None else idx, b.pos, b.mask)
    return logits.gather(1, b.pred[..., None].expand(-1, -1, logits.size(-1)))


def rows(B=2, L=40):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, MASK, (B, L), generator=g)
    lengths = torch.tensor([L, L - 11])[:B]
    return tokens, lengths


def test_branch_logits_equal_plain_forward(tiny):
    model = tiny
    tokens, lengths = rows()
    for k in (2, 5, 16):
        b = build_batch(tokens, lengths, k, MASK, branch_every=3, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            logits = at_predictions(model, b)
        P = b.pred.size(1)
        assert b.valid.any()
        for row in range(2):
            for p0 in range(0, P, k):  # each branch
                cut = b.pred[row, p0].item()
                plain_in = torch.cat([tokens[row, :cut + 1], torch.full((k - 1,), MASK)])[None]
                with torch.no_grad():
                    want = model(plain_in)[0, cut:]  # logits at x_i and at the k-1 masks
                assert (logits[row, p0:p0 + k] - want).abs().max().item() <= TOL
                # validity: the k targets x_{i+1}..x_{i+k} are real tokens
                assert b.valid[row, p0].item() == (cut + k <= lengths[row].item() - 1)


@pytest.mark.parametrize("k,every", [(2, 1), (4, 1), (6, 3)])
def test_a_branch_at_every_cut_some_row_uses_and_no_other(k, every):
    """Cuts no row can use (inside every prompt, past every end) are dropped; each valid (row, cut)
    keeps its branch. With test_branch_logits_equal_plain_forward: the same loss and gradients."""
    g = torch.Generator().manual_seed(k)
    tokens = torch.randint(0, MASK, (3, 50), generator=g)
    lengths, start = torch.tensor([50, 31, 44]), torch.tensor([12, 20, 9])
    b = build_batch(tokens, lengths, k, MASK, branch_every=every, start=start, generator=g)
    cuts = b.pred[0, ::k].tolist()
    offset0 = min(cuts) % every
    wanted = {(r, c) for r in range(3) for c in range(offset0, 50, every)
              if c >= start[r] and c + k <= lengths[r] - 1}
    assert {c for _, c in wanted} == set(cuts)
    assert {(r, c) for r in range(3) for j, c in enumerate(cuts) if b.valid[r, j * k]} == wanted
    assert b.idx.size(1) == 50 + len(cuts) * (k - 1)


def test_teacher_is_student_forced_and_frozen(tiny):
    student = tiny
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    with torch.no_grad():  # make them differ, as after some training
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    tokens, lengths = rows()
    k = 6
    b = build_batch(tokens, lengths, k, MASK, branch_every=5, generator=torch.Generator().manual_seed(0))

    seen = {}
    hidden = teacher.hidden

    def spy(idx, *a):
        seen["idx"] = idx.clone()
        return hidden(idx, *a)

    teacher.hidden = spy
    loss, metrics = mtp_loss(TwoModels(student, teacher), b)
    del teacher.hidden
    loss.backward()

    with torch.no_grad():
        s = at_predictions(student, b)
        seen["logits"] = at_predictions(teacher, b, seen["idx"])
    y = s.argmax(-1)
    # the teacher's logit at slot j of a valid branch = plain forward over prefix + y'_1..y'_{j-1}
    for row in range(2):
        for p0 in range(0, b.pred.size(1), k):
            if not b.valid[row, p0]:  # past the end of its text: no prediction of it counts
                continue
            cut = b.pred[row, p0].item()
            rollout = y[row, p0:p0 + k - 1]
            with torch.no_grad():
                want = teacher(torch.cat([tokens[row, :cut + 1], rollout])[None])[0, cut:]
            assert (seen["logits"][row, p0:p0 + k] - want).abs().max().item() <= TOL
            assert torch.equal(seen["idx"][row, b.pred[row, p0 + 1:p0 + k]], rollout)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert student.embed_tokens.weight.grad[MASK].abs().sum() > 0  # the <MTP> row is trained
    assert metrics["agree_n"].sum().item() == b.valid.sum().item()


def test_losses_against_their_formulas(tiny):
    student = tiny
    teacher = copy.deepcopy(student).requires_grad_(False)
    tokens, lengths = rows()
    b = build_batch(tokens, lengths, 4, MASK, branch_every=4, generator=torch.Generator().manual_seed(1))
    captured = []
    hidden = teacher.hidden
    teacher.hidden = lambda idx, *a: captured.append(idx) or hidden(idx, *a)
    hard, m = mtp_loss(TwoModels(student, teacher), b)
    soft, _ = mtp_loss(TwoModels(student, teacher), b, soft=True)
    del teacher.hidden
    with torch.no_grad():
        s = at_predictions(student, b)
        t = at_predictions(teacher, b, captured[0])
    v = b.valid
    lp_s, lp_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    want_hard = -(lp_s.gather(-1, t.argmax(-1, keepdim=True))[..., 0] * v).sum() / v.sum()
    want_soft = ((lp_t.exp() * (lp_t - lp_s)).sum(-1) * v).sum() / v.sum()
    assert abs(hard.item() - want_hard.item()) < 1e-5
    assert abs(soft.item() - want_soft.item()) < 1e-5
    # same weights: at offset 1 both read the same ground truth, so they always agree there
    assert m["agree_hit"][0] == m["agree_n"][0] > 0

"""distill.FrozenRowsForwards: what is known before a step, read from FrozenRows, gives the loss, metrics
and gradients of the plain objective (TwoModels(model, model)) and of SharedGroundTruth (in float64,
where no rounding can flip an argmax), and the teacher's targets along any rollout, on the text or off it."""
import pytest
import torch

from distill import (FrozenRowsForwards, FrozenStore, SharedGroundTruth, TwoModels, build_batch, frozen_rows, mtp_loss,
                     teacher_where_needed)
from lora import adapter_state, add_lora
from support.weights import load_model

MASK = 299


def gated_tiny(make_tiny, tmp_path, dtype, tied: bool, layers: int):
    """A random 3-block Llama with gated LoRA in its top `layers` blocks, its adapters random (B away
    from zero), and the generator that drew them, to draw more from."""
    _, path = make_tiny(tmp_path / "tiny", "llama", num_hidden_layers=3, tie_word_embeddings=tied)
    model = load_model(str(path), add_mask=False, dtype=dtype)
    model.cfg.mask_id = MASK
    add_lora(model, 4, alpha=8.0, layers=layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter_state(model).items():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model, g


@pytest.fixture
def tiny(make_tiny, tmp_path):
    """A random 3-block Llama in float64 with gated LoRA in its top block, and a batch of its own
    greedy answers (so that a rollout can follow the text) of two lengths, with prompts."""
    model, g = gated_tiny(make_tiny, tmp_path, torch.float64, tied=False, layers=1)
    prompts = [torch.randint(0, MASK, (n,), generator=g).tolist() for n in (7, 4)]
    texts = []
    with torch.no_grad():
        for prompt, n in zip(prompts, (26, 20)):
            ids = list(prompt)
            while len(ids) < n:
                logits = model(torch.tensor([ids]))[0, -1]
                logits[MASK] = -float("inf")
                ids.append(int(logits.argmax()))
            texts.append(ids)
    return model, texts, [len(p) - 1 for p in prompts]


def store_of(texts, starts, first_block, kv_dtype=None, model=None):
    """A FrozenStore of the texts (k_max 5); given kv_dtype and the model, its rows made with it beforehand."""
    store = FrozenStore([(t, None) for t in texts], starts, 5, first_block)
    if kv_dtype is not None:
        store.rows = {i: frozen_rows(model, ids, s, 5, first_block, kv_dtype) for i, (ids, s) in enumerate(zip(texts, starts))}
        store.precision = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return store


def batch_of(texts, starts, k, seed=0):
    L = max(map(len, texts))
    tokens = torch.zeros(len(texts), L, dtype=torch.long)
    for r, ids in enumerate(texts):
        tokens[r, :len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(t) for t in texts])
    b = build_batch(tokens, lengths, k, MASK, branch_every=1, start=torch.tensor(starts),
                    generator=torch.Generator().manual_seed(seed))
    b.texts = list(range(len(texts)))
    return b


@pytest.mark.parametrize("k,soft", [(2, False), (4, False), (4, True)])
def test_frozen_rows_give_the_plain_loss_and_gradients(tiny, k, soft):
    model, texts, starts = tiny
    b = batch_of(texts, starts, k)
    assert b.valid.any()

    def run(fn):
        model.zero_grad()
        loss, metrics = fn()
        loss.backward()
        return loss.item(), metrics, {n: p.grad.clone() for n, p in adapter_state(model).items() if p.requires_grad}
    plain = run(lambda: mtp_loss(TwoModels(model, model), b, soft=soft))
    for forwards in (SharedGroundTruth(model), FrozenRowsForwards(model, store_of(texts, starts, first_block=2))):
        got = run(lambda: mtp_loss(forwards, b, soft=soft))
        assert got[0] == pytest.approx(plain[0], rel=1e-6)
        for key in ("agree_n", "agree_hit"):
            assert torch.equal(got[1][key], plain[1][key]), key
        torch.testing.assert_close(got[1]["loss_sum"], plain[1]["loss_sum"], rtol=1e-6, atol=1e-6)
        assert plain[2]
        for name, grad in plain[2].items():
            assert grad.abs().max() > 0, name
            # RMSNorm normalizes in float32 (as the reference does), so shapes that differ round differently
            torch.testing.assert_close(got[2][name], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item())


def test_the_teacher_on_the_text_and_off_it(tiny):
    """Rollouts that follow the text for d slots, then leave it, for every d: where they follow it the
    original's argmax at the real row is the teacher's target; where they left it, the teacher runs on
    the slots after the last one on the text only. Both equal the teacher of mtp_loss on the whole branch."""
    model, texts, starts = tiny
    k, m = 5, 4
    b = batch_of(texts, starts, k)
    frozen = [frozen_rows(model, ids, s, k, first_block=2) for ids, s in zip(texts, starts)]
    B, L = len(texts), b.idx.size(1) - b.fill.size(1)
    cuts = b.pred[0, ::k]
    rows = (cuts[:, None] + torch.arange(1, m + 1)).clamp(max=L - 1)
    text = b.idx[:, rows]  # (B, n_branches, m)
    g = torch.Generator().manual_seed(1)
    follow = torch.randint(0, m + 1, text.shape[:2], generator=g)  # slots on the text, per branch
    off = (text + 1 + torch.randint(0, MASK - 1, text.shape, generator=g)) % MASK  # never the text's token
    y = torch.where(torch.arange(m) < follow[..., None], text, off)
    with torch.no_grad():  # the reference: the teacher on whole branches holding y (distill.TwoModels)
        t = model(b.idx.scatter(1, b.fill, y.flatten(1)), b.pos, b.mask)
        t = t.gather(1, b.pred[..., None].expand(-1, -1, t.size(-1)))
    want = t.view(B, -1, k, t.size(-1))[:, :, 1:].argmax(-1)  # offsets 2..k, (B, n_branches, m)
    on_text = (y == text).cumprod(2).bool()
    valid = b.valid.view(B, -1, k)[:, :, :1].expand_as(on_text)
    assert on_text[valid].any() and (~on_text[valid]).any()
    cache = model.new_cache(L, B)
    for r, f in enumerate(frozen):
        cache.k[:, r, :, :f.k.size(2)], cache.v[:, r, :, :f.v.size(2)] = f.k, f.v
    cache.length, cache.read_only = L, True
    got, _ = teacher_where_needed(model, cache, y, ~on_text & valid, cuts, soft=False)
    known = torch.stack([f.argmax[rows.clamp(max=len(f.argmax) - 1)] for f in frozen])
    got = torch.where(on_text, known, got)
    assert torch.equal(got[valid], want[valid])


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_weight_copies_give_autocasts_loss_and_gradients(make_tiny, tmp_path, tied):
    """support.optim.autocast(args, model) reads the frozen float32 projections and output layer from
    bfloat16 copies made once: the loss and every gradient equal plain torch.autocast's, bit for bit,
    on the frozen-rows path the hour trains with; the float32 weights are back afterwards, a copy is
    made again when its weight changes, and the copies can be let go."""
    from types import SimpleNamespace

    from support.cpu_kernels import use_few_row_kernels
    from support.optim import autocast, drop_frozen_copies
    model, g = gated_tiny(make_tiny, tmp_path, torch.float32, tied, layers=2)
    use_few_row_kernels(model)
    texts = [torch.randint(0, MASK, (n,), generator=g).tolist() for n in (26, 20)]
    starts = [5, 3]
    args = SimpleNamespace(amp="bfloat16", device="cpu")
    weights = {n: p for n, p in model.named_parameters()}

    def run(context):
        store = FrozenStore([(t, s + 1) for t, s in zip(texts, starts)], starts, 5, first_block=1)
        model.zero_grad()
        with context():
            loss, _ = mtp_loss(FrozenRowsForwards(model, store), batch_of(texts, starts, 4))
            inside = model.lm_head.weight.dtype, model.layers[0].mlp.up_proj.weight.dtype
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in adapter_state(model).items() if p.requires_grad}, inside

    plain = run(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    copies = run(lambda: autocast(args, model))
    again = run(lambda: autocast(args, model))  # the copies made by the call before
    assert plain[2] == (torch.float32, torch.float32) and copies[2] == (torch.bfloat16, torch.bfloat16)
    for got in (copies, again):
        assert got[0] == plain[0]
        assert got[1].keys() == plain[1].keys() and plain[1]
        assert all(torch.equal(got[1][n], plain[1][n]) for n in plain[1])
    assert all(p is weights[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
    head = model.lm_head.weight
    with torch.no_grad():
        head.mul_(2.0)
    with autocast(args, model):
        assert torch.equal(model.lm_head.weight, head.bfloat16())
    drop_frozen_copies(model)  # what a run that chose float32 does
    assert not any(hasattr(layer, "cast_copy") for layer in model.modules())


def test_keys_and_values_kept_in_the_autocast_dtype_change_nothing(make_tiny, tmp_path):
    """Under bfloat16 autocast, attention reads keys and values in bfloat16, so FrozenStore keeps them so:
    the loss and every gradient equal those from float32 keys and values bit for bit, and the store's size
    estimate (what train.py checks against its memory cap) is what the kept rows take."""
    model, g = gated_tiny(make_tiny, tmp_path, torch.float32, tied=False, layers=2)
    texts = [torch.randint(0, MASK, (n,), generator=g).tolist() for n in (26, 20)]
    starts = [5, 3]
    b = batch_of(texts, starts, 4)

    def run(kv_dtype):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = mtp_loss(FrozenRowsForwards(model, store_of(texts, starts, 1, kv_dtype, model)), b)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in adapter_state(model).items() if p.requires_grad}
    full, half = run(torch.float32), run(torch.bfloat16)
    assert half[0] == full[0] and full[1]
    assert all(torch.equal(half[1][n], full[1][n]) for n in full[1])

    store = FrozenStore([(t, s + 1) for t, s in zip(texts, starts)], starts, 5, first_block=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = store.get(model, [0, 1], b.pred[0, ::4], 4)
    assert all(f.k.dtype == f.v.dtype == torch.bfloat16 and f.masks.dtype == torch.float32 for f in rows)
    kept = sum(t.nbytes for f in rows for t in (f.k, f.v, f.argmax, f.cut_loss, f.masks))
    assert store.nbytes(model.cfg, torch.float32, torch.bfloat16) == kept
    assert store.nbytes(model.cfg, torch.float32, None) > kept


@pytest.mark.parametrize("soft", [False, True])
def test_texts_past_the_store_limit_are_made_for_their_step(tiny, soft):
    """A store that keeps only the first text (the memory left for it holds one) makes the second's rows for
    each step alone, for that step's branches: the loss, metrics and gradients are those of keeping both."""
    model, texts, starts = tiny
    b = batch_of(texts, starts, 4, seed=1)

    def loss_and_grads(limit):
        store = FrozenStore([(t, None) for t in texts], starts, 5, first_block=2)
        store.limit_bytes = limit(store.text_bytes(0, model.cfg, torch.float64, None))
        model.zero_grad()
        loss, metrics = mtp_loss(FrozenRowsForwards(model, store), b, soft=soft)
        loss.backward()
        return store, loss.item(), metrics, {n: p.grad.clone() for n, p in adapter_state(model).items() if p.requires_grad}
    every = loss_and_grads(lambda first: float("inf"))
    one = loss_and_grads(lambda first: first)
    assert sorted(every[0].rows) == [0, 1] and sorted(one[0].rows) == [0] and one[0].kept_bytes < every[0].kept_bytes
    assert one[1] == pytest.approx(every[1], rel=1e-12) and one[2]["n"] == every[2]["n"]
    assert torch.equal(one[2]["agree_hit"], every[2]["agree_hit"])
    assert all(torch.allclose(one[3][n], every[3][n], rtol=1e-10, atol=1e-13) for n in every[3])


@pytest.mark.parametrize("soft", [False, True])
def test_a_batch_without_a_valid_branch(tiny, soft):
    """Every cut too close to the end of its text for k = 4 (build_batch keeps its cuts then): the frozen
    rows' forwards give the plain objective's loss of 0, and no prediction, hard or soft."""
    model, texts, starts = tiny
    late = [len(t) - 3 for t in texts]
    b = batch_of(texts, late, 4)
    assert not b.valid.any()
    for forwards in (TwoModels(model, model), FrozenRowsForwards(model, store_of(texts, late, first_block=2))):
        loss, metrics = mtp_loss(forwards, b, soft=soft)
        assert loss.item() == 0 and metrics["n"] == 0

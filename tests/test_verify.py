"""--verify on real weights: its output is, token for token, that of k=1 decoding and of transformers'
greedy generate, whatever the drafts; a cache pass with explicit positions and mask equals plain
forwards over prefix + branch; the drafts it feeds are those a plain forward over prefix + masks gives."""
import random

import pytest
import torch

from decode import branch_layout, generate
from distill import build_batch
from support.sizing import PassCost
from support.weights import load_model

TOL = 1e-4
V, MASK = 300, 299


@pytest.fixture
def tiny(make_tiny, tmp_path):
    """tiny(family, tied): a random 2-layer Llama or Qwen3 (transformers' own), and ours loaded from
    it with a mask id."""
    def make(family, tied):
        hf, path = make_tiny(tmp_path / family, family, vocab_size=V, head_dim=16, max_position_embeddings=512,
                             tie_word_embeddings=tied)
        hf.generation_config.eos_token_id = None  # stop only where a test says so
        model = load_model(str(path), add_mask=False)
        model.cfg.mask_id = MASK
        return hf, model
    return make


def hf_greedy(hf, prompt, max_new, stop=None):
    idx = torch.tensor([prompt])
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new, do_sample=False,
                      eos_token_id=stop, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class DraftOracle(torch.nn.Module):
    """The real model, except that at <MTP> slots it proposes the reference continuation with
    probability p_right (else a random token), at a random confidence: drafts that are often right
    and rejected at random places. The logits at real tokens, which decide the output, are the model's."""

    def __init__(self, model, text, p_right, seed):
        super().__init__()
        self.model, self.cfg, self.embed_tokens = model, model.cfg, model.embed_tokens
        self.text, self.p_right, self.rng = text, p_right, random.Random(seed)

    def new_cache(self, max_len, batch=1):
        return self.model.new_cache(max_len, batch)

    def output(self, x):  # hidden() gives the logits themselves
        return x

    def hidden(self, idx, pos=None, mask=None, cache=None):
        start = cache.length
        logits = self.model(idx, pos, mask, cache)
        pos = torch.arange(start, start + idx.size(1)) if pos is None else pos
        for i, s in enumerate(range(idx.size(1))):
            if idx[0, s] == MASK:
                target = pos[s].item() + 1
                token = self.text[target] if target < len(self.text) else 0
                if self.rng.random() > self.p_right:
                    token = self.rng.randrange(V)
                logits[0, i, token] = logits[0, i].max() + self.rng.choice([0.5, 2.0, 8.0])
        return logits


# (k_max, draft threshold, layout, p_right of the oracle or None for the model's own drafts, tree)
SETTINGS = [(2, None, "quadratic", None, 1), (4, None, "quadratic", None, 1), (8, None, "simple", None, 1),
            (3, None, "quadratic", 0.7, 1), (4, 0.5, "quadratic", 0.8, 1), (5, None, "simple", 0.8, 1),
            (6, None, "quadratic", 1.0, 1), (7, 0.9, "quadratic", 0.6, 1), (8, 0.3, "quadratic", 0.9, 1),
            (8, None, "simple", 1.0, 1), (4, None, "quadratic", None, 3), (3, None, "quadratic", 0.5, 2),
            (5, 0.2, "quadratic", 0.7, 4), (4, None, "quadratic", 1.0, 2)]


# pass costs by rows (support/sizing.py): None feeds the whole block; the others make each pass feed fewer
# drafts and narrower branches, differently as the drafts hold or fail
PASS_COSTS = {"full block": None,
              "cpu float32": PassCost({1: 26.2, 2: 28.8, 4: 37.1, 8: 39.8, 16: 51.8}),  # ms, measured once
              "rows dear": PassCost({r: float(r) for r in (1, 2, 4, 8, 16, 32, 64)})}


def check_verify(model, prompt, max_new, want, stop_ids, settings, seed=0, pass_costs=("full block",)):
    for (k_max, threshold, layout, p_right, tree), cost in ((s, c) for s in settings for c in pass_costs):
        m = model if p_right is None else DraftOracle(model, prompt + want, p_right, seed)
        r = generate(m, prompt, max_new, verify=True, k_max=k_max, draft_threshold=threshold, layout=layout,
                     stop_ids=stop_ids, pass_cost=PASS_COSTS[cost], tree=tree)
        setting = (k_max, threshold, layout, p_right, tree, cost)
        assert r.tokens == want, setting
        assert sum(r.chunks) == len(want) and r.passes == len(r.chunks), setting
        assert 0 <= r.drafts_accepted <= r.drafts_fed, setting
        assert max(r.chunks) <= k_max, setting
        if p_right == 1.0 and threshold is None and cost == "full block":  # right drafts are always kept
            assert r.drafts_accepted > 0 and (tree > 1 or r.drafts_accepted == r.drafts_fed), setting
            assert r.passes <= 1 + -(-(len(want) - 1) // k_max), setting  # k_max tokens a pass


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen3", False)])
def test_verify_equals_k1_and_transformers_on_tiny_models(tiny, family, tied):
    hf, model = tiny(family, tied)
    g = torch.Generator().manual_seed(1)
    early_stops = 0
    for n in range(6):
        prompt = torch.randint(0, MASK, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        max_new = 40 - 3 * n
        free = hf_greedy(hf, prompt, max_new)
        # odd prompts stop early: at the first occurrence of a token that first appears after a few tokens
        late = [t for i, t in enumerate(free) if i >= 4 and t not in free[:i]]
        stop = late[0] if n % 2 and late else None
        want = hf_greedy(hf, prompt, max_new, stop)
        early_stops += len(want) < max_new
        stop_ids = {stop} if stop is not None else set()
        assert generate(model, prompt, max_new, stop_ids=stop_ids).tokens == want  # k=1
        check_verify(model, prompt, max_new, want, stop_ids, SETTINGS, seed=n, pass_costs=PASS_COSTS)
    assert early_stops > 0


def test_verify_equals_transformers_on_smollm2(smollm2, smollm2_hf):
    tok = smollm2.tokenizer
    stop = sorted(tok.stop_ids)
    texts = ["What is 12 times 7?", "Say hello."]  # the second stops early
    settings = [(4, None, "quadratic", None, 1), (3, 0.2, "quadratic", 0.8, 1), (5, 0.5, "simple", 0.9, 1),
                (4, None, "quadratic", None, 3)]
    sized = [(8, None, "quadratic", 0.9, 1), (4, None, "quadratic", 0.6, 2)]
    stopped_early = 0
    for text in texts:
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        want = smollm2_hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=stop,
                                   pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
        stopped_early += len(want) < 32
        check_verify(smollm2, prompt, 32, want, tok.stop_ids, settings)
        check_verify(smollm2, prompt, 32, want, tok.stop_ids, sized, pass_costs=("cpu float32",))
    assert stopped_early > 0


# -----------------------------------------------------------------------------
# the layout of a verify pass

def test_branch_layout_is_the_training_layout():
    """With a branch after every fed token, positions and visibility are build_batch's (distill.py)
    for a branch after every token, shifted past the cached tokens, which every query sees."""
    fed, k, base = 5, 4, 7
    pos, mask = branch_layout(fed, list(range(fed)), k - 1, base, "cpu")
    # length fed + k: every cut is valid (its targets lie past the fed tokens), so none is dropped
    b = build_batch(torch.arange(fed)[None], torch.tensor([fed + k]), k, MASK, branch_every=1)
    assert torch.equal(pos, b.pos[0] + base)
    assert mask[:, :base].all()
    assert torch.equal(mask[:, base:], b.mask[0])


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen3", False)])
@pytest.mark.parametrize("n_masks", [1, 3, 7])
def test_cache_pass_with_mask_equals_plain_forward(tiny, family, tied, n_masks):
    _, model = tiny(family, tied)
    g = torch.Generator().manual_seed(n_masks)
    prefix, fed = torch.randint(0, MASK, (1, 11), generator=g), torch.randint(0, MASK, (1, 4), generator=g)
    for anchors in ([0, 1, 2, 3], [3], [1, 3]):
        cache = model.new_cache(64)
        with torch.no_grad():
            model(prefix, cache=cache)  # the committed tokens, through the plain cache call
            pos, mask = branch_layout(4, anchors, n_masks, cache.length, "cpu")
            idx = torch.cat([fed, torch.full((1, len(anchors) * n_masks), MASK)], 1)
            got = model(idx, pos, mask, cache=cache)[0]
            assert cache.length == 11 + idx.size(1)
            plain = model(torch.cat([prefix, fed], 1))[0, 11:]
            assert (got[:4] - plain).abs().max().item() <= TOL  # fed tokens: causal
            for b, i in enumerate(anchors):  # branch after fed token i = prefix + fed[:i+1] + masks
                ref = model(torch.cat([prefix, fed[:, :i + 1], torch.full((1, n_masks), MASK)], 1))[0, -n_masks:]
                rows = got[4 + b * n_masks:4 + (b + 1) * n_masks]
                assert (rows - ref).abs().max().item() <= TOL
        # after truncation to an accepted prefix the cache goes on exactly as if only it was fed
        cache.truncate(11 + 2)
        with torch.no_grad():
            tail = model(fed[:, 2:], cache=cache)[0]
        assert (tail - plain[2:]).abs().max().item() <= TOL


def test_tree_pass_equals_plain_forwards_over_each_path(tiny):
    """A tree of fed tokens (parents) with a branch after each: every fed token and every branch gives the
    logits of a plain forward over the prefix and its own path; the cache then keeps one path (KVCache.keep)
    and goes on as if only it had been fed."""
    _, model = tiny("qwen3", False)
    g = torch.Generator().manual_seed(3)
    prefix, fed = torch.randint(0, MASK, (1, 11), generator=g), torch.randint(0, MASK, (6,), generator=g)
    parents, n_masks = [-1, 0, 0, 1, 2, 4], 2

    def path(i):
        return path(parents[i]) + [i] if i >= 0 else []
    cache = model.new_cache(64)
    with torch.no_grad():
        model(prefix, cache=cache)
        pos, mask = branch_layout(6, list(range(6)), n_masks, cache.length, "cpu", parents)
        got = model(torch.cat([fed, torch.full((6 * n_masks,), MASK)])[None], pos, mask, cache=cache)[0]
        for i in range(6):
            tokens = torch.cat([prefix[0], fed[path(i)]])
            assert (got[i] - model(tokens[None])[0, -1]).abs().max().item() <= TOL
            ref = model(torch.cat([tokens, torch.full((n_masks,), MASK)])[None])[0, -n_masks:]
            assert (got[6 + i * n_masks:6 + (i + 1) * n_masks] - ref).abs().max().item() <= TOL
        kept = path(5)  # fed 0, 2, 4, 5
        cache.keep(11, [11 + i for i in kept])
        assert cache.length == 11 + len(kept)
        nxt = torch.randint(0, MASK, (1, 2), generator=g)
        tail = model(nxt, cache=cache)[0]
        plain = model(torch.cat([prefix, fed[kept][None], nxt], 1))[0, -2:]
    assert (tail - plain).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["quadratic", "simple"])
def test_fed_drafts_are_plain_forward_predictions(tiny, layout):
    """Every draft fed in a pass is the argmax, at its mask slot, of a plain forward over the committed
    tokens before the pending one + k_max - 1 masks (up to float32 rounding)."""
    _, model = tiny("llama", False)
    calls = []
    hidden = model.hidden

    def spy(idx, pos=None, mask=None, cache=None):
        calls.append((idx[0].tolist(), None if pos is None else pos[0].item()))
        return hidden(idx, pos, mask, cache)

    model.hidden = spy
    prompt, k_max = [5, 17, 42, 8, 99, 3], 5
    r = generate(model, prompt, 30, verify=True, k_max=k_max, layout=layout)
    del model.hidden
    text, checked = prompt + r.tokens, 0
    for inp, pos0 in calls[1:]:
        drafts = [t for t in inp[1:] if t != MASK]
        if not drafts:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([text[:pos0] + [MASK] * (k_max - 1)]))[0, pos0 - 1:].softmax(-1)
        for j, d in enumerate(drafts):  # the mask at position pos0 + j proposes the token at pos0 + j + 1
            assert logits[j + 1, d] >= logits[j + 1].max() - TOL
            checked += 1
    assert checked > 0

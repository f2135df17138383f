"""decode.py: k=1 equals transformers' greedy generate on real weights; the acceptance logic and the
cache bookkeeping against a scripted model whose confidences we choose; bad input on the CLI."""
import json
import re

import pytest
import torch

from data import extract_number, read_jsonl
from data.own_answers import generate_batch
from decode import draft_rules, generate
from model import KVCache, ModelConfig
from support.sizing import Acceptance, PassCost, RankAcceptance, best_n, draft_tree

PROMPTS = ["What is 12 times 7?",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?"]


@pytest.mark.parametrize("text", PROMPTS)
def test_k1_equals_transformers_generate(smollm2, smollm2_hf, text):
    tok = smollm2.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": text}])
    ref = smollm2_hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              eos_token_id=sorted(tok.stop_ids), pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    ours = generate(smollm2, prompt, 32, k=1, stop_ids=tok.stop_ids)
    assert ours.tokens == ref
    assert ours.passes == len(ours.tokens)
    # ConfAdapt where no mask candidate clears the threshold is plain next-token decoding
    never = generate(smollm2, prompt, 32, threshold=1.0, stop_ids=tok.stop_ids)
    assert never.tokens == ref and never.passes == len(ref)


def test_batched_greedy_equals_one_by_one(smollm2):
    tok = smollm2.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": f"What is {a} plus {b}?"}]) for a, b in [(2, 3), (4, 5)]]
    assert len(prompts[0]) == len(prompts[1])
    batched = generate_batch(smollm2, prompts, 24, tok.stop_ids)
    assert batched == [generate(smollm2, p, 24, stop_ids=tok.stop_ids).tokens for p in prompts]


# -----------------------------------------------------------------------------
# a scripted model: it "knows" the continuation and says how sure it is of each candidate

MASK, STOP, WRONG, V = 99, 98, 97, 100


class Scripted(torch.nn.Module):
    """Candidate at a real token = the true next token; at the j-th mask slot after a real token = the
    true token j+1 ahead of it, with confidence conf(j) (conf(0) at real tokens), or WRONG where the
    predicted position is in `wrong`. Positions and visibility come from the call (pos, mask) as in the
    real model. It records every call to check the cache length and the inputs."""

    def __init__(self, truth, conf, wrong=()):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=V, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                               hidden_dim=8, max_seq_len=512, mask_id=MASK)
        self.embed_tokens = torch.nn.Embedding(V, 8)
        self.truth, self.conf, self.wrong, self.calls = truth, conf, set(wrong), []

    def new_cache(self, max_len, batch=1):
        return KVCache(self.cfg, max_len, batch, "cpu", torch.float32, torch.ones(4))

    def output(self, x):  # hidden() gives the logits themselves
        return x

    def hidden(self, idx, pos=None, mask=None, cache=None):
        start, T = cache.length, idx.size(1)
        ids = idx[0].tolist()
        pos = list(range(start, start + T)) if pos is None else pos.tolist()
        self.calls.append((start, ids))
        cache.length += T
        out = []
        for s in range(T):
            target = pos[s] + 1  # the absolute position this slot predicts
            j = 0
            if ids[s] == MASK:  # offset from the last real token this slot sees
                j = pos[s] - max(pos[i] for i in range(T) if ids[i] != MASK and (mask is None or mask[s, start + i]))
            p = self.conf(j)
            probs = torch.full((V,), (1 - p) / (V - 1))  # top-1 probability exactly p
            token = self.truth[target] if target < len(self.truth) else STOP
            probs[WRONG if ids[s] == MASK and target in self.wrong else token] = p
            out.append(probs.log())
        return torch.stack(out)[None]


def test_confadapt_accepts_leading_run_and_bookkeeping():
    prompt = [1, 2, 3, 4]
    truth = prompt + list(range(10, 60))
    # confidence pattern per slot: 0.99, 0.95, 0.5, 0.97, ... -> with T=0.9 accept 2 at the last real
    # token and first mask (slot 2 fails), i.e. 2 tokens per pass
    model = Scripted(truth, lambda j: [0.99, 0.95, 0.5, 0.97, 0.99][j] if j < 5 else 0.99)
    r = generate(model, prompt, 12, threshold=0.9, k_max=5)
    assert r.tokens == truth[4:16]
    assert r.chunks == [2] * 6 and r.passes == 6 and r.acceleration == 2.0
    for n, (start, inp) in enumerate(model.calls):
        if n == 0:  # the prompt, then k_max-1 masks
            assert start == 0 and inp == prompt + [MASK] * 4
        else:  # the previous pass's accepted tokens as real inputs, right after the committed ones
            assert start == len(prompt) + 2 * (n - 1)
            assert inp == r.tokens[2 * (n - 1):2 * n] + [MASK] * 4


def test_minimum_one_token_and_static_k():
    prompt = [5, 6]
    truth = prompt + list(range(20, 40))
    model = Scripted(truth, lambda j: 0.3)  # nothing is ever confident
    r = generate(model, prompt, 7, threshold=0.9, k_max=4)
    assert r.tokens == truth[2:9] and r.chunks == [1] * 7
    model = Scripted(truth, lambda j: 0.3)
    r = generate(model, prompt, 7, k=3)  # static k ignores confidence; the last pass is cut at 7
    assert r.tokens == truth[2:9] and r.chunks == [3, 3, 1]
    assert [len(inp) for _, inp in model.calls] == [2 + 2, 3 + 2, 3 + 2]


def test_decoding_never_emits_the_mask_token():
    prompt = [1, 2, 3, 4]
    truth = prompt + [10, MASK, 11, MASK, 12] + [STOP] * 20  # a model that "wants" <MTP> as text
    for kw in (dict(k=1), dict(k=3), dict(threshold=0.5, k_max=4)):
        r = generate(Scripted(truth, lambda j: 0.9), prompt, 10, stop_ids={STOP}, **kw)
        assert MASK not in r.tokens


def test_stop_token_inside_chunk_cuts_output():
    prompt = [7]
    truth = prompt + [30, 31, STOP, 33, 34, 35, 36]
    model = Scripted(truth, lambda j: 0.99)
    r = generate(model, prompt, 50, threshold=0.9, k_max=6, stop_ids={STOP})
    assert r.tokens == [30, 31, STOP] and r.passes == 1


# -----------------------------------------------------------------------------
# passes sized by what they cost (support/sizing.py), with cost tables we choose

FLAT = PassCost({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0, 32: 1.0, 64: 1.0}, track=False)  # a GPU: rows are free
CUBIC = PassCost({r: float(r ** 3) for r in (1, 2, 4, 8, 16, 32, 64)}, track=False)  # every extra row too dear


def test_acceptance_rates_by_hand():
    a = Acceptance(3)
    assert a.rates(3) == [1.0, 1.0, 1.0] and a.expected(2) == 2.0  # untried: assumed to hold
    a.record(n_fed=3, n_held=1)  # guess 1 held, guess 2 did not, guess 3 was not reached
    a.record(n_fed=1, n_held=1)
    a.record(n_fed=2, n_held=0)
    # a_1 = (2 + 2 * 1) / (3 + 2); a_2 = (0 + 2 * a_1) / (1 + 2); a_3 = a_2 (never tried)
    assert a.tries == [3, 1, 0] and a.hits == [2, 0, 0]
    assert a.rates(3) == pytest.approx([0.8, 1.6 / 3, 1.6 / 3])
    assert a.expected(3) == pytest.approx(0.8 + 0.8 * 1.6 / 3 + 0.8 * (1.6 / 3) ** 2)


def test_pass_cost_of_rows_between_and_beyond_the_measured():
    cost = PassCost({1: 10.0, 2: 12.0, 4: 20.0})  # beyond 4 rows: 4 per row, as from 2 to 4
    assert [cost(r) for r in (1, 2, 3, 4, 6, 8)] == [10.0, 12.0, 20.0, 20.0, 28.0, 36.0]


def test_verify_feeds_the_whole_block_where_rows_are_free_beyond_the_measured():
    """A GPU's pass costs the same from 1 to 64 rows (H200, Qwen3-4B's shape: docs/GPU.md). Beyond
    the 64 measured rows a --verify pass of k_max 16 feeds 15 drafts and branches of 15: 256 rows,
    which must not be guessed four times dearer, or no more than 7 drafts would ever be fed."""
    flat = PassCost({r: 0.025 for r in (1, 2, 4, 8, 16, 32, 64)})
    held = Acceptance(15)
    for _ in range(50):
        held.record(n_fed=15, n_held=15)
    assert best_n(15, held.expected, flat, rows=lambda n: (1 + n) ** 2) == 15
    flat.observe(256, 0.05)  # and once fed, the pass's own time is what counts
    assert flat(256) == 0.05 and flat(129) == 0.05 and flat.rows[-1] == 256


def test_pass_cost_follows_the_passes_decoding_times():
    cost = PassCost({1: 10.0, 2: 12.0, 4: 20.0})
    cost.observe(1, 6.0)  # the start-up measurement counts as one pass: the mean of the two
    cost.observe(3, 30.0)  # a pass of 3 rows runs at 4
    cost.observe(8, 99.0)  # beyond the table: a new row count
    assert [cost(r) for r in (1, 2, 4, 8)] == [8.0, 12.0, 25.0, 99.0]
    for _ in range(100):
        cost.observe(1, 4.0)
    assert cost(1) == pytest.approx(4.0, abs=1e-3)  # the recent passes weigh most
    one = cost(1)
    cost.observe(1, 12.0)
    assert cost(1) == pytest.approx(one + (12.0 - one) / PassCost.RECENT)
    assert not cost.stale(1) and cost.stale(2)  # 2 rows: not fed for 102 passes
    fixed = PassCost({1: 10.0, 2: 12.0}, track=False)
    fixed.observe(1, 1.0)
    assert fixed(1) == 10.0 and not fixed.stale(2)


def test_confadapt_feeds_again_a_row_count_measured_dear():
    """Masks measured too dear at start-up are fed once when they have not been for REVISIT passes,
    so that a busy moment at start-up does not decide for the whole decoding."""
    n_new = PassCost.REVISIT + 8
    for track in (False, True):
        model = Scripted(TRUTH, lambda j: 0.99 if j == 0 else 0.3)  # no mask candidate clears 0.9
        dear = PassCost({r: float(r ** 3) for r in (1, 2, 4, 8)}, track=track)
        r = generate(model, PROMPT, n_new, threshold=0.9, k_max=5, pass_cost=dear)
        assert r.tokens == TRUTH[4:4 + n_new]  # the masks never clear: k=1's output either way
        masks = [inp.count(MASK) for _, inp in model.calls]
        if not track:
            assert set(masks) == {0}
        else:  # pass 33 feeds 1 mask (2 rows), then 4 (5 rows, at 8), then 2 (3 rows, at 4)
            assert masks[:PassCost.REVISIT] == [0] * PassCost.REVISIT
            assert masks[PassCost.REVISIT:PassCost.REVISIT + 3] == [1, 4, 2] and set(masks[PassCost.REVISIT + 3:]) == {0}


@pytest.mark.parametrize("verify", [False, True])
def test_free_rows_feed_the_whole_block(verify):
    """Where a pass of many rows costs what one costs, sizing feeds exactly what the full block feeds."""
    conf = lambda j: [0.99, 0.95, 0.5, 0.97][j] if j < 4 else 0.99  # noqa: E731
    runs = []
    for pass_cost in (None, FLAT):
        model = Scripted(TRUTH, conf, wrong={9, 14})
        kw = dict(verify=True) if verify else dict(threshold=0.9)
        r = generate(model, PROMPT, 20, k_max=5, stop_ids={STOP}, pass_cost=pass_cost, **kw)
        runs.append((r.tokens, r.chunks, model.calls))
    assert runs[0] == runs[1]


def test_confadapt_feeds_no_mask_where_none_pays_off():
    model = Scripted(TRUTH, lambda j: 0.99 if j == 0 else 0.3)  # no mask candidate ever clears 0.9
    r = generate(model, PROMPT, 12, threshold=0.9, k_max=5, pass_cost=CUBIC)
    assert r.tokens == TRUTH[4:16] and r.chunks == [1] * 12
    assert [len(inp) for _, inp in model.calls] == [4] + [1] * 11  # k=1's passes: no masks at all
    model = Scripted(TRUTH, lambda j: 0.99 if j == 0 else 0.3)
    r = generate(model, PROMPT, 12, threshold=0.9, k_max=5, pass_cost=FLAT)
    assert [len(inp) for _, inp in model.calls] == [4 + 4] + [1 + 4] * 11  # free rows: every mask


def test_confadapt_adds_masks_as_they_hold():
    """Rows whose cost grows with their number: masks that hold are fed, masks that fail are dropped."""
    model = Scripted(TRUTH, lambda j: 0.99)  # every candidate clears
    linear = PassCost({r: float(r) for r in (1, 2, 4, 8, 16)}, track=False)
    r = generate(model, PROMPT, 30, threshold=0.9, k_max=5, pass_cost=linear)
    assert r.tokens == TRUTH[4:34]
    # every guess holds: as many masks as fit the 8 rows that a pass of 5-8 rows costs
    assert [len(inp) for _, inp in model.calls][1:] == [8] * (len(model.calls) - 1)
    model = Scripted(TRUTH, lambda j: [0.99, 0.95, 0.95, 0.3, 0.3][j] if j < 5 else 0.3)  # masks 1-2 hold
    r = generate(model, PROMPT, 30, threshold=0.9, k_max=5, pass_cost=linear)
    assert r.tokens == TRUTH[4:34]
    masks = [inp.count(MASK) for _, inp in model.calls]
    assert masks[:2] == [4, 4] and set(masks[2:]) == {1, 2}  # untried masks are tried, failing ones dropped
    assert all(len(inp) == 4 for _, inp in model.calls[2:])  # the accepted tokens and masks fill 4 rows


# -----------------------------------------------------------------------------
# --verify against the scripted model: each expected value below is worked out by hand from the rule
# (feed pending + drafts, keep drafts while they equal the model's token, then its token; drafts for
# the next pass from the branch after the last committed input). Prompt at positions 0..3, k_max 4.

M3 = [MASK] * 3
PROMPT = [1, 2, 3, 4]
TRUTH = PROMPT + list(range(10, 60))


def run_verify(max_new, wrong=(), conf=lambda j: 0.99, truth=TRUTH, **kw):
    model = Scripted(truth, conf, wrong)
    cache = model.new_cache(200)
    r = generate(model, PROMPT, max_new, verify=True, k_max=4, cache=cache, stop_ids={STOP}, **kw)
    starts = [start for start, _ in model.calls]  # the committed cache length before each pass
    return r, [inp for _, inp in model.calls], starts + [cache.length]


def test_verify_accept_all_with_bonus_tokens():
    r, inputs, cache_len = run_verify(11)
    assert r.tokens == list(range(10, 21))
    assert inputs == [PROMPT + M3, [10, 11, 12, 13] + M3 * 4, [14, 15, 16, 17] + M3 * 4,
                      [18, 19] + M3 * 2]  # the last pass: 2 tokens left, so one draft
    assert r.chunks == [1, 4, 4, 2] and r.passes == 4
    assert cache_len == [0, 4, 8, 12, 14]
    assert (r.drafts_fed, r.drafts_accepted) == (7, 7)


def test_verify_reject_first_draft():
    r, inputs, cache_len = run_verify(8, wrong={5})  # every draft for position 5 is wrong
    assert r.tokens == list(range(10, 18))
    # pass 2 rejects WRONG at once: 11 replaces it, and the branch after 10 already holds 12, 13, 14
    assert inputs == [PROMPT + M3, [10, WRONG, 12, 13] + M3 * 4, [11, 12, 13, 14] + M3 * 4, [15, 16] + M3 * 2]
    assert r.chunks == [1, 1, 4, 2]
    assert cache_len == [0, 4, 5, 9, 11]
    assert (r.drafts_fed, r.drafts_accepted) == (7, 4)


def test_verify_reject_first_draft_simple_layout_loses_a_pass():
    r, inputs, cache_len = run_verify(8, wrong={5}, layout="simple")
    assert r.tokens == list(range(10, 18))
    # one branch, after the last draft: after the rejection the next pass has no drafts
    assert inputs == [PROMPT + M3, [10, WRONG, 12, 13] + M3, [11] + M3, [12, 13, 14, 15] + M3, [16] + M3]
    assert r.chunks == [1, 1, 1, 4, 1]
    assert cache_len == [0, 4, 5, 6, 10, 11]
    assert (r.drafts_fed, r.drafts_accepted) == (6, 3)


def test_verify_reject_middle_draft():
    r, inputs, cache_len = run_verify(8, wrong={6})
    assert r.tokens == list(range(10, 18))
    # 11 is kept, WRONG is replaced by 12; the branch after 11 proposes 13, 14, 15
    assert inputs == [PROMPT + M3, [10, 11, WRONG, 13] + M3 * 4, [12, 13, 14, 15] + M3 * 4, [16] + M3]
    assert r.chunks == [1, 2, 4, 1]
    assert cache_len == [0, 4, 6, 10, 11]
    assert (r.drafts_fed, r.drafts_accepted) == (6, 4)


def test_verify_stop_token_inside_drafts():
    truth = PROMPT + [10, 11, STOP, 13, 14, 15, 16, 17]
    r, inputs, _ = run_verify(50, truth=truth)
    # nothing is drafted after the stop token; the accepted stop token ends the output
    assert inputs == [PROMPT + M3, [10, 11, STOP] + M3 * 3]
    assert r.tokens == [10, 11, STOP] and r.chunks == [1, 2]
    assert (r.drafts_fed, r.drafts_accepted) == (2, 2)
    # the model's own correction is the stop token
    r, inputs, _ = run_verify(50, wrong={6}, truth=PROMPT + [10, 11, STOP, 13, 14])
    assert inputs == [PROMPT + M3, [10, 11, WRONG, 13] + M3 * 4]
    assert r.tokens == [10, 11, STOP] and (r.drafts_fed, r.drafts_accepted) == (3, 1)


@pytest.mark.parametrize("conf,threshold", [
    (lambda j: [0.99, 0.95, 0.6, 0.99][j], 0.9),            # the second draft is not confident enough
    (lambda j: [0.99, 0.95, float("nan"), 0.99][j], None),  # a non-finite confidence is never a draft
])
def test_verify_feeds_only_leading_usable_drafts(conf, threshold):
    r, inputs, cache_len = run_verify(6, conf=conf, draft_threshold=threshold)
    assert r.tokens == list(range(10, 16))
    assert inputs == [PROMPT + M3, [10, 11] + M3 * 2, [12, 13] + M3 * 2, [14] + M3]
    assert r.chunks == [1, 2, 2, 1]
    assert cache_len == [0, 4, 6, 8, 9]


def test_draft_rules():
    """A chain of drafts (one candidate per slot) stops at the first that may not be fed, and after a stop token."""
    conf, cand = [[0.9], [0.8], [0.7], [0.6]], [[5], [6], [7], [8]]
    rates = [[0.5]] * 4

    def drafts(conf=conf, cand=cand, threshold=None, limit=9, stops=()):
        usable, ends = draft_rules((conf, cand), MASK, threshold, set(stops))
        return [cand[d - 1][r] for _, d, r, _ in draft_tree(rates, 9, min(limit, len(cand)), usable, ends)]
    assert drafts(limit=3) == [5, 6, 7]
    assert drafts(threshold=0.75) == [5, 6]
    assert drafts(stops={6}) == [5, 6]
    assert drafts(cand=[[5], [MASK], [7]]) == [5]
    for bad in (float("nan"), float("inf")):
        assert drafts(conf=[[0.9], [bad], [0.9], [0.9]]) == [5]
    assert drafts(limit=0) == []


def test_draft_tree_takes_the_likeliest_paths():
    """Each node holds with the product of the rates along its path; the tree of n nodes is the n likeliest."""
    rates = [[0.6, 0.3], [0.5, 0.2], [0.9, 0.05]]
    tree = draft_tree(rates, 5, 3)
    # (parent, depth, rank, p): 0.6; 0.3; 0.6*0.5; 0.6*0.5*0.9; 0.3*0.5
    assert [(parent, depth, rank) for parent, depth, rank, _ in tree] == [(-1, 1, 0), (-1, 1, 1), (0, 2, 0), (2, 3, 0),
                                                                         (1, 2, 0)]
    assert [p for *_, p in tree] == pytest.approx([0.6, 0.3, 0.3, 0.27, 0.15])
    assert [d for _, d, _, _ in draft_tree(rates, 9, 1)] == [1, 1]  # depth 1 only
    # the ranks a pass shows are counted per position; an unseen rank starts at the position before's
    ranks = RankAcceptance(2, 2)
    for shown in ([0, 1], [1], [2], [0, 0]):
        ranks.record(shown)
    assert ranks.tries == [4, 2] and ranks.hits == [[2, 1], [1, 1]]
    first = [(2 + 2) / 6, (1 + 0) / 6]
    assert sum(ranks.rates(), []) == pytest.approx(first + [(1 + 2 * first[0]) / 4, (1 + 2 * first[1]) / 4])


# -----------------------------------------------------------------------------
# evaluation helpers and the command line

def test_extract_number_reads_every_gsm8k_gold_answer(fixtures):
    rows = read_jsonl(fixtures / "gsm8k" / "test.jsonl")
    for row in rows:
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_number(row["answer"]) == gold
    assert extract_number("so 3 + 4 = 7. The answer is 1,234.") == "1234"
    assert extract_number("no digits here") is None


def test_cli_json_and_eval(script, smollm2_gguf, tmp_path):
    r = script("decode.py", "--init", smollm2_gguf, "--prompt", "What is 2+2?", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == 8 and out["passes"] == 8 and out["acceleration"] == 1.0
    r = script("evaluate.py", "--init", smollm2_gguf, "--tasks", "gsm8k", "--limit", "1", "--max-new-tokens", "16",
               "--eval-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["problems"] == {"gsm8k": 1}
    rows = report["models"][0]["tasks"]["gsm8k"]
    assert set(rows) == {"k=1", "k=2", "ConfAdapt(0.9)", "reference k=1"}
    assert rows["k=1"]["text_agreement_with_k1"] == 1.0
    assert rows["k=2"]["acceleration"] == pytest.approx(2.0, abs=0.3)


def test_cli_verify_json_is_k1_output(script, smollm2_gguf):
    common = ["--init", smollm2_gguf, "--prompt", "Name three colors.", "--max-new-tokens", "16", "--json"]
    k1 = script("decode.py", *common)
    r = script("decode.py", *common, "--verify", "--k-max", "3")
    assert k1.returncode == 0 and r.returncode == 0, r.stderr
    k1, out = json.loads(k1.stdout), json.loads(r.stdout)
    assert out["tokens"] == k1["tokens"] and out["text"] == k1["text"]
    assert out["strategy"] == "verify(k_max 3)" and sum(out["chunks"]) == len(out["tokens"])
    assert 0 <= out["drafts_accepted"] <= out["drafts_fed"] and out["passes"] == len(out["chunks"])
    r = script("decode.py", *common[:-1], "--verify", "--k-max", "3")  # the stats line
    assert r.returncode == 0 and f"drafts accepted {out['drafts_accepted']}/{out['drafts_fed']}" in r.stderr
    assert "pass cost by rows fed" not in r.stderr  # --k-max given: the whole block of 3, every pass
    # packed weights are kept only where they win on this CPU; where they do, their memory is said
    said = [x for x in r.stderr.splitlines() if x.startswith("kernels: packed weights")]
    assert len(said) <= 1 and all(re.fullmatch(r"kernels: packed weights where they are the fastest kernel measured, "
                                               r"(oneDNN's for \d+ of \d+ products|MKL's for passes of [\d, ]+ rows)"
                                               r"( and MKL's for passes of [\d, ]+ rows)? \(\+\d+ MiB\)", x)
                                  for x in said), r.stderr
    sized = script("decode.py", *common, "--verify")  # the default: passes sized by their measured cost
    assert sized.returncode == 0 and "pass cost by rows fed: 1: " in sized.stderr, sized.stderr
    assert json.loads(sized.stdout)["tokens"] == k1["tokens"]


def test_cli_without_cpu_kernels_gives_the_same_tokens(script, smollm2_gguf):
    """--no-cpu-kernels keeps every layer the plain one model.py and lora.py define: the same tokens."""
    common = ["--init", smollm2_gguf, "--prompt", "Name three colors.", "--max-new-tokens", "12", "--json", "--verify"]
    fast, plain = script("decode.py", *common), script("decode.py", *common, "--no-cpu-kernels")
    assert fast.returncode == 0 and plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["tokens"] == json.loads(fast.stdout)["tokens"]
    assert "kernels:" not in plain.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "hi", "--threshold", "0"], "outside (0, 1]"),
    (["--prompt", "hi", "--threshold", "1.5"], "outside (0, 1]"),
    (["--prompt", "hi", "--k", "0"], "outside 1..k_max"),
    (["--prompt", "hi", "--k", "17"], "outside 1..k_max"),
    (["--init", "no-such-model", "--prompt", "hi"], "not a preset"),
    (["--prompt", "word " * 9000, "--no-chat"], "exceeds the model's context"),
    (["--prompt", "hi", "--verify", "--k", "2"], "takes no --k or --threshold"),
    (["--prompt", "hi", "--verify", "--threshold", "0.9"], "takes no --k or --threshold"),
    (["--prompt", "hi", "--verify", "--draft-threshold", "0"], "outside (0, 1]"),
    (["--prompt", "hi", "--verify", "--draft-threshold", "1.5"], "outside (0, 1]"),
    (["--prompt", "hi", "--verify", "--draft-threshold", "nan"], "outside (0, 1]"),
    (["--prompt", "hi", "--draft-threshold", "0.5"], "an option of --verify"),
    (["--prompt", "hi", "--tree", "2"], "--tree is an option of --verify"),
    (["--prompt", "hi", "--verify", "--tree", "0"], "--tree must be 1..8"),
    (["--prompt", "hi", "--verify", "--k-max", "1"], "needs --k-max >= 2"),
    (["--prompt", "hi", "--eval", "gsm8k"], "unrecognized arguments: --eval"),  # evaluate.py evaluates
])
def test_cli_bad_input(script, smollm2_gguf, args, message):
    if "--init" not in args:
        args = ["--init", str(smollm2_gguf), *args]
    r = script("decode.py", *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr

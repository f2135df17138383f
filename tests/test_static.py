"""Decode passes of fixed shapes (Transformer.decode_pass, support/static_passes.py): the same logits as
today's eager pass, pad rows that change nothing real, token for token the same decoding in every mode
(k=1, static k, ConfAdapt, --verify chain and tree, gated LoRA) on tiny models and the real SmolLM2,
and a pass that compiles whole and does not compile again."""
import pytest
import torch

from decode import branch_layout, generate
from lora import add_lora
from support.static_passes import ROW_BUCKETS, StaticPasses, cache_for
from support.weights import load_model

LOGITS_TOL, TIE = 1e-5, 1e-4
PROMPT = [5, 17, 42, 8, 99, 3, 61]


@pytest.fixture(params=[("llama", 4, 2), ("qwen3", 4, 1)], ids=["llama-gqa2", "qwen3-gqa4"])
def tiny(request, make_tiny, tmp_path):
    """A random 2-layer model of transformers' (grouped heads), ours loaded from it, with an <MTP> id."""
    family, heads, kv_heads = request.param
    _, path = make_tiny(tmp_path / family, family, vocab_size=300, head_dim=16, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, max_position_embeddings=512)
    model = load_model(str(path), add_mask=False)
    model.cfg.mask_id = 299
    return model


def filled_cache(model, n: int):
    cache = cache_for(model, None, 64)
    model(torch.tensor([PROMPT[:n]]), cache=cache)
    return cache


@torch.no_grad()
def test_a_static_pass_gives_the_eager_pass_logits(tiny):
    """A chain of 5 rows, and --verify's branch layout (a tree of drafts with masks after them), after a
    committed prefix: the logits of a fixed-shape pass over the whole cache equal those of the eager pass
    over the committed keys, and the committed keys and values are left as they were."""
    base = len(PROMPT)
    chain = torch.tensor([[7, 8, 9, 299, 299]])
    pos, mask = branch_layout(3, [1, 2], 2, base, "cpu", parents=[-1, 0, 0])
    tree = torch.tensor([[7, 8, 11, 299, 299, 299, 299]])
    for idx, p, m in ((chain, None, None), (tree, pos, mask)):
        eager_cache, static_cache = filled_cache(tiny, base), filled_cache(tiny, base)
        committed = static_cache.k[:, :, :, :base].clone()
        eager = tiny(idx, p, m, cache=eager_cache)[0]
        static = StaticPasses(tiny, static_cache)(idx, base, p, m)
        assert (eager - static).abs().max().item() <= LOGITS_TOL
        assert torch.equal(static_cache.k[:, :, :, :base], committed)


@torch.no_grad()
def test_pad_rows_change_no_real_row(tiny):
    """3 rows run padded to 4 with a fourth row of any token: the real rows' logits and keys are those of a
    pass of 3 rows (to rounding: a product of 4 rows may round otherwise), the pad row's keys and values
    go to the scratch slot only, and the committed ones stay as they were, bit for bit."""
    base, idx = len(PROMPT), torch.tensor([[7, 8, 299]])
    caches = [filled_cache(tiny, base) for _ in range(2)]
    at = torch.arange(base, base + 3)
    slots = torch.arange(caches[0].max_len)
    alone = tiny.decode_pass(idx, at, at, slots[None] <= at[:, None], caches[0])[0]
    at4 = torch.cat([at, torch.tensor([caches[1].max_len - 1])])
    padded = tiny.decode_pass(torch.cat([idx, torch.tensor([[123]])], 1), at4, at4, slots[None] <= at4[:, None], caches[1])[0]
    assert (alone - padded[:3]).abs().max().item() <= LOGITS_TOL
    for name in ("k", "v"):
        alone_kv, padded_kv = getattr(caches[0], name), getattr(caches[1], name)
        assert torch.equal(alone_kv[:, :, :, :base], padded_kv[:, :, :, :base])  # the committed ones: untouched
        assert (alone_kv[:, :, :, base:-1] - padded_kv[:, :, :, base:-1]).abs().max().item() <= LOGITS_TOL
    assert 4 in ROW_BUCKETS


def first_difference(model, prompt, a, b):
    """The first position where two decodings differ, and the top-2 margin of the model's probabilities
    there: a static and an eager pass may part only where two candidates tie within rounding."""
    d = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
    with torch.no_grad():
        probs = model(torch.tensor([prompt + a[:d]]))[0, -1].softmax(-1)
    top = probs.topk(2).values
    return d, (top[0] - top[1]).item()


MODES = {"k=1": dict(k=1), "static k=3": dict(k=3, k_max=4), "ConfAdapt(0.3)": dict(threshold=0.3, k_max=6),
         "ConfAdapt(0.0)": dict(threshold=0.0, k_max=6), "verify chain": dict(verify=True, k_max=4),
         "verify tree 2": dict(verify=True, k_max=4, tree=2), "verify simple": dict(verify=True, k_max=4, layout="simple")}


def assert_same_decoding(model, prompt, max_new, stop_ids=(), modes=MODES) -> dict:
    """Each mode decoded with static and with eager passes: the same tokens (and passes), unless they
    part where two candidates tie within rounding. Returns the static results by mode."""
    results = {}
    for name, mode in modes.items():
        eager = generate(model, prompt, max_new, stop_ids=stop_ids, static=False, **mode)
        static = results[name] = generate(model, prompt, max_new, stop_ids=stop_ids, static=True, **mode)
        if eager.tokens != static.tokens:
            d, margin = first_difference(model, prompt, eager.tokens, static.tokens)
            print(f"{name}: static and eager part at new token {d}, where the top-2 margin is {margin:.2e}")
            assert margin < TIE, f"{name}: static and eager part at token {d} (top-2 margin {margin:.2e})"
        else:
            assert eager.chunks == static.chunks, name
    return results


def test_static_decoding_is_eager_decoding_token_for_token(tiny):
    assert_same_decoding(tiny, PROMPT, 24)


def test_static_decoding_under_gated_lora(tiny):
    """Gated LoRA with non-zero adapters: in a static pass the gate is a factor on every row, decided on
    no value, and a pass without <MTP> rows adds an exact zero: k=1 stays the original."""
    original = generate(tiny, PROMPT, 16, static=False).tokens
    add_lora(tiny, 4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in tiny.named_parameters():
            if "lora_b" in name or "mask_embedding" in name:
                p.normal_(0, 0.5)
    assert generate(tiny, PROMPT, 16, static=True).tokens == original
    assert_same_decoding(tiny, PROMPT, 16)


@pytest.mark.slow
def test_static_decoding_on_smollm2(smollm2):
    """The real SmolLM2 (float32, its <MTP> row untrained) on a prompt where some of its drafts hold, so
    that --verify keeps drafts, and the cache's kept path, in static passes too."""
    tok = smollm2.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Count from 1 to 30, separated by commas."}])
    modes = {name: MODES[name] for name in ("k=1", "static k=3", "ConfAdapt(0.3)", "verify chain", "verify tree 2")}
    results = assert_same_decoding(smollm2, prompt, 20, stop_ids=tok.stop_ids, modes=modes)
    assert results["verify chain"].drafts_accepted and results["verify tree 2"].drafts_accepted


@torch.no_grad()
def test_the_pass_compiles_whole(tiny):
    """fullgraph=True with the aot_eager backend: a graph break anywhere in the pass is an error; the
    compiled pass gives the eager one's logits."""
    torch._dynamo.reset()
    base, idx = len(PROMPT), torch.tensor([[3, 299, 299, 299]])
    caches = [filled_cache(tiny, base) for _ in range(2)]
    compiled = StaticPasses(tiny, caches[0], compile_options={"backend": "aot_eager"})(idx, base)
    eager = StaticPasses(tiny, caches[1])(idx, base)
    assert (compiled - eager).abs().max().item() <= LOGITS_TOL


class CompiledOnce(StaticPasses):
    """StaticPasses compiled by inductor, where every pass after the first must run without compiling."""
    calls = 0

    def __init__(self, model, cache):
        super().__init__(model, cache, compile_options={"backend": "inductor"})

    def __call__(self, *args):
        CompiledOnce.calls += 1
        if CompiledOnce.calls == 1:
            return super().__call__(*args)
        with torch.compiler.set_stance("fail_on_recompile"):
            return super().__call__(*args)


@pytest.mark.slow
def test_one_bucket_compiled_with_inductor_does_not_compile_again(tiny, monkeypatch):
    """Static k=4: every pass after the prompt's feeds 4 tokens and 3 masks, the bucket of 8 rows,
    compiled by inductor on the CPU. The tokens are the eager ones, no pass compiles again, and a second
    decode of the same model reuses the graph and its cache (support.static_passes.static_passes)."""
    torch._dynamo.reset()
    eager = generate(tiny, PROMPT, 24, k=4, k_max=4, static=False)
    monkeypatch.setattr("support.static_passes.StaticPasses", CompiledOnce)
    monkeypatch.setattr(CompiledOnce, "calls", 0)
    static = generate(tiny, PROMPT, 24, k=4, k_max=4, static=True)
    assert CompiledOnce.calls == static.passes - 1 >= 5
    if static.tokens != eager.tokens:
        d, margin = first_difference(tiny, PROMPT, eager.tokens, static.tokens)
        assert margin < TIE, f"compiled and eager part at token {d} (top-2 margin {margin:.2e})"
    with torch.compiler.set_stance("fail_on_recompile"):
        assert generate(tiny, PROMPT[:5], 16, k=4, k_max=4, static=True).tokens


@torch.no_grad()
def test_own_answers_in_fixed_batches_are_the_eager_ones(tiny):
    """data.own_answers.generate_batch through BatchedSteps (one token per row over a cache of fixed size,
    the batch padded to a fixed size: what a GPU captures once for every step of every batch) gives the
    eager batch's answers, for a full batch and a short one, eager and compiled whole (aot_eager)."""
    from data.own_answers import generate_batch
    from support.static_passes import BatchedSteps
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 299, (4, 6), generator=g).tolist()
    for options in (None, {"backend": "aot_eager"}):
        steps = BatchedSteps(tiny, 4, 64, compile_options=options)
        for batch in (prompts, prompts[1:3]):
            eager = generate_batch(tiny, batch, 12, stop_ids=(7,))
            assert generate_batch(tiny, batch, 12, stop_ids=(7,), steps=steps) == eager and len(eager) == len(batch)

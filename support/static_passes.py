"""Decode passes of fixed shapes (Transformer.decode_pass), padded to a few row counts and captured on
CUDA: on a GPU every pass of decode.generate after the prompt's runs this way. The eager passes of
decode.py are the reference; these give the same tokens (tests/test_static.py)."""
import torch


def uses_static_passes(model, static: bool | None) -> bool:
    """static None: on a GPU, unless the model is sharded (FSDP: its weights are gathered pass by pass)."""
    weight = model.embed_tokens.weight
    return weight.is_cuda and type(weight).__name__ != "DTensor" if static is None else static


def cache_for(model, cache, need: int):
    """A KV cache of at least `need` positions and a scratch slot (StaticPasses), emptied."""
    if cache is None or cache.max_len < need + 1:
        cache = model.new_cache(need + 1)
    cache.truncate(0)
    return cache


def decode_cache(model, cache, need: int, static: bool | None):
    """(the model's StaticPasses and their cache, on a GPU; None and a cache of its own, on a CPU)."""
    if uses_static_passes(model, static):
        passes = static_passes(model, need)
        return passes, passes.cache
    return None, cache_for(model, cache, need)


def static_passes(model, need: int) -> "StaticPasses":
    """The model's StaticPasses, over a cache of at least `need` positions and the scratch slot, emptied.
    One per model, kept on it between decodes, as gpt-fast sets its caches up once: a captured graph reads
    and writes the cache at fixed addresses, so a new cache would mean new graphs. A decode that needs
    more room gets a cache of the next power of two positions (and its graphs are captured anew)."""
    passes = getattr(model, "static_passes", None)
    if passes is None or passes.cache.max_len < need + 1:
        passes = model.static_passes = StaticPasses(model, model.new_cache(max(256, 1 << need.bit_length())))
    passes.cache.truncate(0)
    return passes


ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # a pass runs padded to the next of these row counts


def captured_decode_pass(model, cache, compile_options: dict | None, graphs: int):
    """model.decode_pass over this cache, compiled with compile_options (default: on CUDA, CUDA graphs by
    torch.compile's mode reduce-overhead; on a CPU, none: the eager pass), for up to `graphs` shapes."""
    if compile_options is None and cache.k.is_cuda:
        compile_options = {"mode": "reduce-overhead"}
    if compile_options is None:
        return model.decode_pass
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * graphs)
    for t in (cache.k, cache.v, *cache.rope):  # written and read in place: no copies into the graph
        torch._dynamo.mark_static_address(t)
    return torch.compile(model.decode_pass, fullgraph=True, dynamic=False, **compile_options)


class StaticPasses:
    """Decode passes of fixed shapes (Transformer.decode_pass), captured on CUDA. A pass of T rows runs
    padded to the next bucket of rows; its keys and values go to the cache slots after the committed
    ones, and each row sees the committed slots and what the pass's layout lets it see (a chain: the
    rows up to itself). The pad rows write to the cache's last slot, which no real row sees, so they
    change no real row's logits. On CUDA each bucket's pass is compiled with CUDA graphs
    (torch.compile, mode reduce-overhead) on first use and then replayed: a pass is one launch,
    not the hundreds of kernels Python would launch one by one."""

    def __init__(self, model, cache, compile_options: dict | None = None):
        """compile_options: torch.compile's (default: on CUDA, mode reduce-overhead; on a CPU, none)."""
        self.model, self.cache = model, cache
        self.slots = torch.arange(cache.max_len, device=cache.k.device)
        self.scratch = cache.max_len - 1
        self.run = captured_decode_pass(model, cache, compile_options, graphs=len(ROW_BUCKETS))

    def __call__(self, idx, base: int, pos=None, mask=None):
        """Logits (T, vocab) of idx (1, T) fed after `base` committed slots; pos (T,) and mask (T, base + T)
        as Transformer.forward takes them (None: a causal chain)."""
        T = idx.size(1)
        R = next((b for b in ROW_BUCKETS if b >= T), T)
        at = torch.full((R,), self.scratch, device=idx.device)
        at[:T] = torch.arange(base, base + T, device=idx.device)
        if mask is None:  # a chain: each row sees the slots up to its own
            pos, sees = at, self.slots[None] <= at[:, None]
        else:
            pos = torch.cat([pos, at[T:]])
            sees = (self.slots < base).repeat(R, 1)
            sees[:T, base:base + T] = mask[:, base:]
            sees[T:, self.scratch] = True
        padded = torch.cat([idx, idx[:, :1].expand(1, R - T)], 1)
        return self.run(padded, pos, at, sees, self.cache)[0, :T]


class BatchedSteps:
    """Greedy steps of a fixed batch of rows at one position (the model's own answers, data/own_answers.py:
    prompts of one length), each a Transformer.decode_pass of one token per row over a cache of fixed
    size, captured on CUDA: every step of every batch replays the same graph. A batch of fewer prompts
    runs padded with copies of its first."""

    def __init__(self, model, batch: int, max_len: int, compile_options: dict | None = None):
        self.model, self.batch = model, batch
        self.cache = model.new_cache(max_len, batch)
        self.slots = torch.arange(max_len, device=self.cache.k.device)
        self.run = captured_decode_pass(model, self.cache, compile_options, graphs=1)

    def prefill(self, idx):
        """Logits (batch, vocab) after the prompts idx (batch, T), their keys and values from slot 0 on."""
        self.cache.truncate(0)
        return self.model.output(self.model.hidden(idx, cache=self.cache)[:, -1])

    def __call__(self, tokens, position: int):
        """Logits (batch, vocab) after tokens (batch,), fed at `position` (every slot before it committed)."""
        at = torch.full((1,), position, device=tokens.device)
        return self.run(tokens[:, None], at, at, self.slots[None] <= at[:, None], self.cache)[:, 0]

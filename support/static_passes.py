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
        self.run = model.decode_pass
        if compile_options is None and cache.k.is_cuda:
            compile_options = {"mode": "reduce-overhead"}
        if compile_options is not None:  # one graph per bucket: as many compilations as buckets
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(ROW_BUCKETS))
            for t in (cache.k, cache.v, *cache.rope):  # written and read in place: no copies into the graph
                torch._dynamo.mark_static_address(t)
            self.run = torch.compile(model.decode_pass, fullgraph=True, dynamic=False, **compile_options)

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

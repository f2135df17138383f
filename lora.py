"""Gated LoRA (docs/METHOD.md, "Gated LoRA"; Samragh et al. 2025, "Your LLM Knows the Future").

add_lora(model, rank) freezes every weight and swaps in two kinds of module:
- the embedding becomes MaskEmbedding: a row whose input token is <MTP> gets a trainable
  embedding, and MaskEmbedding.gate says which rows those are (the gate, which the model passes down
  to every projection with the activations);
- each projection of each block becomes GatedLoRALinear: the original linear, plus a rank-r update
  (alpha / r) * B @ A that is added on the gated rows only.
A real token's row therefore computes exactly what the original model computes: k=1 decoding is
the original model, and the model is its own teacher (distill.SharedGroundTruth). B starts at zero.
"""
import math

import torch
import torch.nn as nn


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class MaskEmbedding(nn.Embedding):
    def __init__(self, embed: nn.Embedding, mask_id: int):
        super().__init__(*embed.weight.shape, device="meta")
        self.weight = embed.weight  # the same (frozen) parameter: a tied lm_head stays tied
        self.mask_id = mask_id
        self.mask_embedding = nn.Parameter(embed.weight[mask_id].detach().clone())

    def forward(self, idx):
        x = super().forward(idx)
        return torch.where((idx == self.mask_id)[..., None], self.mask_embedding.to(x.dtype), x)

    def gate(self, idx, dtype, decided_on_values: bool = True):
        """Which rows of idx are <MTP> rows, as every projection is told (model.Linear): None (none: the
        ground truth and the teacher in training), True (all: training's branch passes) or a (..., 1)
        factor, 1.0 on those rows and 0.0 elsewhere, in dtype (a decode pass). decided_on_values=False:
        always the factor, which reads no value on the host (a captured pass, support/static_passes.py)."""
        is_mask = (idx == self.mask_id)[..., None]
        if not decided_on_values:
            return is_mask.to(dtype)
        return True if is_mask.all() else is_mask.to(dtype) if is_mask.any() else None


class GatedLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.randn(rank, w.size(1), device=w.device, dtype=w.dtype) / math.sqrt(w.size(1)))
        self.lora_b = nn.Parameter(torch.zeros(w.size(0), rank, device=w.device, dtype=w.dtype))

    def forward(self, x, gate):
        y = self.base(x)
        if gate is None:  # no <MTP> row: the adapter math is skipped altogether
            return y
        if gate is True:
            return y + (x @ self.lora_a.t() * self.scale) @ self.lora_b.t()
        # some rows are <MTP> rows (a decode pass): the update, zeroed on the real tokens' rows, in one fused
        # product (a pass runs 7 of these per block)
        h = (x @ self.lora_a.t()) * gate
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), self.lora_b.t(), alpha=self.scale).view_as(y)


def add_lora(model, rank: int, alpha: float | None = None, base: str | None = None, layers: int | None = None):
    """Freeze model and give it gated adapters of this rank, in its top `layers` blocks (None: all).
    base: where its original weights are loaded from, saved with the adapter (weights.save_model)."""
    alpha = float(rank if alpha is None else alpha)
    layers = len(model.layers) if layers is None else layers
    model.requires_grad_(False)
    model.embed_tokens = MaskEmbedding(model.embed_tokens, model.cfg.mask_id)
    if layers < len(model.layers):  # a fixed <MTP> embedding: backward stops at the lowest adapter
        model.embed_tokens.mask_embedding.requires_grad_(False)
    for block in model.layers[len(model.layers) - layers:]:
        for path in PROJECTIONS:
            parent, name = path.split(".")
            module = getattr(block, parent)
            setattr(module, name, GatedLoRALinear(getattr(module, name), rank, alpha))
    model.lora = {"base": base, "rank": rank, "alpha": alpha, "layers": layers}
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """What gated LoRA trains, under the names of its saved file: every lora_a / lora_b, and
    mask_embedding (empty for a model without adapters)."""
    if getattr(model, "lora", None) is None:
        return {}
    state = {"mask_embedding": model.embed_tokens.mask_embedding}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            state[name] = p
    return state


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name or name.endswith("mask_embedding")

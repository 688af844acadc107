"""Attention for a continuous batch on the CPU: one SDPA call per sequence.

transformers' continuous batching lays every sequence of a step end to end in one row
(queries ``(1, H, Tq, D)``, keys and values ``(1, H, Tk, D)``, boundaries in ``cu_seq_lens_q``
and ``cu_seq_lens_k``). Without flash attention it runs one SDPA over the whole row with a
block-diagonal mask, so each query is scored against every sequence's keys: at 32 decoding
sequences of ~100 tokens that is 32 x the work, and it was ~40% of a step on 2 CPU cores.
Attending per sequence does only the useful part. Registered with transformers'
``AttentionInterface`` as ``loom_varlen_sdpa``.

    register_varlen_attention()
    model.set_attn_implementation(VARLEN_ATTENTION)   # after the batching manager is built
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

VARLEN_ATTENTION = "loom_varlen_sdpa"


def _bounds(value: torch.Tensor | dict[str, torch.Tensor], layer_type: str) -> list[int]:
    if isinstance(value, dict):  # keys: one set of boundaries per attention type
        value = value[layer_type] if layer_type in value else next(iter(value.values()))
    bounds: list[int] = value.tolist()  # a 1-D int tensor: [0, 12, 20, ...]
    return bounds


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,  # transformers passes its own per-call arguments (cu_seq_lens_q, ...)
) -> tuple[torch.Tensor, None]:
    """(1, H, Tq, D) queries over per-sequence keys -> (1, Tq, H, D), like transformers' SDPA."""
    if "cu_seq_lens_q" not in kwargs:  # not a continuous batch: plain causal attention
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    layer_type = getattr(module, "attention_type", "full_attention")
    bounds_q = kwargs["cu_seq_lens_q"].tolist()
    bounds_k = _bounds(kwargs["cu_seq_lens_k"], layer_type)
    gqa = key.shape[1] != query.shape[1]
    out = torch.zeros_like(query)  # padded query slots, if any, stay zero
    for s in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[s], bounds_q[s + 1], bounds_k[s], bounds_k[s + 1]
        n_q, n_k = q1 - q0, k1 - k0
        if n_q == 0:
            continue
        mask = None
        if 1 < n_q < n_k:  # a prompt chunk after cached tokens: causal, aligned bottom-right
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril(n_k - n_q)
        out[:, :, q0:q1] = F.scaled_dot_product_attention(
            query[:, :, q0:q1],
            key[:, :, k0:k1],
            value[:, :, k0:k1],
            attn_mask=mask,
            is_causal=n_q > 1 and n_q == n_k,  # a whole prompt: plain causal
            scale=scaling,
            enable_gqa=gqa,
        )
    return out.transpose(1, 2).contiguous(), None


def register_varlen_attention() -> None:
    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)

"""Per-sequence attention over a continuous batch equals one masked attention over it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.engines.varlen_attention import varlen_sdpa_attention


def block_causal_mask(lengths: list[tuple[int, int]]) -> torch.Tensor:
    """The mask transformers builds: each query sees its own sequence's keys up to itself."""
    total_q, total_k = sum(q for q, _ in lengths), sum(k for _, k in lengths)
    mask = torch.zeros(total_q, total_k, dtype=torch.bool)
    q0 = k0 = 0
    for n_q, n_k in lengths:
        mask[q0 : q0 + n_q, k0 : k0 + n_k] = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        q0, k0 = q0 + n_q, k0 + n_k
    return mask


def test_per_sequence_attention_equals_the_block_masked_batch():
    # a decoding sequence (1 new of 5), a fresh prompt (3 of 3), a prompt chunk after cache (2 of 6)
    lengths = [(1, 5), (3, 3), (2, 6)]
    torch.manual_seed(0)
    heads, dim = 2, 8
    q = torch.randn(1, heads, sum(n for n, _ in lengths), dim)
    k = torch.randn(1, heads, sum(n for _, n in lengths), dim)
    v = torch.randn_like(k)
    cu_q = torch.tensor([0, 1, 4, 6])
    cu_k = {"full_attention": torch.tensor([0, 5, 8, 14])}
    ours, _ = varlen_sdpa_attention(
        torch.nn.Module(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k
    )
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=block_causal_mask(lengths), scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(ours, expected)

"""Attention over retrieved memory, and the local causal log-sum-exp it is weighed against.

Shared by the side network's memory reader and by backbone memory (both mix a
position-free softmax over retrieved keys with the layer's own causal softmax).
"""

from __future__ import annotations

import math

import torch


def attend_retrieved(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """Position-free attention of `q [B, T, H, D]` over retrieved `keys, values [B, T, H, S,
    D]` (`mask [B, T, H, S]`: real slots) -> `a_mem [B, T, H, D]`, its log-sum-exp `[B, T,
    H, 1]` (0 where nothing was found) and `has [B, T, H, 1]` (something was found)."""
    scores = torch.einsum("bthd,bthsd->bths", q, keys) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    has = mask.any(-1, keepdim=True)
    lse = torch.logsumexp(scores, -1, keepdim=True).masked_fill(~has, 0.0)
    p = torch.where(has, torch.exp(scores - lse), 0.0)
    return torch.einsum("bths,bthsd->bthd", p, values), lse, has


def per_query(key_mask: torch.Tensor) -> torch.Tensor:
    """A key mask `[B, S]` (the same keys for every new token) or `[B, T, S]` (its own for
    each; rows fed several tokens at once, inference/ragged.py) -> `[B, T or 1, S]`."""
    return key_mask if key_mask.dim() == 3 else key_mask[:, None]


_LSE_BLOCK = 256  # queries scored at a time by causal_lse


def causal_lse(qr: torch.Tensor, kr: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log-sum-exp `[B, T, H, 1]` of local causal scores: rotated queries `qr [B, T, H, D]` at
    positions P..P+T-1 of the window against its rotated keys `kr [B, P+T, G, D]` (P > 0
    during incremental decoding, where earlier keys are cached). `key_mask [B, P+T]` or
    `[B, T, P+T]` bool: which keys are real (rows of different lengths, padded)."""
    B, T, H, D = qr.shape
    G, P = kr.shape[2], kr.shape[1] - T
    # query head h reads kv head h // (H // G): score each kv head's queries together
    # instead of repeating its keys H // G times
    r = H // G
    q = qr.reshape(B, T, G, r, D).permute(0, 2, 3, 1, 4)  # [B, G, r, T, D]
    kt = kr.permute(0, 2, 3, 1)  # [B, G, D, P+T]
    mask = None if key_mask is None else per_query(key_mask)[:, None, None]  # [B, 1, 1, T or 1, P+T]
    # a block of queries scores only the keys it can see: a whole segment's causal half
    # is never computed, and its [T, P+T] scores are never all alive at once
    parts = []
    for t0 in range(0, T, _LSE_BLOCK):
        t1 = min(t0 + _LSE_BLOCK, T)
        qb = q[:, :, :, t0:t1].reshape(B, G, r * (t1 - t0), D)  # one product per kv head
        s = (qb @ kt[..., :P + t1] / math.sqrt(D)).view(B, G, r, t1 - t0, P + t1)
        see = None
        if t1 - t0 > 1:  # one query sees every key up to its own
            see = torch.ones(t1 - t0, P + t1, dtype=torch.bool, device=qr.device).tril(P + t0)
        if mask is not None:
            m = mask[..., :P + t1] if mask.shape[-2] == 1 else mask[..., t0:t1, :P + t1]
            see = m if see is None else see & m
        parts.append(torch.logsumexp(s if see is None else s.masked_fill_(~see, float("-inf")), -1))
    lse = torch.cat(parts, -1)  # [B, G, H // G, T]
    return lse.reshape(B, H, T).transpose(1, 2).unsqueeze(-1)

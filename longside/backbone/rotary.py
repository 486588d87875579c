"""Rotary position embedding in the rotate-half layout, shared by the backbone's lean decode
step and the side network."""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout (Llama, Gemma): `x [..., D]` with `cos`,
    `sin` broadcastable to it (e.g. `[B, T, 1, D]` for `x [B, T, H, D]`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

"""Shared fixtures. The real SmolLM2 backbone is loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M backbone as users get it (its GGUF's own Q4_1/Q8_0 blocks),
    with exact fp32 activations in the decode kernels, so that incremental decoding equals
    whole segments to fp32 rounding in the behaviour tests (the int8 decode path has its
    own tests: test_kernels_ggml, test_backbone)."""
    from longside.backbone import load_backbone
    from longside.kernels.gguf_linear import set_activations

    bb = load_backbone("smollm2-135m")
    set_activations(bb.model, "fp32")
    return bb

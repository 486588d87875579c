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


@pytest.fixture
def int8_activations(smollm2):
    """For one test, the suite's backbone on the int8 products that `longside serve` and
    `longside chat` decode with (as loaded); each layer's own setting is put back after."""
    from longside.kernels.gguf_linear import GGUFLinear, set_activations

    layers = [m for m in smollm2.model.modules() if isinstance(m, GGUFLinear)]
    saved = [(m.activations, m.int8_max_m) for m in layers]
    set_activations(smollm2.model, "int8")
    try:
        yield smollm2
    finally:
        for m, (activations, int8_max_m) in zip(layers, saved):
            m.activations, m.int8_max_m = activations, int8_max_m

"""Shared fixtures. The real SmolLM2 backbone is loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M backbone (dense fp32), converted once and cached."""
    from longside.backbone import load_backbone

    return load_backbone("smollm2-135m")

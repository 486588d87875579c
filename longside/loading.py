"""`load_model`: the one way the CLIs, demo and benchmark get a `LongSideModel`."""

from __future__ import annotations

import os
from pathlib import Path

from longside.errors import CheckpointError


def load_model(path: str | os.PathLike | None = None, *, quantize: str | None = None,
               backbone: str = "smollm2-135m", **config) -> tuple["LongSideModel", str]:  # noqa: F821
    """A model and a one-line note saying which one it is.

    path: a checkpoint directory (`LongSideModel.save_pretrained`). None: the checkpoint
    shipped with longside if present, else an untrained side network on `backbone`
    (its logits equal the backbone's until trained; the note says so). `config` overrides
    `SideNetConfig` fields of the untrained model (e.g. `window=256`).
    """
    from longside.backbone import load_backbone
    from longside.config import SideNetConfig
    from longside.model import SHIPPED_CHECKPOINT, LongSideModel

    # The side network is built (pruned) from full-precision weights, then the backbone is
    # quantized: pruning reads weights that a QuantLinear does not expose as `.weight`.
    if path is not None:
        if not Path(path).is_dir():
            raise CheckpointError(f"no checkpoint directory at {path}; pass one saved by "
                                  "LongSideModel.save_pretrained, or omit --model")
        model, note = LongSideModel.from_pretrained(path), f"checkpoint {path}"
    elif (SHIPPED_CHECKPOINT / "side_config.json").exists():
        model, note = LongSideModel.from_pretrained(), f"shipped checkpoint {SHIPPED_CHECKPOINT.name}"
    else:
        model = LongSideModel(load_backbone(backbone), SideNetConfig(**config))
        note = (f"UNTRAINED side network on {backbone} (no checkpoint shipped yet): its output equals "
                "the bare backbone's; memory cannot change it until the side network is trained")
    if quantize:
        quantize_backbone(model.backbone, quantize)
        note += f", {quantize} backbone"
    return model, note


def quantize_backbone(backbone, kind: str = "nf4", progress: bool = False) -> dict:
    """Swap the backbone's decoder linear layers for 4-bit `QuantLinear`s, in place."""
    if kind != "nf4":
        raise CheckpointError(f"unknown quantization {kind!r}; longside supports 'nf4'")
    from longside.kernels import quantize_model

    backbone.quantization = quantize_model(backbone.model, progress=progress)
    return backbone.quantization

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
    from longside.backbone import load_backbone, quantize_backbone
    from longside.config import SideNetConfig
    from longside.model import SHIPPED_CHECKPOINT, LongSideModel

    # The side network is built (pruned) from full-precision weights, then the backbone is
    # quantized, so an untrained model's pruned init does not depend on the quantization.
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

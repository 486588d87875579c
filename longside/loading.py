"""`load_model`: the one way the CLIs, evaluations, benchmarks and examples get a model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from longside.backbone import Backbone, load_backbone, quantize_backbone
from longside.config import SideNetConfig
from longside.errors import CheckpointError
from longside.model import SHIPPED_CHECKPOINT, LongSideModel, state_hash


def load_model(path: str | os.PathLike | None = None, *, backbone: Backbone | str | None = None,
               quantize: str | None = None, **config) -> tuple[LongSideModel, dict]:
    """`(model, info)`, the model in eval mode.

    path: a checkpoint directory (`LongSideModel.save_pretrained`). None: the checkpoint
    shipped with longside if present, else an untrained side network on `backbone`
    (default SmolLM2-135M; its logits equal the backbone's until trained). `backbone`: a
    loaded `Backbone` or a name. `config` overrides `SideNetConfig` fields of an untrained
    model (e.g. `window=256`). `quantize`: the backbone's weights (`load_backbone`: None =
    a GGUF's own 4-bit blocks, "fp32", "nf4"); "nf4" swaps the linear layers after the side
    network is built, so an untrained model's pruned init does not depend on it (native
    blocks decode exactly to the fp32 weights, so neither does that one's).

    info: `note` (one line saying which model this is: a report or a terminal can never
    mistake an untrained model for the trained one), `checkpoint`, `trained`,
    `side_state_hash`, `side_config`, `backbone`, `backbone_fingerprint`, `quantize`.
    """
    if path is not None:
        if not Path(path).is_dir():
            raise CheckpointError(f"no checkpoint directory at {path}; pass one saved by "
                                  "LongSideModel.save_pretrained, or omit --model")
        checkpoint, note = Path(path), f"checkpoint {path}"
    elif (SHIPPED_CHECKPOINT / "side_config.json").exists():
        checkpoint, note = SHIPPED_CHECKPOINT, f"shipped checkpoint {SHIPPED_CHECKPOINT.name}"
    else:
        checkpoint = None
    first = "fp32" if quantize == "nf4" else quantize
    if checkpoint is not None:
        model = LongSideModel.from_pretrained(checkpoint, backbone=backbone, quantize=first)
    else:
        bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone or "smollm2-135m", quantize=first)
        model = LongSideModel(bb, SideNetConfig(**config))
        note = (f"UNTRAINED side network on {bb.name} (no checkpoint shipped): its output equals the bare "
                "backbone's; memory cannot change it until the side network is trained; these numbers are "
                "baselines, not longside's")
    if quantize == "nf4":
        quantize_backbone(model.backbone, quantize)
    kind = (model.backbone.quantization or {}).get("kind", "fp32")
    note += f", {kind} backbone"
    model.eval()
    return model, model_info(model, checkpoint, note, kind)


def model_info(model: LongSideModel, checkpoint: str | os.PathLike | None, note: str | None = None,
               quantize: str | None = None) -> dict:
    """Identifiers of a model for a report: checkpoint, side-weight hash, backbone (and its
    weights: "native", "fp32" or "nf4"; read from the backbone when not given)."""
    quantize = quantize or (model.backbone.quantization or {}).get("kind", "fp32")
    return {"checkpoint": str(checkpoint) if checkpoint is not None else None,
            "trained": checkpoint is not None,
            "side_state_hash": state_hash(model),
            "side_config": dataclasses.asdict(model.config),
            "backbone": model.backbone.name,
            "backbone_fingerprint": model.backbone.fingerprint,
            "quantize": quantize,
            "note": note}

"""`QuantLinear` (an NF4 drop-in for nn.Linear), `quantize_model` that swaps a model's
linear layers in place, and `save_quantized` / `load_quantized` so quantization runs once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from longside.kernels.nf4 import NF4Weight, quantize_nf4
from longside.kernels.ops import dequantize, matmul_nf4
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from longside.errors import CheckpointError, LongsideError
from longside.paths import atomic_dir

DEFAULT_SKIP = ("lm_head", "embed_tokens", "embed_positions", "wte", "wpe")
_CONFIG_FILE = "quantization.json"
_WEIGHTS_FILE = "model.safetensors"


class _MatmulNF4(torch.autograd.Function):
    """y = x @ W.T with W frozen: gradient w.r.t. x only (dx = dy @ W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: NF4Weight, absmax: torch.Tensor) -> torch.Tensor:
        ctx.qweight, ctx.absmax = qweight, absmax
        return matmul_nf4(x, qweight, absmax)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = dequantize(ctx.qweight, ctx.absmax).to(grad_out.device, grad_out.dtype)
        return grad_out @ w, None, None


class QuantLinear(nn.Module):
    """A frozen linear layer with an NF4 weight (bitsandbytes layout).

    Buffers (saved by `state_dict`): `qweight` uint8 `[(N*K+1)//2, 1]`, `absmax` float32
    `[n_blocks]` (uint8 when double-quantized, with `absmax_code`, `absmax_scale`,
    `absmax_offset`). Double-quantized layers keep a decoded float32 copy of the absmax
    (non-persistent) for the kernels. `bias` stays in float32. Input `[..., K]` -> `[..., N]`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, blocksize: int = 64,
                 double_quant: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        n_el = in_features * out_features
        n_blocks = -(-n_el // blocksize)
        self.register_buffer("qweight", torch.zeros((n_el + 1) // 2, 1, dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8 if double_quant else torch.float32))
        if double_quant:
            self.register_buffer("absmax_code", torch.zeros(256))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // 256)))
            self.register_buffer("absmax_offset", torch.zeros(()))
            self.register_buffer("absmax_fp32", torch.zeros(n_blocks), persistent=False)
            self.register_load_state_dict_post_hook(lambda module, _keys: module._decode_absmax())
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> "QuantLinear":
        """Quantize an nn.Linear (its weight must be on the CPU or a CUDA device)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant)
        q.load_nf4(quantize_nf4(linear.weight.detach(), blocksize, double_quant))
        if linear.bias is not None:
            q.bias.data = linear.bias.detach().float().clone()
        return q.to(linear.weight.device)

    def load_nf4(self, w: NF4Weight) -> None:
        """Take over the packed weight and statistics of `w` (shapes must match)."""
        if w.shape != (self.out_features, self.in_features) or w.double_quant != self.double_quant:
            raise LongsideError(f"NF4 weight {w.shape} (double_quant={w.double_quant}) does not fit "
                                f"QuantLinear({self.in_features}, {self.out_features}, double_quant={self.double_quant})")
        self.qweight = w.packed.reshape(-1, 1).to(self.qweight.device)
        self.absmax = w.absmax.to(self.qweight.device)
        if self.double_quant:
            self.absmax_code, self.absmax_scale = w.absmax_code.clone(), w.absmax_scale.clone()
            self.absmax_offset = w.absmax_offset.clone().reshape(())
            self._decode_absmax()

    def _decode_absmax(self) -> None:
        self.absmax_fp32 = self.nf4_weight().absmax_f32().to(self.absmax.device)

    def nf4_weight(self) -> NF4Weight:
        """The weight as an `NF4Weight` (views of the buffers)."""
        shape = (self.out_features, self.in_features)
        if not self.double_quant:
            return NF4Weight(self.qweight, self.absmax, shape, self.blocksize)
        return NF4Weight(self.qweight, self.absmax, shape, self.blocksize, absmax_code=self.absmax_code,
                         absmax_scale=self.absmax_scale, absmax_offset=self.absmax_offset)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 `[out_features, in_features]` (e.g. to prune a side network from)."""
        return dequantize(self.nf4_weight(), self.absmax_fp32 if self.double_quant else self.absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        absmax = self.absmax_fp32 if self.double_quant else self.absmax
        y = _MatmulNF4.apply(x, self.nf4_weight(), absmax)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4 blocksize={self.blocksize}, double_quant={self.double_quant}")


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _targets(model: nn.Module, skip: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    skip = tuple(skip)
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not any(s in name.split(".") for s in skip)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, blocksize: int = 64,
                   double_quant: bool = False, progress: bool = True) -> dict:
    """Replace every nn.Linear of `model` (in place) by a QuantLinear, except modules whose
    name contains a component listed in `skip`.

    Returns `{"layers", "linear_bytes_before", "linear_bytes_after", "model_bytes_before",
    "model_bytes_after"}`.
    """
    model_before = model_bytes(model)
    targets = _targets(model, skip)
    if not targets:
        raise LongsideError("quantize_model found no nn.Linear to quantize (check `skip`)")
    before = after = 0
    for name, lin in tqdm(targets, desc="quantize nf4", disable=not progress, leave=False):
        q = QuantLinear.from_linear(lin, blocksize, double_quant)
        q.train(lin.training)
        before += sum(t.numel() * t.element_size() for t in lin.parameters())
        after += sum(t.numel() * t.element_size() for t in q.state_dict().values())
        _swap(model, name, q)
    return {"layers": len(targets), "linear_bytes_before": before, "linear_bytes_after": after,
            "model_bytes_before": model_before, "model_bytes_after": model_bytes(model)}


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a quantized model to `directory`: `model.safetensors` (every parameter and
    buffer, tied ones once), `quantization.json` (which layers are NF4), and the Hugging
    Face config when the model has one. Atomic: a crash leaves no half-written directory."""
    layers = {name: {"in_features": m.in_features, "out_features": m.out_features,
                     "bias": m.bias is not None, "blocksize": m.blocksize, "double_quant": m.double_quant}
              for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise LongsideError("save_quantized: the model has no QuantLinear; run quantize_model first")
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_model(model, str(tmp / _WEIGHTS_FILE))
        (tmp / _CONFIG_FILE).write_text(json.dumps({"format": "nf4-bnb", "layers": layers}, indent=1))
        if getattr(model, "config", None) is not None and hasattr(model.config, "save_pretrained"):
            model.config.save_pretrained(tmp)
    return directory


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load what `save_quantized` wrote. `model`: an unquantized model of the same
    architecture to fill (its linear layers are swapped for empty QuantLinears first);
    when None, one is built from the saved Hugging Face config. Returns the model."""
    directory = Path(directory)
    cfg_path = directory / _CONFIG_FILE
    if not cfg_path.exists() or not (directory / _WEIGHTS_FILE).exists():
        raise CheckpointError(f"{directory} is not a quantized model (no {_CONFIG_FILE} / {_WEIGHTS_FILE}); "
                              "write one with save_quantized")
    layers = json.loads(cfg_path.read_text())["layers"]
    if model is None:
        # A real (randomly initialised) model, not a meta one: non-persistent buffers such
        # as rotary frequencies are computed at construction and are not in the file.
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    for name, spec in layers.items():
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{directory}: layer {name} does not exist in the model to load into") from e
        _swap(model, name, QuantLinear(spec["in_features"], spec["out_features"], spec["bias"],
                                       spec["blocksize"], spec["double_quant"]))
    device = next(iter(model.buffers())).device
    missing, unexpected = load_model(model, str(directory / _WEIGHTS_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()

"""`GGUFLinear` and `GGUFEmbedding`: frozen layers that keep a GGUF tensor's own blocks, and
`load_gguf_layers`, which swaps a model's linear layers and token embedding for them.

Nothing is dequantized to fp32 and re-quantized: the bytes of the file are the weights.
`matmul_ggml` picks the path by M: up to `FUSED_MAX_M` rows (decode) a fused kernel (int8
activations for Q4_0/Q4_1/Q8_0 as llama.cpp does, or exact fp32 activations), above it exact
dequantization of cache-sized tiles and one BLAS GEMM per tile (segment reads: evaluation,
memorizing, training features keep the fp32 copy's logits). The lean decode step
(backbone/decode_step.py) lets int8 products run the int8 kernel up to `INT8_MAX_M` rows: the
prompts it reads, one user's or several users' together.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, MODEL_ARCH_NAMES, get_tensor_name_map
from longside.kernels import ggml_cpu
from longside.kernels.ggml import (GGML_TYPES, GGMLWeight, can_pack_lanes, dequantize_reference, lane_rows,
                                   llama_row_order, pack_lanes, type_info, unpack_lanes)
from torch import nn
from tqdm.auto import tqdm

from longside.errors import LongsideError

# Up to this many rows of x the fused kernels run; above, tiled dequantize + BLAS wins for fp32
# activations. The int8 kernel beats the tiles at every M measured (SmolLM2's products, M
# 16-512: 1.5-5.7x, 2 threads, AVX-512 VNNI: experiments/serve_profile.py products): the
# lean decode step lets it run up to INT8_MAX_M rows (`int8_max_m`).
FUSED_MAX_M = 16
INT8_MAX_M = 512
ACTIVATIONS = ("int8", "fp32")


def matmul_ggml(x: torch.Tensor, w: GGMLWeight, activations: str = "int8",
                int8_max_m: int | None = None) -> torch.Tensor:
    """`x @ W.T` for a ggml weight W `[N, K]`: x float `[..., K]` -> float32 `[..., N]` on
    CPU (x's dtype on CUDA). `activations="int8"` quantizes x per block of 32 on the fused
    path (Q4_0/Q4_1/Q8_0 only), taken up to `int8_max_m` rows (default `FUSED_MAX_M`; 0: never);
    "fp32" keeps it exact."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise LongsideError(f"matmul_ggml: x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.device.type == "cuda":
        from longside.kernels.ggml_triton import matmul_ggml_triton  # Triton exists only where CUDA does

        return matmul_ggml_triton(x2, w.file_blocks(), w.qtype, n, k).reshape(*lead, n)
    if x2.device.type != "cpu" or w.blocks.device.type != "cpu":
        raise LongsideError(f"matmul_ggml: x on {x2.device} and the weight on {w.blocks.device}; both must be on "
                            "the cpu (or both on cuda)")
    if not w.blocks.is_contiguous():
        w = GGMLWeight(w.blocks.contiguous(), w.qtype, w.shape, w.packed)
    x2 = x2.float()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not ggml_cpu.available():
        warnings.warn(f"longside GGUF CPU kernel is not built, using the slow torch reference: "
                      f"{ggml_cpu.BUILD_HINT}", RuntimeWarning, stacklevel=2)
        return (x2 @ dequantize_reference(w).t()).reshape(*lead, n)
    m = x2.shape[0]
    if activations == "int8" and w.qtype in ggml_cpu.INT8_TYPES \
            and m <= (FUSED_MAX_M if int8_max_m is None else int8_max_m):
        y = ggml_cpu.gemv_int8(x2, w)
    elif m <= FUSED_MAX_M:
        y = ggml_cpu.gemv_f32(x2, w)
    else:
        y = ggml_cpu.gemm_tiled(x2, w)
    return y.reshape(*lead, n)


def dequantize_ggml(w: GGMLWeight) -> torch.Tensor:
    """float32 `[N, K]`, bit-identical to the gguf package (C kernel on CPU when built)."""
    if w.blocks.device.type == "cpu" and ggml_cpu.available():
        return ggml_cpu.dequantize_rows(w)
    return dequantize_reference(w)


class _MatmulGGML(torch.autograd.Function):
    """y = x @ W.T with W frozen: gradient w.r.t. x only (dx = dy @ W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: GGMLWeight, activations: str, int8_max_m: int | None) -> torch.Tensor:
        ctx.w = w
        return matmul_ggml(x, w, activations, int8_max_m)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ dequantize_ggml(ctx.w).to(grad_out.device, grad_out.dtype), None, None, None


class GGUFLinear(nn.Module):
    """A frozen linear layer whose weight is a GGUF tensor's blocks, as in the file.

    Buffer `blocks`: uint8 `[out_features, row_bytes]` (persistent), in the file's order or,
    where `packed` (`pack_lanes()`: Q4_0/Q4_1 on the CPU), in the lanes layout the decode
    kernel reads without transposing (kernels/ggml.py). `bias` float32 or None.
    `activations`: "int8" (decode dot products on int8 activations, llama.cpp's way) or
    "fp32" (exact). `int8_max_m`: up to how many rows of input int8 activations are used when
    a call does not say (None: `FUSED_MAX_M`; 0: only where a call asks, as the LM head).
    Input `[..., in_features]` -> float32 `[..., out_features]` cast back to the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = False,
                 activations: str = "int8"):
        super().__init__()
        _, elems, nbytes = type_info(qtype)
        if in_features % elems:
            raise LongsideError(f"{qtype} needs in_features divisible by {elems}, got {in_features}")
        if activations not in ACTIVATIONS:
            raise LongsideError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        self.in_features, self.out_features, self.qtype, self.activations = in_features, out_features, qtype, activations
        self.register_buffer("blocks", torch.zeros(out_features, in_features // elems * nbytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.packed = False
        self.int8_max_m: int | None = None
        self._weight: GGMLWeight | None = None  # a view of `blocks`, rebuilt when the buffer is replaced

    @classmethod
    def from_weight(cls, w: GGMLWeight, bias: torch.Tensor | None = None, activations: str = "int8") -> "GGUFLinear":
        n, k = w.shape
        layer = cls(k, n, w.qtype, bias is not None, activations)
        layer.blocks, layer.packed = w.blocks.contiguous(), w.packed
        if bias is not None:
            layer.bias.data = bias.detach().float().clone()
        return layer

    def pack_lanes(self) -> bool:
        """Hold the blocks in the lanes layout (same bytes, reordered in groups of 16 rows) where
        the type and row count allow it and the compiled kernels can read it; True if packed.
        Q8_0 only where its int8 products run on AVX-512 VNNI (ggml_cpu.c: elsewhere a packed
        Q8_0 weight is read by the scalar loop)."""
        if self.packed or self.blocks.device.type != "cpu" or not ggml_cpu.available() \
                or not can_pack_lanes(self.qtype, self.out_features) \
                or (self.qtype == "Q8_0" and ggml_cpu.isa() != "avx512"):
            return self.packed
        self.blocks, self.packed = pack_lanes(self.blocks, self.qtype), True
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # a state dict holds the file's bytes whatever the layout here (the flag is not in it)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "blocks"] = unpack_lanes(self.blocks.detach(), self.qtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        _repack_loaded(self, state_dict, prefix)

    def in_slabs(self, x: torch.Tensor, max_m: int) -> torch.Tensor:
        """`self(x, int8_max_m=max_m)` on at most `max_m` rows of x at a time: every row takes
        the same kernel however many rows x has (one call past max_m rows would switch them all
        to exact tiles), and the kernels' rows do not depend on each other, so a row's product
        is the same whatever else a batch holds. x `[..., in]` -> `[..., out]`."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= max_m:
            return self(x, int8_max_m=max_m)
        y = torch.cat([self(slab, int8_max_m=max_m) for slab in rows.split(max_m)])
        return y.view(*x.shape[:-1], y.shape[-1])

    def ggml_weight(self) -> GGMLWeight:
        if self.packed and self.blocks.device.type != "cpu":  # the lanes layout is the CPU kernels'
            self.blocks, self.packed = unpack_lanes(self.blocks, self.qtype), False
        if self._weight is None or self._weight.blocks is not self.blocks:
            self._weight = GGMLWeight(self.blocks, self.qtype, (self.out_features, self.in_features), self.packed)
        return self._weight

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 `[out_features, in_features]` (e.g. to prune a side network from)."""
        return dequantize_ggml(self.ggml_weight())

    def forward(self, x: torch.Tensor, int8_max_m: int | None = None) -> torch.Tensor:
        """`int8_max_m`: up to how many rows int8 activations take the int8 kernel (default
        the layer's `int8_max_m`; the lean decode step passes `INT8_MAX_M`, a decode step's
        LM head `FUSED_MAX_M`)."""
        limit = self.int8_max_m if int8_max_m is None else int8_max_m
        if x.requires_grad and torch.is_grad_enabled():
            y = _MatmulGGML.apply(x, self.ggml_weight(), self.activations, limit)
        else:  # decode: no autograd node to build
            y = matmul_ggml(x, self.ggml_weight(), self.activations, limit)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.qtype}{', lanes' if self.packed else ''}, "
                f"activations={self.activations}")


def _repack_loaded(layer: nn.Module, state_dict: dict, prefix: str) -> None:
    """After a state dict (the file's bytes) loaded into a packed layer: back to the lanes
    layout. In place, so a tied head and embedding still share one table; but where the load
    assigned the caller's own tensor (`assign=True`), a packed copy, never the caller's bytes
    rewritten (two keys may hold that one tensor: packing it twice would scramble it)."""
    key = prefix + "blocks"
    if not layer.packed or key not in state_dict:
        return
    if layer.blocks is state_dict[key]:
        layer.blocks = pack_lanes(layer.blocks, layer.qtype)
    else:
        with torch.no_grad():
            layer.blocks.copy_(pack_lanes(layer.blocks, layer.qtype))


class GGUFEmbedding(nn.Module):
    """A token embedding whose table is a GGUF tensor's blocks: looked-up rows are decoded
    exactly. `scale` multiplies the result (Gemma's sqrt(d) embedding scale; 1 otherwise).
    Input int64 `[...]` -> float32 `[..., embedding_dim]`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str, scale: float | torch.Tensor = 1.0):
        super().__init__()
        _, elems, nbytes = type_info(qtype)
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, qtype
        self.register_buffer("blocks", torch.zeros(num_embeddings, embedding_dim // elems * nbytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(()), persistent=False)
        self._scaled = float(scale) != 1.0
        self.packed = False  # the blocks of a tied LM head packed into lanes (`share_head`)

    def share_head(self, head: "GGUFLinear") -> None:
        """Read the table from a tied LM head's blocks, in whatever layout the head keeps them
        (one copy of the table in memory)."""
        if head.qtype != self.qtype or (head.out_features, head.in_features) != (self.num_embeddings, self.embedding_dim):
            raise LongsideError(f"a {head.qtype} head [{head.out_features}, {head.in_features}] is not this "
                                f"embedding's table ({self.qtype} [{self.num_embeddings}, {self.embedding_dim}])")
        self.blocks, self.packed = head.blocks, head.packed

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the file's bytes, as GGUFLinear's
        if self.packed:
            destination[prefix + "blocks"] = unpack_lanes(self.blocks.detach(), self.qtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        _repack_loaded(self, state_dict, prefix)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() == 1 and self.blocks.device.type == "cpu" and self.blocks.is_contiguous() \
                and ggml_cpu.available():  # a decode step's token: its row decoded in place, no gather
            t = int(input_ids.reshape(()))
            if not 0 <= t < self.num_embeddings:
                raise IndexError(f"token id {t} out of range for an embedding of {self.num_embeddings}")
            table = GGMLWeight(self.blocks, self.qtype, (self.num_embeddings, self.embedding_dim), self.packed)
            out = ggml_cpu.dequantize_rows(table, t, t + 1).reshape(*input_ids.shape, self.embedding_dim)
            return out * self.scale if self._scaled else out
        if self.packed:  # on any device: a moved head unpacks its own copy, these bytes stay packed
            rows = lane_rows(self.blocks, self.qtype, input_ids.reshape(-1))  # IndexError for a bad id
        else:
            rows = self.blocks.index_select(0, input_ids.reshape(-1))
        w = GGMLWeight(rows, self.qtype, (rows.shape[0], self.embedding_dim))
        out = dequantize_ggml(w).to(self.blocks.device).reshape(*input_ids.shape, self.embedding_dim)
        return out * self.scale if self._scaled else out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype}"


# ---------------------------------------------------------------------------------
# whole models


def set_activations(model: nn.Module, activations: str) -> int:
    """Switch the `GGUFLinear` layers of `model`, the LM head included, between "int8" (fast
    decode, llama.cpp's way, which also runs its output layer on int8 activations) and "fp32"
    activations everywhere (exact to fp32 rounding: incremental decoding then equals reading
    whole segments). The loader's default is "int8". The LM head takes int8 only where a call
    asks for it (`int8_max_m = 0`): `Backbone.lm_head(h, decode=True)`, one position per row
    in a decode step, and never a segment read's last block of a few rows, which stays exact
    like the rest of the segment. On 8 x 1024 tokens of The Tempest the decode kernels cost
    +0.11% perplexity with the head on fp32 activations, +0.24% with it on int8, and the
    head's one-row product takes ~0.6x the time (docs/results.md#lm-head-int8).
    Returns how many layers were set."""
    if activations not in ACTIVATIONS:
        raise LongsideError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    for m in layers:
        m.activations = activations
        if m is head:
            m.int8_max_m = 0
    return len(layers)


def _arch(reader: GGUFReader) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _row_order(arch: str, gguf_name: str, n_rows: int, config) -> torch.Tensor | None:
    """llama.cpp reorders the q/k rows of Llama models for its rotary layout; Hugging Face
    models expect the original order (transformers undoes it the same way when it reads a GGUF)."""
    if arch != "llama" or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return None
    heads = config.num_attention_heads
    if ".attn_k." in gguf_name:
        heads = getattr(config, "num_key_value_heads", None) or heads
    return llama_row_order(n_rows, heads)


def load_gguf_layers(model: nn.Module, path: str | Path, activations: str = "int8",
                     progress: bool = False) -> dict:
    """Swap (in place) every nn.Linear and the token embedding of a Hugging Face `model` that
    was converted from the GGUF at `path` for layers holding that file's blocks, with
    `activations` as `set_activations` sets them. Tensors
    stored unquantized (F32/F16) or in a type longside does not run stay as they are. A
    tied LM head shares the embedding's blocks.

    Returns `{"layers", "types": {qtype: count}, "bytes_before", "bytes_after"}` (bytes of
    the swapped modules' tensors; tied tensors once)."""
    reader = GGUFReader(str(path))
    arch = _arch(reader)
    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise LongsideError(f"{path}: GGUF architecture {arch!r} is unknown to the gguf package")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    names = get_tensor_name_map(arch_id, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is not None and head.weight is getattr(embed, "weight", None)
    report = {"layers": 0, "types": {}, "bytes_before": 0, "bytes_after": 0}
    seen: set[int] = set()

    def weight_of(hf_name: str, module: nn.Module) -> GGMLWeight | None:
        gname = names.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        t = tensors.get(gname) if gname else None
        if t is None and module is head and tied:
            t = tensors.get("token_embd.weight")
        if t is None or t.tensor_type.name not in GGML_TYPES:
            return None
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True))
        n, k = int(t.shape[1]), int(t.shape[0])  # ggml lists the fastest dimension first
        order = _row_order(arch, t.name, n, config)
        if order is not None:
            blocks = blocks[order].contiguous()
        return GGMLWeight(blocks.reshape(n, -1), t.tensor_type.name, (n, k))

    def count(module: nn.Module, new: nn.Module, qtype: str) -> None:
        report["layers"] += 1
        report["types"][qtype] = report["types"].get(qtype, 0) + 1
        for t in module.parameters():
            if id(t) not in seen:
                seen.add(id(t))
                report["bytes_before"] += t.numel() * t.element_size()
        report["bytes_after"] += sum(b.numel() * b.element_size() for b in new.buffers())

    embed_name = next(n for n, m in model.named_modules() if m is embed)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    shared_blocks = None
    ew = weight_of(embed_name, embed) if isinstance(embed, nn.Embedding) else None
    if ew is not None:
        if tuple(embed.weight.shape) != ew.shape:
            raise LongsideError(f"{path}: token_embd is {ew.shape}, the model's embedding {tuple(embed.weight.shape)}")
        new = GGUFEmbedding(ew.shape[0], ew.shape[1], ew.qtype, getattr(embed, "embed_scale", 1.0))
        new.blocks = ew.blocks
        shared_blocks = ew
        count(embed, new, ew.qtype)
        _swap(model, embed_name, new)
    for name, lin in tqdm(targets, desc="gguf layers", disable=not progress, leave=False):
        if lin is head and tied and shared_blocks is not None:
            w = shared_blocks
        else:
            w = weight_of(name, lin)
        if w is None:
            continue
        if tuple(lin.weight.shape) != w.shape:
            raise LongsideError(f"{path}: {name} is {w.shape} in the file, {tuple(lin.weight.shape)} in the model")
        new = GGUFLinear.from_weight(w, lin.bias, activations)  # a tied head holds the embedding's very blocks
        if w.qtype != "Q8_0" or lin is head:  # Q8_0 lanes are measured for the head alone (its exact
            new.pack_lanes()                    # fp32 products unpack rows: slower at a few rows)
        if w is shared_blocks:  # and the embedding reads them in the head's layout: one copy
            model.get_submodule(embed_name).share_head(new)
            report["layers"] += 1
            report["types"][w.qtype] = report["types"].get(w.qtype, 0) + 1
        else:
            count(lin, new, w.qtype)
        _swap(model, name, new)
    if report["layers"] == 0:
        raise LongsideError(f"{path}: no tensor of the model is stored in a block type longside runs "
                            f"({', '.join(GGML_TYPES)})")
    set_activations(model, activations)
    return report


def gather_blocks(model: nn.Module, empty=torch.empty) -> int:
    """Copy the blocks of every GGUF layer of `model` on the CPU (the embedding's, which a
    tied head shares, once) into one uint8 buffer `empty((nbytes,), torch.uint8)` makes (the
    backbone's loader passes `memory_bank.pages.empty`: 2 MB pages where the kernel has them,
    and a decode step streams all of them), in module order, each at a 64-byte boundary: a
    block's q, k, v and its gate, up then lie next to each other, and the decode step's fused
    products are views of them (decode_step._fuse), not copies. Returns the buffer's bytes."""
    layers = [m for m in model.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))
              and m.blocks.device.type == "cpu" and m.blocks.is_contiguous()]
    unique = list({id(m.blocks): m.blocks for m in layers}.values())
    place, total = {}, 0
    for b in unique:
        place[id(b)] = total
        total += -(-b.numel() * b.element_size() // 64) * 64
    if not unique:
        return 0
    arena = empty((total,), torch.uint8)
    moved = {}
    with torch.no_grad():
        for b in unique:
            n = b.numel() * b.element_size()
            new = arena[place[id(b)]:place[id(b)] + n].view(b.dtype).view(b.shape)
            new.copy_(b)
            moved[id(b)] = new
        for m in layers:
            m.blocks = moved[id(m.blocks)]
            if isinstance(m, GGUFLinear):
                m._weight = None
    return total

"""A lean decode step for Llama-family backbones.

An incremental step feeds a few new tokens (usually one) against a key/value cache. The
Hugging Face forward spends most of such a step in Python: a module call, a mask
construction and a dispatch per small op, ~20 ms per token for SmolLM2's 30 blocks on two
cores, against ~20 ms of actual matrix work. `llama_step` runs the same frozen blocks
with the same weights and the same cache (`DynamicCache.update`), in one plain loop: the
norms are single `F.rms_norm` calls, q/k/v and gate/up each one product of rows fused
at first use (views, no copy of the weights), attention a grouped-query product that
needs no repeated keys. What `Backbone.encode` returns (every block's hidden state, the
memory layer's pre-rotary q/k/v and attention output) is collected on the way, so the
caller cannot tell the two paths apart except by speed; the tests compare them.

One new token per row on GGUF blocks (decoding) goes further: every block runs in one C
call (`kernels/decode_cpu.c`: the same product kernels, the norms, rotary and attention as
plain loops, keys/values written in place into capacity buffers of the cache), which halves
the backbone's share of a decoded token; other steps take the torch loop.

It runs only where nothing else watches the blocks: `Backbone.encode` falls back to the
Hugging Face forward when any hook is registered on a block (backbone memory edits the
attention through hooks), for masks, for long inputs and for other families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from longside.backbone.rotary import apply_rotary
from longside.kernels import GGUFLinear, ggml_cpu
from longside.kernels.gguf_linear import FUSED_MAX_M, INT8_MAX_M

# Up to this many new tokens a step takes the lean path (prefill goes through Hugging Face).
MAX_STEP_TOKENS = 16


def _module_dicts(backbone) -> list[dict]:
    """The child dicts whose contents `_cached` was built from: the block list's, each
    block's and its attention's and MLP's (a swapped layer changes one)."""
    dicts = [backbone.parts.layers._modules]
    for layer in backbone.parts.layers:
        dicts += [layer._modules, layer.self_attn._modules, layer.mlp._modules]
    return dicts


def _cached(backbone) -> dict:
    """The per-backbone record of the lean step: its module lists, fused products and C
    tables, rebuilt when a layer was swapped or the weights moved (`.to()`). Checked every
    step, so the check runs at C speed: `map` over the recorded dicts."""
    first = backbone.parts.layers[0].input_layernorm.weight
    cache = getattr(backbone, "_decode_step_cache", None)
    if cache is not None and cache["where"] == (first.device, first.dtype) \
            and list(map(tuple, map(dict.values, cache["dicts"]))) == cache["children"]:
        return cache
    dicts = _module_dicts(backbone)
    modules = list(backbone.parts.layers.modules())
    cache = backbone._decode_step_cache = {
        "where": (first.device, first.dtype), "dicts": dicts, "children": list(map(tuple, map(dict.values, dicts))),
        "modules": modules, "hooks": [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)],
        "fused": None}
    return cache


def can_step(backbone, n_tokens: int, attention_mask: Any, cache: Any) -> bool:
    """True when `llama_step` gives what the Hugging Face forward would: a few tokens, no
    mask, a plain growing cache, and no hook on any block (hooks see the Hugging Face
    forward only). A token that continues the cache's last C step (`_continued`) is not
    checked again: what held for that step holds until the cache changes, so a block
    swapped, a hook added or the activations changed between two tokens of one decoding
    are seen from the next prompt or segment on."""
    if n_tokens > MAX_STEP_TOKENS or attention_mask is not None or type(cache) is not DynamicCache:
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    if n_tokens == 1 and _continued(cache) is not None:
        return True
    if not all(type(layer) is DynamicLayer for layer in cache.layers):  # sliding, offloaded, ...
        return False
    return not any(map(len, _cached(backbone)["hooks"]))


def _fuse(mods: list[nn.Module]) -> nn.Module | None:
    """One layer computing `torch.cat([m(x) for m in mods], -1)`, whose weight the given
    layers then view (so nothing is stored twice); None where they cannot share one."""
    if all(isinstance(m, GGUFLinear) and m.bias is None for m in mods) and len({m.qtype for m in mods}) == 1 \
            and len({m.in_features for m in mods}) == 1 and len({m.packed for m in mods}) == 1:
        # packed layers hold whole groups of 16 rows, so their concatenation is packed too;
        # blocks already side by side in one buffer (`gather_blocks`) are their concatenation
        blocks = _adjacent_rows([m.blocks for m in mods])
        if blocks is None:
            blocks = torch.cat([m.blocks for m in mods]).contiguous()
        fused = GGUFLinear(mods[0].in_features, blocks.shape[0], mods[0].qtype, activations=mods[0].activations)
        fused.blocks, fused.packed = blocks, mods[0].packed
        row = 0
        for m in mods:
            m.blocks = blocks[row:row + m.out_features]
            m._weight = None  # drop its view of the old buffer, which would keep it alive
            row += m.out_features
        return fused
    if all(type(m) is nn.Linear and m.bias is None for m in mods):
        weight = torch.cat([m.weight.data for m in mods]).contiguous()
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight = nn.Parameter(weight, requires_grad=False)
        row = 0
        for m in mods:
            m.weight.data = weight[row:row + m.out_features]
            row += m.out_features
        return fused
    return None  # NF4 and biased layers: one product each


def _adjacent_rows(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor viewing `parts` (contiguous `[n_i, w]` of one dtype) stacked along rows,
    where each starts in their common storage right where the one before ends; else None."""
    first = parts[0]
    storage = first.untyped_storage()
    at = first.data_ptr()
    for p in parts:
        if p.dim() != 2 or not p.is_contiguous() or p.dtype != first.dtype or p.shape[1] != first.shape[1] \
                or p.untyped_storage().data_ptr() != storage.data_ptr() or p.data_ptr() != at:
            return None
        at += p.numel() * p.element_size()
    rows = sum(p.shape[0] for p in parts)
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, first.shape[1]))


class _Fused:
    """A block's fused q/k/v and gate/up products, or None where its layers cannot share one."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.ffn = mlp.gate_proj.out_features
        self.activations = getattr(attn.q_proj, "activations", None)

    def sync(self, layer: nn.Module) -> None:
        """Follow a change of the layers' activation kind (`set_activations`)."""
        kind = getattr(layer.self_attn.q_proj, "activations", None)
        if kind != self.activations:
            for f in (self.qkv, self.gate_up):
                if isinstance(f, GGUFLinear):
                    f.activations = kind
            self.activations = kind


def _fused_blocks(backbone) -> list[_Fused]:
    # `can_step` has just checked the signature (Backbone.encode calls it first)
    cache = getattr(backbone, "_decode_step_cache", None) or _cached(backbone)
    if cache["fused"] is None:
        cache["fused"] = [_Fused(layer) for layer in backbone.parts.layers]
    return cache["fused"]


def _product(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block's product in this step. GGUF layers on int8 activations take the int8 kernel
    (the prompts read here, one user's or several users' together: 1.5-5.7x the exact tiles),
    in slabs of at most INT8_MAX_M rows: the kernel's rows do not depend on each other, so a
    row's product is the same whatever else the batch holds (switching to exact tiles past a
    size would make it depend on how many rows came). Segment reads elsewhere keep exact tiles."""
    if not isinstance(layer, GGUFLinear):
        return layer(x)
    if layer.activations == "int8" and layer.qtype in ggml_cpu.INT8_TYPES:
        return layer.in_slabs(x, INT8_MAX_M)
    return layer(x, int8_max_m=INT8_MAX_M)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, eps)


def _native_words(backbone, B: int) -> tuple[torch.Tensor, list] | None:
    """The C step's table `[L, DECODE_TABLE_WORDS]` int64 with every block's weight words
    filled (the cache words are the step's), for a batch of B rows, and the tensors those
    words point to; None where a block cannot
    take it (a product that is not GGUF blocks, a bias, another activation function, more
    rows than its kernel takes). Cached per kind of batch and activations; the cache holds
    the tensors it points to, so a layer whose blocks are replaced in place (not by swapping
    the layer, which `can_step`'s signature sees) keeps its old weights here, as the fused
    products of the torch step do."""
    fused = _fused_blocks(backbone)
    cache = backbone._decode_step_cache  # `_fused_blocks` made it
    layers = backbone.parts.layers
    if "watched" not in cache:  # whose activation kinds the fused products and the table follow
        cache["watched"] = [layer.self_attn.q_proj for layer in layers] + \
            [m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    kinds = tuple(getattr(m, "activations", None) for m in cache["watched"])
    if cache.get("synced") != kinds:
        for f, layer in zip(fused, layers):
            f.sync(layer)
        cache["synced"] = kinds
    key = (B <= FUSED_MAX_M, B <= INT8_MAX_M, kinds)
    memo = cache.setdefault("native", {})
    if key in memo:
        return memo[key] if memo[key][0] is not None else None
    rows, held = [], []
    for f, layer in zip(fused, layers):
        attn, mlp = layer.self_attn, layer.mlp
        prods = [f.qkv, attn.o_proj, f.gate_up, mlp.down_proj]
        norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        if not all(isinstance(p, GGUFLinear) and p.bias is None and p.blocks.is_contiguous() for p in prods) \
                or type(mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU") \
                or not all(w.dtype == torch.float32 and w.is_contiguous() for w in norms):
            memo[key] = (None, [])
            return None
        words = []
        for p in prods:
            int8 = p.activations == "int8" and p.qtype in ggml_cpu.INT8_TYPES and B <= INT8_MAX_M
            if not int8 and B > FUSED_MAX_M:  # the torch path tiles these
                memo[key] = (None, [])
                return None
            words.append(ggml_cpu.product_words(p.ggml_weight(), int8))
            held.append(p.blocks)
        held += norms
        rows.append(ggml_cpu.table_row(ggml_cpu.DECODE_WORDS, ggml_cpu.DECODE_TABLE_WORDS, attn_norm=norms[0].data_ptr(),
                                       qkv=words[0], o=words[1], ffn_norm=norms[1].data_ptr(), gate_up=words[2],
                                       down=words[3]))
    memo[key] = (torch.tensor(rows, dtype=torch.int64), held)
    return memo[key]


def _dynamic_rooms(cache: DynamicCache, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Capacity buffers `[L, B, G, cap, D]` (cap > n) for keys and values behind every layer
    of a DynamicCache, whose keys/values become views of their layer's first n columns: a step
    then writes one column in place instead of concatenating the whole cache, and the views of
    all layers come from one `unbind`. Layers changed elsewhere (Hugging Face's update
    concatenates, a deep copy copies) get new buffers, their contents copied in."""
    layers = cache.layers
    k0 = layers[0].keys
    if k0 is None or k0.dim() != 4 or k0.shape[2] != n or k0.dtype != torch.float32:
        return None
    shape = k0.shape
    for layer in layers:
        k, v = layer.keys, layer.values
        if k is None or k.shape != shape or v is None or v.shape != shape or k.dtype != torch.float32 \
                or v.dtype != torch.float32:
            return None
    rooms = getattr(cache, "_longside_rooms", None)
    if rooms is not None and rooms[0].shape[1:3] == shape[:2] and rooms[0].shape[3] > n \
            and rooms[0].shape[0] == len(layers) and all(
            layer.keys.data_ptr() == k.data_ptr() and layer.values.data_ptr() == v.data_ptr()
            and layer.keys.stride() == k.stride() and layer.values.stride() == v.stride()
            for layer, k, v in zip(layers, rooms[0], rooms[1])):
        return rooms
    B, G, _, D = shape
    cap = max(64, 2 * n)
    rooms = (k0.new_empty(len(layers), B, G, cap, D), k0.new_empty(len(layers), B, G, cap, D))
    for layer, k, v in zip(layers, rooms[0], rooms[1]):
        k[:, :, :n] = layer.keys
        v[:, :, :n] = layer.values
    cache._longside_rooms = rooms
    return rooms


class _StepTable:
    """The C step's table of a DynamicCache's last step, with what it points to (the cache
    buffers, and `held`: the weights and norms its words name, kept alive even if the model
    drops them): the next step reuses it while every layer's keys/values are still the views
    that step left (the same tensor objects over the same buffers, with room for one more
    position)."""

    def __init__(self, table: torch.Tensor, held: list, rooms: tuple, views: list[torch.Tensor]):
        self.table, self.held, self.rooms, self.views = table, held, rooms, views
        self.ptr = rooms[0].data_ptr()

    def __deepcopy__(self, memo):
        return None  # a copied cache lives in other memory: its next step builds its own table


def _continued(cache: Any) -> _StepTable | None:
    """The cache's last C step's record where its table still holds, else None (a deep copy
    of the cache, `LocalWindow.fork`, has none)."""
    last = getattr(cache, "_longside_table", None)
    if last is None or type(cache) is not DynamicCache:
        return None
    views = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if len(views) != len(last.views) or not all(a is b for a, b in zip(views, last.views)) \
            or views[0].data_ptr() != last.ptr or views[0].shape[2] >= last.rooms[0].shape[3]:
        return None
    return last


def _rotary(backbone, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[B, D]` float32 at `position_ids [B, 1]` (`Backbone.rotary`: rows of its
    table where the embedding is a function of the position alone)."""
    cos, sin = backbone.rotary(position_ids, like=h)
    return cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous()


class _StepStates(Sequence):
    """A C step's N+1 hidden states, each `[B, 1, d]`: views of its `[N+1, B, d]` buffer made
    when read (a step reads a dozen of SmolLM2's 31; making all 31 took ~80 us a token)."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf

    def __len__(self) -> int:
        return self.buf.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.buf[i].unsqueeze(1)


def _native_step(backbone, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache: Any,
                 memory_layer: int | None, key_mask: torch.Tensor | None, block_reads: Any = None) -> dict | None:
    """`llama_step` for one new token per row in one C call, or None where it cannot run.
    With `block_reads` (backbone memory, `nn/backbone_memory.py`'s `BlockReads`), the call is
    split at each block that reads memory: its retrieval runs between two C calls."""
    B, T = input_ids.shape
    if T != 1 or input_ids.device.type != "cpu" or not ggml_cpu.decode_in_c():
        return None
    n = cache.get_seq_length()
    if n == 0:
        return None
    spec, base = backbone.spec, backbone.parts.base
    H, G, D, L, d = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_layers, spec.hidden_size
    w = ggml_cpu.DECODE_WORDS
    last = _continued(cache)  # a continued decoding: the checks of its first C step hold (see `can_step`)
    if last is not None and last.rooms[0].shape[1] != B:
        return None
    if last is None:
        native = _native_words(backbone, B)
        if native is None:
            return None
        words, held = native
        if isinstance(cache, DynamicCache):
            if not all(type(layer) is DynamicLayer for layer in cache.layers):
                return None
            rooms = _dynamic_rooms(cache, n)
            rooms = None if rooms is None else list(zip(*rooms))
        else:
            rooms = cache.rooms(1) if hasattr(cache, "rooms") else None
        if rooms is None or len(rooms) != L or not all(
                t.dtype == torch.float32 and t.is_contiguous() and t.shape[:2] == (B, G) and t.shape[2] > n
                and t.shape[3] == D for room in rooms for t in room):
            return None
        table = words.clone()
        table[:, w["kbuf"]] = torch.tensor([k.data_ptr() for k, _ in rooms])
        table[:, w["vbuf"]] = torch.tensor([v.data_ptr() for _, v in rooms])
        table[:, w["cap"]] = torch.tensor([k.shape[2] for k, _ in rooms])
    else:
        table, held, rooms = last.table, last.held, None  # the buffers stay the cache's `_longside_rooms`
    if position_ids is None:
        position_ids = torch.full((B, 1), n, device=input_ids.device)
    h = base.embed_tokens(input_ids)
    if h.dtype != torch.float32:
        return None
    cos, sin = _rotary(backbone, h, position_ids)
    try:
        mask = ggml_cpu.key_mask_bytes(key_mask, B, n + 1)
    except ValueError:
        return None
    hidden = h.new_empty(L + 1, B, d)
    hidden[0] = h[:, 0]
    mem = (h.new_empty(B, H * D), h.new_empty(B, G * D), h.new_empty(B, G * D), h.new_empty(B, H * D))
    attn = backbone.parts.layers[0].self_attn
    norm = backbone.parts.layers[0].input_layernorm
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    args = (table, hidden, cos, sin, n, mask, eps, getattr(attn, "scaling", None) or D ** -0.5, H, G,
            backbone.parts.layers[0].mlp.gate_proj.out_features, -1 if memory_layer is None else memory_layer, mem)
    if block_reads is None:
        ggml_cpu.llama_decode_step(*args)
    else:
        if B != len(block_reads.seg.rows) or any(block_reads.seg.length(i) != n for i in block_reads.layers):
            return None  # not the segment of this cache: the hooked forward says what is wrong
        kv_pre = h.new_empty(L, B, 2, G * D)
        _split_step(backbone, args, block_reads, kv_pre, h)
    if isinstance(cache, DynamicCache):
        kall, vall = cache._longside_rooms  # `_dynamic_rooms` made them
        views = []
        for layer, k, v in zip(cache.layers, kall[:, :, :, :n + 1].unbind(0), vall[:, :, :, :n + 1].unbind(0)):
            layer.keys, layer.values = k, v
            views += (k, v)
        cache._longside_table = _StepTable(table, held, (kall, vall), views)
    else:
        cache.advance(1)
    if block_reads is not None:  # the segment records what the hooks would have recorded
        for i in block_reads.layers:
            kr = cache.layers[i].keys if isinstance(cache, DynamicCache) else rooms[i][0]
            block_reads.record(i, kv_pre[i, :, 0].view(B, 1, G, D), kv_pre[i, :, 1].view(B, 1, G, D),
                               kr[:, :, n].unsqueeze(1))
    states = _StepStates(hidden)
    kv: dict[str, torch.Tensor] = {}
    if memory_layer is not None:
        q, k, v, a = mem
        kr = cache.layers[memory_layer].keys if isinstance(cache, DynamicCache) else rooms[memory_layer][0][:, :, :n + 1]
        kv = {"q": q.view(B, 1, H, D), "k": k.view(B, 1, G, D), "v": v.view(B, 1, G, D), "a": a.view(B, 1, H, D),
              "kr": kr}
    return {"hidden": states, "final_norm": base.norm, "kv": kv}  # BackboneOutput.of_step applies it when read


def _split_step(backbone, args: tuple, block_reads: Any, kv_pre: torch.Tensor, h: torch.Tensor) -> None:
    """The C step with backbone memory: blocks run in C up to a block that reads memory and
    its attention; its retrieval (`block_reads.search`, the banks' own C search) runs here;
    the next call blends what it found into that block's attention, finishes the block and
    goes on to the next one that reads. Without memory to read, one call."""
    spec = backbone.spec
    L, B, H, D = spec.num_layers, h.shape[0], spec.num_heads, spec.head_dim
    reads = block_reads.layers if block_reads.reads() else []
    if not reads:
        ggml_cpu.llama_decode_step(*args, kv_pre=kv_pre)
        return
    att, lse, qm = h.new_empty(B, H * D), h.new_empty(B, H), h.new_empty(B, H * D)
    cos_m, sin_m = _rotary(backbone, h, torch.full((1, 1), block_reads.distance, device=h.device))
    split = dict(att=att, lse=lse, qm=qm, kv_pre=kv_pre, rot_m=(cos_m[0], sin_m[0]))
    ggml_cpu.llama_decode_step(*args, blocks=(0, reads[0]), **split)
    for i, block in enumerate(reads):
        keys, values, mask = block_reads.search(block, qm.view(B, 1, H, D))  # [B, 1, H, M, D], [B, 1, H, M]
        M = keys.shape[-2]
        memory = (keys.view(B, H, M, D), values.view(B, H, M, D), mask.view(B, H, M))
        ggml_cpu.llama_decode_step(*args, blocks=(block, reads[i + 1] if i + 1 < len(reads) else L), resume=True,
                                   memory=memory, **split)


@torch.no_grad()
def llama_step(backbone, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache: Any,
               memory_layer: int | None, key_mask: torch.Tensor | None = None, block_reads: Any = None) -> dict | None:
    """`input_ids [B, T]` (T <= MAX_STEP_TOKENS from `Backbone.encode`; a ragged batch's
    prefill feeds up to inference/ragged.py's FEED_TOKENS) after `cache.get_seq_length()` cached
    positions -> {"hidden": N+1 states `[B, T, d]` (a sequence: the C step's are views made when read), "last_hidden" (final norm; the one-call
    C step gives the norm module as "final_norm" instead, applied when read), "kv": the
    memory layer's q, k, v `[B, T, heads, D]`, attention output a `[B, T, H, D]` and its
    rotated keys of every cached position after this step, kr `[B, G, S, D]` (a view of the
    cache: valid until the cache changes)}.
    The cache grows by T positions, as with the Hugging Face forward.

    `key_mask [B, S]` bool (S = cached + T positions; True: a real key), or `[B, T, S]` (one
    per new token): rows of a batch whose texts have different lengths (see
    inference/ragged.py) hide their padding. `cache`
    is anything with `update(k, v, layer)` and `get_seq_length()` like a DynamicCache.

    `block_reads` (backbone memory's reads without hooks): only the one-call C step takes
    them; where it cannot run, None (the caller runs the hooked forward instead)."""
    native = _native_step(backbone, input_ids, position_ids, cache, memory_layer, key_mask, block_reads)
    if native is not None or block_reads is not None:
        return native
    spec, parts = backbone.spec, backbone.parts
    base = parts.base
    B, T = input_ids.shape
    H, G, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    past = cache.get_seq_length()
    if position_ids is None:
        position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
    h = base.embed_tokens(input_ids)
    cos, sin = base.rotary_emb(h, position_ids)
    cos, sin = cos.unsqueeze(2).to(h.dtype), sin.unsqueeze(2).to(h.dtype)  # [B, T, 1, D]
    # new token j sees every cached position and the new ones up to itself
    mask = None
    if T > 1:
        mask = torch.arange(past + T, device=h.device)[None] <= (past + torch.arange(T, device=h.device))[:, None]
    scaling = getattr(parts.layers[0].self_attn, "scaling", None) or 1 / math.sqrt(D)
    hidden = [h]
    kv: dict[str, torch.Tensor] = {}
    for i, (layer, fused) in enumerate(zip(parts.layers, _fused_blocks(backbone))):
        fused.sync(layer)
        attn, mlp = layer.self_attn, layer.mlp
        x = _rms_norm(layer.input_layernorm, h)
        if fused.qkv is not None:
            q, k, v = _product(fused.qkv, x).split(fused.sizes, dim=-1)
        else:
            q, k, v = _product(attn.q_proj, x), _product(attn.k_proj, x), _product(attn.v_proj, x)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, G, D), v.reshape(B, T, G, D)
        if i == memory_layer:
            kv.update(q=q.float(), k=k.float(), v=v.float())
        keys, values = cache.update(apply_rotary(k, cos, sin).transpose(1, 2), v.transpose(1, 2), i)  # [B, G, S, D]
        if i == memory_layer:  # the memory reader's local log-sum-exp needs them: not rotated twice
            kv["kr"] = keys
        # grouped-query attention without repeating keys: the H/G query heads of a group,
        # times T positions, attend together
        qg = apply_rotary(q, cos, sin).reshape(B, T, G, H // G, D).permute(0, 2, 3, 1, 4).reshape(B, G, H // G * T, D)
        scores = (qg @ keys.transpose(-1, -2)) * scaling  # [B, G, H/G*T, S]
        if mask is not None:
            scores = scores.view(B, G, H // G, T, -1).masked_fill(~mask, float("-inf")).view(B, G, H // G * T, -1)
        if key_mask is not None:  # [B, S], or one per new token [B, T, S]
            km = key_mask if key_mask.dim() == 3 else key_mask[:, None]
            scores = scores.view(B, G, H // G, T, -1).masked_fill(~km[:, None, None], float("-inf"))
            scores = scores.view(B, G, H // G * T, -1)
        a = (scores.softmax(-1) @ values).reshape(B, G, H // G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)
        if i == memory_layer:
            kv["a"] = a.reshape(B, T, H, D).float()
        h = h + _product(attn.o_proj, a)
        x = _rms_norm(layer.post_attention_layernorm, h)
        if fused.gate_up is not None:
            gate, up = _product(fused.gate_up, x).split([fused.ffn, fused.ffn], dim=-1)
        else:
            gate, up = _product(mlp.gate_proj, x), _product(mlp.up_proj, x)
        h = h + _product(mlp.down_proj, mlp.act_fn(gate) * up)
        hidden.append(h)
    return {"hidden": hidden, "last_hidden": base.norm(h), "kv": kv}

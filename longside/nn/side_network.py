"""The side network: a narrow residual network beside the frozen backbone that reads memory.

Shapes, for a backbone of N blocks, width d, H query heads, G key/value heads, head width
D, and a side network of reduction r (width s = d/r, head width D/r):

    side layer j reads h[l_j] (l_j = stride*(j+1)), the output of backbone block l_j - 1:
        x = (1 - sigmoid(z_j)) * down_j(h[l_j]) + sigmoid(z_j) * x        [B, T, s]
        x = x + memory_read(x)        (only at the memory layer, see `MemoryReader`)
        x = block_j(x)                 Llama-style: RMSNorm, rotary GQA attention, SwiGLU
    out = h[N] + sigmoid(z_f) * up(norm(x))                               [B, T, d]

`up` starts at zero, so at initialisation `out == h[N]` and the model's logits are the
backbone's exactly; training is judged by how far it moves from there.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from longside.backbone import Backbone, BackboneSpec, apply_rotary
from longside.config import SideNetConfig
from longside.errors import CheckpointError
from longside.kernels import ggml_cpu
from longside.nn.attention import per_query
from longside.nn.growing import Room
from longside.nn.memory_attention import MemoryInputs, MemoryReader
from longside.nn.token_cache import TokenCacheReader

_version = operator.attrgetter("_version")  # bumped by every in-place change of a tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SideBlock(nn.Module):
    """A Llama-style pre-norm decoder block at side width, with an optional key/value cache."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.attn_norm = RMSNorm(dim)
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim)
        self.gate = nn.Linear(dim, ffn, bias=False)
        self.up = nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, key_mask: torch.Tensor | None = None):
        """x `[B, T, s]`; cos/sin `[T, Dh]` for the new positions, or `[B, T, Dh]` when rows
        sit at different positions; cache `([B, G, P, Dh],)*2`; key_mask `[B, P+T]` or
        `[B, T, P+T]` bool (True: a real key; rows of different lengths hide their padding).

        Returns (x `[B, T, s]`, (keys, values) including the new positions)."""
        B, T, _ = x.shape
        cos, sin = (cos[:, None], sin[:, None]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
        h = self.attn_norm(x)
        q = apply_rotary(self.q(h).view(B, T, self.heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rotary(self.k(h).view(B, T, self.kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        new_cache = (k, v)
        rep = self.heads // self.kv_heads
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        P = kk.shape[2] - T
        if P == 0 and key_mask is None:
            a = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        else:  # new queries see every cached position and the new ones causally
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            if key_mask is not None:
                mask = mask & per_query(key_mask)[:, None]
            a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), new_cache


class Downsample(nn.Module):
    """Backbone hidden state `[B, T, d]` -> side width `[B, T, s]`.

    "prune": a fixed selection of s dimensions (no parameters); "avgpool": mean over
    groups of r dimensions (no parameters); "adapter": QST's RMSNorm, d -> rank -> s.
    """

    def __init__(self, kind: str, d: int, s: int, rank: int, keep: torch.Tensor):
        super().__init__()
        self.kind = kind
        self.register_buffer("keep", keep.clone(), persistent=False)
        if kind == "adapter":
            self.norm = RMSNorm(d)
            self.down = nn.Linear(d, rank, bias=False)
            self.up = nn.Linear(rank, s, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "prune":
            return h.index_select(-1, self.keep)
        if self.kind == "avgpool":
            return h.unflatten(-1, (-1, h.shape[-1] // self.keep.numel())).mean(-1)
        return self.up(self.down(self.norm(h)))


class SideNetwork(nn.Module):
    """The trainable side network for one backbone (see the module docstring)."""

    def __init__(self, config: SideNetConfig, spec: BackboneSpec, backbone: Backbone | None = None):
        super().__init__()
        r = config.reduction
        if spec.hidden_size % r or spec.head_dim % (2 * r) or spec.intermediate_size % r:
            raise CheckpointError(f"reduction {r} must divide the width {spec.hidden_size}, the "
                                  f"intermediate size {spec.intermediate_size} and half the head width "
                                  f"{spec.head_dim // 2}")
        self.spec = spec
        d, s, hd = spec.hidden_size, spec.hidden_size // r, spec.head_dim // r
        self.layer_map = [min(config.layer_stride * (j + 1), spec.num_layers)
                          for j in range(math.ceil(spec.num_layers / config.layer_stride))]
        self.config, self.memory_index = config, self.memory_index_for(config.memory_layer)
        # backbone memory's trained query maps {block: [H, D, D] float32}, set by
        # `LongSideModel.use_query_maps`: they travel with these weights (a model built on this
        # side network reads with them), saved beside them, not in this module's state_dict
        self.query_maps: dict[int, torch.Tensor] = {}
        keep, pairs = self._selection(spec, backbone, config)
        inv_freq = 1.0 / (_rope_theta(backbone) ** (torch.arange(0, spec.head_dim, 2).float() / spec.head_dim))
        self.register_buffer("inv_freq", inv_freq[pairs], persistent=False)
        self.register_buffer("keep", keep, persistent=False)
        self.downs = nn.ModuleList(Downsample(config.downsample, d, s, config.adapter_rank, keep)
                                   for _ in self.layer_map)
        self.gates = nn.Parameter(torch.full((len(self.layer_map),), float(config.gate_init)))
        self.blocks = nn.ModuleList(SideBlock(s, spec.num_heads, spec.num_kv_heads, hd,
                                              spec.intermediate_size // r) for _ in self.layer_map)
        self.reader = MemoryReader(s, spec, config.memory_attention, config.memory_gate_init,
                                   self._into_side_init(config.downsample, d, s, keep), config.memory_distance)
        self.token_reader = TokenCacheReader(copy=config.token_copy_k > 0, spread=config.token_spread) if config.token_cache else None
        self.norm = RMSNorm(s)
        self.up = nn.Linear(s, d, bias=False)
        self.final_gate = nn.Parameter(torch.zeros(()))
        self._init_weights(backbone if config.init == "prune" else None, pairs)

    def memory_index_for(self, layer: int) -> int:
        """The side layer that a memory read at backbone block `layer` sits before: the first
        that reads past that block."""
        n = self.spec.num_layers
        if not 0 <= layer < n:
            raise CheckpointError(f"memory_layer must be a block 0..{n - 1} of the backbone's {n}, got {layer}")
        return next(j for j, l in enumerate(self.layer_map) if l > layer)

    # -- initialisation ------------------------------------------------------------
    @staticmethod
    def _selection(spec: BackboneSpec, backbone: Backbone | None, config: SideNetConfig):
        """Which d/r hidden dimensions and which D/(2r) rotary pairs the side network keeps."""
        s, npairs = spec.hidden_size // config.reduction, spec.head_dim // (2 * config.reduction)
        if config.init == "prune" or config.downsample == "prune":
            if backbone is None or spec.family != "llama":
                raise CheckpointError("structured-pruning init and 'prune' downsampling need a Llama-family "
                                      "backbone passed in; use init='random', downsample='adapter'")
            dim_score, pair_score = _importance(backbone)
            keep = dim_score.topk(s).indices.sort().values
            pairs = pair_score.topk(npairs).indices.sort().values
        else:  # evenly spread over the width and the rotary frequencies
            keep = torch.arange(0, spec.hidden_size, config.reduction)
            pairs = torch.arange(0, spec.head_dim // 2, config.reduction)
        return keep, pairs

    @staticmethod
    def _into_side_init(kind: str, d: int, s: int, keep: torch.Tensor) -> torch.Tensor:
        """Map memory's change into the side stream the way hidden states come in."""
        w = torch.zeros(s, d)
        if kind == "prune":
            w[torch.arange(s), keep] = 1.0
        elif kind == "avgpool":
            r = d // s
            w[torch.arange(d) // r, torch.arange(d)] = 1.0 / r
        else:
            nn.init.normal_(w, std=d ** -0.5)
        return w

    def _init_weights(self, backbone: Backbone | None, pairs: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(0)
        for p in self.parameters():
            if p.dim() == 2 and p is not self.reader.into_side.weight:
                with torch.no_grad():
                    p.normal_(0.0, p.shape[1] ** -0.5 * 0.5, generator=gen)
        for down in self.downs:
            if down.kind == "adapter":
                nn.init.zeros_(down.up.weight)  # QST-style adapters start silent
        nn.init.zeros_(self.reader.q_delta.weight)
        nn.init.zeros_(self.up.weight)
        if backbone is not None:
            self._prune_from(backbone, pairs)

    @torch.no_grad()
    def _prune_from(self, backbone: Backbone, pairs: torch.Tensor) -> None:
        """LST: side block j starts as backbone block l_j, cut to the kept dimensions."""
        spec, keep = self.spec, self.keep
        D, H, G = spec.head_dim, spec.num_heads, spec.num_kv_heads
        # a rotary pair i is dimensions (i, i + D/2) of a head
        qk_dims = torch.cat([pairs, pairs + D // 2])
        layers = backbone.parts.layers
        for j, block in enumerate(self.blocks):
            src = layers[min(self.layer_map[j], spec.num_layers - 1)]
            at, mlp = src.self_attn, src.mlp
            q, k, v, o = (_dense(m) for m in (at.q_proj, at.k_proj, at.v_proj, at.o_proj))
            v_dims = _top_rows_per_head(v, G, D, block.head_dim)  # [G, hd] value dims per kv head
            q_rows = torch.cat([h * D + qk_dims for h in range(H)])
            k_rows = torch.cat([g * D + qk_dims for g in range(G)])
            v_rows = torch.cat([g * D + v_dims[g] for g in range(G)])
            o_cols = torch.cat([h * D + v_dims[h // (H // G)] for h in range(H)])
            block.q.weight.copy_(q[q_rows][:, keep])
            block.k.weight.copy_(k[k_rows][:, keep])
            block.v.weight.copy_(v[v_rows][:, keep])
            block.o.weight.copy_(o[keep][:, o_cols])
            gate, up, down = _dense(mlp.gate_proj), _dense(mlp.up_proj), _dense(mlp.down_proj)
            ffn = block.gate.weight.shape[0]
            neurons = (gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)).topk(ffn).indices.sort().values
            block.gate.weight.copy_(gate[neurons][:, keep])
            block.up.weight.copy_(up[neurons][:, keep])
            block.down.weight.copy_(down[keep][:, neurons])
            block.attn_norm.weight.copy_(src.input_layernorm.weight[keep])
            block.mlp_norm.weight.copy_(src.post_attention_layernorm.weight[keep])
        self.norm.weight.copy_(backbone.parts.norm.weight[keep])

    # -- forward ---------------------------------------------------------------------
    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[..., Dh]` for `positions [...]` (the side network's kept frequencies)."""
        f = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()

    def forward(self, hidden_states: list[torch.Tensor], memory: MemoryInputs | None = None,
                start: int = 0, caches: list | None = None, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None):
        """hidden_states: the backbone's N+1 states `[B, T, d]`; memory: the memory layer's
        inputs (None: memory off); start: position of the first token (with `caches`).
        Rows at different positions (inference/ragged.py) give `positions [B, T]` instead
        of `start`, and `key_mask [B, P+T]` or `[B, T, P+T]` (True: a real cached or new token).

        Returns (out `[B, T, d]` for the backbone's final norm + LM head, new caches)."""
        T = hidden_states[-1].shape[1]  # entries outside the layer map may be None (FeatureCache)
        if positions is None:
            positions = torch.arange(start, start + T, device=hidden_states[-1].device)
        cos, sin = self.rotary(positions)
        native = self._native_ok(hidden_states, caches, key_mask) if T == 1 and caches is not None else None
        if native is not None:
            return self._decode_native(hidden_states, memory, caches, cos, sin, key_mask, *native)
        gates = torch.sigmoid(self.gates)
        x = None
        new_caches = []
        for j, (l, down, block) in enumerate(zip(self.layer_map, self.downs, self.blocks)):
            h = down(hidden_states[l])
            x = h if x is None else (1 - gates[j]) * h + gates[j] * x
            if j == self.memory_index and memory is not None:
                x = x + self.reader(x, memory)
            x, c = block(x, cos, sin, None if caches is None else caches[j], key_mask)
            new_caches.append(c)
        out = hidden_states[-1] + torch.sigmoid(self.final_gate) * self.up(self.norm(x))
        return out, new_caches

    # -- one token per row in C (decoding) ----------------------------------------------
    def _native_ok(self, hidden_states: list, caches: list,
                   key_mask: torch.Tensor | None) -> tuple[torch.Tensor, bool] | None:
        """Where `_decode_native` gives what the loop above gives (no gradient, float32 on the
        CPU, pruned downsampling, every block's cache `[B, G, P, Dh]` float32): the C weight
        table (`_native_weights`) and whether `caches` are the ones the last step returned,
        whose table and rooms it reuses; else None. Checked once per token, here only."""
        if torch.is_grad_enabled() or not ggml_cpu.decode_in_c() or self.config.downsample != "prune":
            return None
        last = hidden_states[-1]
        up = self.up.weight
        if last.device.type != "cpu" or last.dtype != torch.float32 or up.dtype != torch.float32 \
                or not up.is_contiguous() or self.norm.weight.dtype != torch.float32:
            return None
        B = last.shape[0]
        if type(caches) is _RoomCaches and caches.continues(caches.weights, caches.n) \
                and caches.rooms[0][0].buf.shape[0] == B and (key_mask is None or key_mask.shape[-1] == caches.n + 1):
            # what the last step returned: its weights were checked (and its gates read) when
            # it was made, and hold until the caches change (a weight or gate replaced or
            # changed between two tokens of one decoding is read from the next prompt or
            # segment on)
            return caches.weights, True
        blk0 = self.blocks[0]
        hd, G = blk0.head_dim, blk0.kv_heads
        weights = self._native_weights()
        if weights is None:
            return None
        P = None if caches[0] is None else caches[0][0].shape[2]
        for c in caches:
            if c is None or not all(t.dtype == torch.float32 and t.dim() == 4 and t.shape == (B, G, P, hd)
                                    for t in c):
                return None
        if key_mask is not None and key_mask.shape[-1] != P + 1:
            return None
        return weights, type(caches) is _RoomCaches and caches.continues(weights, P)

    def _native_weights(self) -> torch.Tensor | None:
        """The C table `[J, len(SIDE_WORDS)]` int64 with the weight and norm words filled
        (the step fills state and cache words), or None where the blocks' norms differ in
        eps. Built once per set of weights: rebuilt after `.to()` (`_apply`), when a block's
        layer or weight was replaced and when a product's weight changed in place (its
        version counter), which its key sees (read by `map`s at C speed: it is checked every
        token). Where every product's weight is a float16 value (a checkpoint saved in float16,
        as `save_pretrained` does), the C step reads float16 copies: half the bytes a token,
        the same sums."""
        memo = self.__dict__.get("_native_memo")
        if memo is not None and list(map(tuple, map(dict.values, memo[2]))) == memo[0] \
                and list(map(_version, memo[3])) == memo[4]:
            return memo[1]
        names = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm")
        dicts = [self.blocks._modules] + [d for blk in self.blocks
                                          for d in (blk._modules, *(blk._modules[n]._parameters for n in names))]
        products = [getattr(blk, name).weight for blk in self.blocks for name in names[:7]]
        table, copies = None, []
        if len({n.eps for blk in self.blocks for n in (blk.attn_norm, blk.mlp_norm)}) == 1:
            copies = _float16_copies(products)
            half = bool(copies)
            ptrs = iter([w.data_ptr() for w in copies or products])
            w = ggml_cpu.SIDE_WORDS
            table = torch.tensor([ggml_cpu.table_row(
                w, len(w), mix=2 if j == 0 else 1, block=1, half=int(half),
                **{name: next(ptrs) for name in names[:7]},
                **{name: getattr(blk, name).weight.data_ptr() for name in names[7:]})
                for j, blk in enumerate(self.blocks)], dtype=torch.int64)
        # the memo holds the tensors the table points to (their storage: detached, and the
        # copies), so they outlive any replacement while a table or caches made with it live
        held = [getattr(blk, name).weight.detach() for blk in self.blocks for name in names] + copies
        self.__dict__["_native_memo"] = (list(map(tuple, map(dict.values, dicts))), table, dicts, products,
                                         list(map(_version, products)), held)
        return table

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_native_memo", None)  # `.to()` may move the weights the table names
        return super()._apply(fn, *args, **kwargs)

    def _decode_native(self, hidden_states: list, memory: MemoryInputs | None, caches: list, cos: torch.Tensor,
                       sin: torch.Tensor, key_mask: torch.Tensor | None, weights: torch.Tensor, continued: bool):
        """`forward` for one new token per row: the blocks before and after the memory read,
        each run in one C call (kernels/decode_cpu.c); the memory read stays in torch. The
        returned caches view buffers with room to grow (`Room`), so the next step writes one
        position in place instead of copying the whole cache. `weights`, `continued`: what
        `_native_ok` found."""
        last = hidden_states[-1]
        B, s = last.shape[0], self.norm.weight.shape[0]
        blk0 = self.blocks[0]
        H, G, hd, F = blk0.heads, blk0.kv_heads, blk0.head_dim, blk0.gate.weight.shape[0]
        P = caches.n if continued else caches[0][0].shape[2]
        cos, sin = (t.reshape(-1, hd).expand(B, hd).contiguous() for t in (cos, sin))
        mask = ggml_cpu.key_mask_bytes(key_mask, B, P + 1)  # `_native_ok` checked its length
        w = ggml_cpu.SIDE_WORDS
        buf = getattr(hidden_states, "buf", None)  # a C backbone step's states: rows of one [N+1, B, d] buffer
        if buf is not None and buf.is_contiguous() and buf.dtype == torch.float32:
            ptrs = [buf.data_ptr() + l * buf.stride(0) * buf.element_size() for l in self.layer_map]  # no views
        else:
            states = [hidden_states[l].reshape(B, -1).contiguous() for l in self.layer_map]  # alive for the calls
            ptrs = [h.data_ptr() for h in states]
        if continued:
            # the caches this method returned last step, untouched since: every block grows
            # in its own rooms, so only the states' words change
            table, rooms = caches.table, caches.rooms
            table.numpy()[:, w["state"]] = ptrs
            for room in (r for pair in rooms for r in pair):
                room.filled = P + 1
        else:
            table, rooms, words = weights.clone(), [], []
            for h, c in zip(ptrs, caches):
                pair = getattr(c, "rooms", (None, None))
                kr, vr = (Room.grow(r, t, 1, 2) for r, t in zip(pair, c))
                if kr.buf.shape[2] != vr.buf.shape[2]:  # one of the two was replaced: the C step takes one capacity
                    kr, vr = (Room.grow(None, t, 1, 2) for t in c)
                rooms.append((kr, vr))
                words.append([h, kr.buf.data_ptr(), vr.buf.data_ptr(), kr.buf.shape[2]])
            table[:, [w[name] for name in ("state", "kbuf", "vbuf", "cap")]] = torch.tensor(words, dtype=torch.int64)
        mi = self.memory_index
        if continued:  # the gates, as the weights, were read by the step that began these caches
            gates, final_gate, keep = caches.consts
        else:
            gates = torch.sigmoid(self.gates.detach()).float().contiguous()
            final_gate, keep = float(torch.sigmoid(self.final_gate)), self.keep.contiguous()
        x = last.new_empty(B, s)
        dims = (last.shape[-1], H, G, hd, F)
        eps = blk0.attn_norm.eps
        # the memory layer's mixing, then the read, then its block and the output
        ggml_cpu.side_decode_layers(table[:mi + 1], gates[:mi + 1], keep, x, cos, sin, P, mask, eps, dims,
                                    last_block=False)
        if memory is not None:
            x += self.reader(x.view(B, 1, s), memory).view(B, s)
        out = last.new_empty(B, 1, last.shape[-1])
        final = (self.norm.weight, self.norm.eps, self.up.weight, final_gate, last.reshape(B, -1).contiguous(), out)
        ggml_cpu.side_decode_layers(table[mi:], gates[mi:], keep, x, cos, sin, P, mask, eps, dims,
                                    first_mix=False, final=final)
        held = caches.held if continued else self.__dict__["_native_memo"]
        return out, _RoomCaches(table, rooms, weights, P + 1, held, (gates, final_gate, keep))


class _RoomCache(tuple):
    """A side block's cache `(keys, values)` `[B, G, n, Dh]`, views of its two `Room`s."""


class _RoomCaches(list):
    """The caches `_decode_native` returns (one `_RoomCache` per block, made when read: a
    decode step that continues from them reads none, and making the views took ~80 us a
    token), with the C table of the step that made them (its cache words naming each block's
    rooms), so the next step can reuse it."""

    def __init__(self, table: torch.Tensor, rooms: list[tuple[Room, Room]], weights: torch.Tensor, n: int,
                 held: tuple, consts: tuple):
        super().__init__([None] * len(rooms))
        self.table, self.rooms, self.weights, self.n = table, rooms, weights, n
        self.held = held  # what the table's weight words point to (`_native_weights`' memo)
        self.consts = consts  # (sigmoid of the mix gates, of the final gate, the kept dimensions)
        self._made: list = [None] * len(rooms)

    def _entry(self, j: int) -> _RoomCache:
        c = list.__getitem__(self, j)
        if c is None and self._made[j] is None:
            k, v = self.rooms[j]
            c = self._made[j] = _RoomCache((k.view(self.n), v.view(self.n)))
            c.rooms = self.rooms[j]
            list.__setitem__(self, j, c)
        return c

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._entry(j) for j in range(*i.indices(len(self)))]
        return self._entry(range(len(self))[i])

    def __iter__(self):
        return (self._entry(j) for j in range(len(self)))

    def continues(self, weights: torch.Tensor, P: int) -> bool:
        """True where the next step can reuse the table: the same weights, no cache replaced
        in this list, and every room grown by no one else and with space for one more."""
        return self.weights is weights and self.n == P and len(self) == len(self._made) \
            and all(a is b for a, b in zip(list.__iter__(self), self._made)) \
            and all(r.filled == P and r.buf.shape[2] > P for pair in self.rooms for r in pair)


# -- helpers ---------------------------------------------------------------------------
@torch.no_grad()
def _float16_copies(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float16 copies of float32 `weights` where every value of every one is a float16 value
    (the copies then hold them exactly), else []."""
    if all(w.dtype == torch.float32 and w.is_contiguous() and w.device.type == "cpu" and torch.equal(w.half().float(), w)
           for w in weights):
        return [w.half() for w in weights]
    return []


def _dense(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight `[out, in]` as float32 on the CPU (where the side network is
    built, whatever the backbone's device), dequantizing a 4-bit one."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.detach().float().cpu()
    if hasattr(module, "dequantize"):
        return module.dequantize().float().cpu()
    raise CheckpointError(f"cannot read the weights of {type(module).__name__} for pruning")


def _top_rows_per_head(w: torch.Tensor, heads: int, D: int, keep: int) -> torch.Tensor:
    """For each head of a `[heads*D, in]` weight, the `keep` rows of largest norm, `[heads, keep]`."""
    norms = w.norm(dim=1).view(heads, D)
    return norms.topk(keep, dim=1).indices.sort(dim=1).values


def _importance(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-magnitude importance of hidden dims `[d]` and rotary pairs `[D/2]`.

    A hidden dimension matters as much as the (norm-scaled) input columns that read it in
    every block; a rotary pair as much as the query/key rows that write it."""
    spec = backbone.spec
    dim = torch.zeros(spec.hidden_size)
    pair = torch.zeros(spec.head_dim // 2)
    for layer in backbone.parts.layers:
        at, mlp = layer.self_attn, layer.mlp
        n1, n2 = (n.weight.detach().float().cpu() for n in (layer.input_layernorm, layer.post_attention_layernorm))
        qkv = torch.cat([_dense(at.q_proj), _dense(at.k_proj), _dense(at.v_proj)])
        gu = torch.cat([_dense(mlp.gate_proj), _dense(mlp.up_proj)])
        dim += n1.pow(2) * qkv.pow(2).sum(0) + n2.pow(2) * gu.pow(2).sum(0)
        qk = torch.cat([_dense(at.q_proj), _dense(at.k_proj)]).pow(2).sum(1).view(-1, spec.head_dim)
        pair += qk[:, : spec.head_dim // 2].sum(0) + qk[:, spec.head_dim // 2:].sum(0)
    return dim, pair


def _rope_theta(backbone: Backbone | None) -> float:
    if backbone is None:
        return 10000.0
    cfg = backbone.parts.text_config
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))

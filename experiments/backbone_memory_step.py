"""Where a decode step's time goes with backbone memory on: the C calls, the 15 searches, the record.

    python experiments/backbone_memory_step.py [--memory-tokens 16384] [--tokens 64] [--json PATH]

The shipped checkpoint with backbone memory in blocks 15-29; its memory is the held-out
Austen text of `longside bench generate` memorized (repeated up to `--memory-tokens`), then a
128-token prompt and `--tokens` single-token steps of one window, each timed, with the time
spent inside the backbone's C calls, the banks' searches (their C scan and read, and the
Python around them) and the segment's record summed per token. Then the same steps with
backbone memory off (the same memory layer's memory), in the same process. Prints JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from longside.bench.generate import _texts
from longside.inference.window import LocalWindow
from longside.kernels import ggml_cpu
from longside.loading import load_model
from longside.memory_bank import search_cpu
from longside.nn.backbone_memory import BlockReads
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord


def _wrap(owner, name: str, key: str, spent: dict) -> None:
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t
    setattr(owner, name, timed)


def _steps(model, ids: list[int], tokens: int, spent: dict) -> dict:
    window = LocalWindow(model, 1, write_memory=False)
    window.feed(torch.tensor([ids[:128]]))
    x = torch.tensor([[ids[128]]])
    for _ in range(4):  # warm: the step's tables, the first touch of the banks
        window.feed(x)
    spent.clear()
    t = time.perf_counter()
    for _ in range(tokens):
        window.feed(x)
    per = (time.perf_counter() - t) / tokens
    return {"ms_per_token": round(per * 1e3, 3), "tokens_per_s": round(1 / per, 1),
            **{f"{k}_ms": round(v / tokens * 1e3, 3) for k, v in sorted(spent.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-tokens", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start()
    model, info = load_model()
    spent: dict = collections.defaultdict(float)
    _wrap(ggml_cpu, "llama_decode_step", "backbone_c_calls", spent)
    _wrap(BlockReads, "search", "searches", spent)
    _wrap(BlockReads, "record", "record", spent)
    _wrap(search_cpu, "search_chunks", "searches_c_scan", spent)
    _wrap(search_cpu, "read_chunks", "searches_c_read", spent)
    ids, source = _texts(4096, model.backbone.tokenizer)
    fill = (ids * (args.memory_tokens // len(ids) + 1))[:args.memory_tokens]
    rows = {}
    for name, blocks in (("backbone memory 15-29", range(15, 30)), ("without", [])):
        model.reset_memory()
        model.use_backbone_memory(blocks)
        model.memory.write_ids(fill)
        rows[name] = _steps(model, ids, args.tokens, spent)
    report = {"experiment": "backbone_memory_step", "memory_tokens": args.memory_tokens, "memory_fill": source,
              "tokens": args.tokens, "checkpoint": info["note"], "rows": rows,
              "speed_with_over_without": round(rows["without"]["ms_per_token"]
                                               / rows["backbone memory 15-29"]["ms_per_token"], 3),
              "provenance": run.finish()}
    print(json.dumps(report, indent=1))
    if args.json:
        write_json(report, args.json, indent=1)


if __name__ == "__main__":
    main()

"""Two builds of the compiled kernels (kernels/_ggml_cpu*.so) timed against each other in one
process, on the same batch: decode steps alternate between the libraries, so both see the same
machine at the same moment (a shared VM's speed drifts by half within minutes; runs minutes
apart cannot separate a change of a few percent).

    # build A, keep its library; build B, keep its library
    git checkout OLD && pip install --no-deps --no-build-isolation -e . && cp kernels/_ggml_cpu*.so /tmp/a.so
    git checkout NEW && pip install --no-deps --no-build-isolation -e . && cp kernels/_ggml_cpu*.so /tmp/b.so
    python experiments/decode_ab.py /tmp/a.so /tmp/b.so [--rows 8] [--memory-tokens 16384]
        [--prompt-tokens 60] [--steps 96] [--json PATH]

With `--reads` instead of two libraries, A and B are one build and differ in Python: A reads
the token cache's softmax statistics and the side network's memory read in torch (as before
commit 7519938), B in their C calls (`logit_stats`, `memory_read_step`):

    python experiments/decode_ab.py --reads [--rows 8] [--memory-tokens 16384] [--json PATH]

With `--head`, one build and one model: A multiplies by the LM head's Q8_0 blocks in the file's
order (four weight rows per pass), B by the same blocks in the lanes layout (16 rows as the
lanes of a vector, kernels/ggml_cpu.c); the head's layout is switched before each step.

    python experiments/decode_ab.py --head [--rows 8] [--memory-tokens 16384] [--json PATH]

A batch of `--rows` users (RaggedWindows, as the server decodes them), each with a memory of
its own (`--memory-tokens`: real keys of 4,096 memorized tokens of the held-out books,
repeated) and a prompt of about `--prompt-tokens` tokens (row b: 5 b more, so rows differ);
8 warm-up steps, then `--steps` steps, even ones on A, odd ones on B. Per library: the median
time of the backbone's C call, the side network's C calls and the whole step, in ms per step;
and the median of the paired ratios B/A of whole steps (step i on B over step i - 1 on A).
Threads: 2 (the benches' setting). With two libraries the backbone's blocks stay in the file's
order (a build before the lanes layout cannot read it); `experiments/decode_pairs.py
--file-order` times the layout itself.
"""

import argparse
import collections
import contextlib
import ctypes
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch

from longside.backbone import encode_memory
from longside.bench.generate import QUICK_FILL, _texts
from longside.inference.ragged import RaggedWindows
from longside.inference.window import LocalWindow
from longside.kernels import ggml_cpu
from longside.kernels.ggml import unpack_lanes
from longside.kernels.gguf_linear import GGUFLinear
from longside.loading import load_model
from longside.memory_bank import pages
from longside.nn import token_cache
from longside.nn.memory_attention import MemoryReader
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord


def _torch_stats(logits: torch.Tensor):
    """The token cache's statistics as torch computed them before `logit_stats`."""
    lse = logits.logsumexp(-1, keepdim=True)
    lp = logits - lse
    return lse, -(lp.exp() * lp).sum(-1), lp.max(-1).values


def _load(path: str) -> ctypes.CDLL:
    """The library at `path`, set up as `ggml_cpu._lib` sets up its own (a private copy: two
    libraries of one file name would be the same handle)."""
    copy = os.path.join(tempfile.mkdtemp(), "lib.so")
    shutil.copy(path, copy)
    loader = ggml_cpu.load_library
    ggml_cpu.load_library = lambda _stem: ctypes.CDLL(copy)
    try:
        return ggml_cpu._lib.__wrapped__()
    finally:
        ggml_cpu.load_library = loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", nargs="?", help="library A (not with --reads)")
    ap.add_argument("b", nargs="?", help="library B (not with --reads)")
    ap.add_argument("--reads", action="store_true", help="A: statistics and memory read in torch; B: in C")
    ap.add_argument("--head", action="store_true", help="A: the LM head's blocks in the file's order; B: as lanes")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--memory-tokens", type=int, default=16384)
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start(["python", "experiments/decode_ab.py", *sys.argv[1:]])
    torch.set_num_threads(2)
    same_build = args.reads or args.head
    if args.reads and args.head or same_build == bool(args.a or args.b) or (not same_build and not (args.a and args.b)):
        ap.error("give two libraries, or --reads or --head alone")
    if same_build:
        args.a, args.b = ("head in file order", "head as lanes") if args.head else ("torch reads", "C reads")
        libs = [ggml_cpu._lib()] * 2
        paths = [(_torch_stats, lambda *a, **k: None), (token_cache._logit_stats, MemoryReader._read_step)]
    else:
        libs = [_load(args.a), _load(args.b)]
    current = [libs[0]]
    ggml_cpu._lib = lambda: current[0]
    file_order = mock.patch.object(GGUFLinear, "pack_lanes", lambda self: False)
    with contextlib.nullcontext() if same_build else file_order:
        model, _ = load_model()
    if args.head:
        head = model.backbone.parts.lm_head
        if not head.packed:
            ap.error("the LM head is not in the lanes layout here (Q8_0 is packed where AVX-512 VNNI runs)")
        def own_pages(t: torch.Tensor) -> torch.Tensor:  # both layouts in fresh 2 MB-advised memory, alike
            out = pages.empty(tuple(t.shape), t.dtype)
            out.copy_(t)
            return out

        layouts = [(own_pages(unpack_lanes(head.blocks, head.qtype)), False), (own_pages(head.blocks), True)]
    ids, _ = _texts(QUICK_FILL + 2048 + 1024, model.backbone.tokenizer)
    W, layer = model.config.window, model.config.memory_layer
    segments = []
    if args.memory_tokens:
        for a in range(0, QUICK_FILL, W):
            seg = torch.tensor([ids[a:a + W]])
            k, v, h = encode_memory(model.backbone, seg, layer, model.token_layer)
            segments.append((k[0], v[0], h[0], seg[0]))
    batch = RaggedWindows(model)
    for b in range(args.rows):
        memory = model.new_memory(1)
        bank = memory.banks[0]
        while len(bank) < args.memory_tokens:
            for k, v, h, s in segments:
                take = min(args.memory_tokens - len(bank), k.shape[0])
                bank.add(k[:take], v[:take], token_keys=h[:take], token_ids=s[:take])
        window = LocalWindow(model, 1, memory=memory)
        start = QUICK_FILL + 40 * b
        window.feed(torch.tensor([ids[start:start + args.prompt_tokens + 5 * b]]))
        batch.join(window)

    times, which = collections.defaultdict(list), [0]

    def timed(name):
        f = getattr(ggml_cpu, name)

        def call(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            times[(name, which[0])].append(time.perf_counter() - t)
            return out
        setattr(ggml_cpu, name, call)

    timed("llama_decode_step")
    timed("side_decode_layers")
    timed("gemv_int8")  # the LM head's product (and any other int8 product a step makes)
    nxt = torch.zeros(args.rows, dtype=torch.long)
    for _ in range(8):
        nxt = batch.step(nxt).argmax(-1)
    times.clear()
    steps = []
    for i in range(args.steps):
        which[0] = i % 2
        current[0] = libs[which[0]]
        if args.reads:
            token_cache._logit_stats, MemoryReader._read_step = paths[which[0]]
        if args.head:
            head.blocks, head.packed = layouts[which[0]]
        t = time.perf_counter()
        nxt = batch.step(nxt).argmax(-1)
        steps.append(time.perf_counter() - t)
    per_step = {}
    for w, path in enumerate((args.a, args.b)):
        n = len(steps[w::2])
        per_step[path] = {
            "backbone_c_ms": round(statistics.median(times[("llama_decode_step", w)]) * 1e3, 2),
            "side_c_ms": round(statistics.median(times[("side_decode_layers", w)]) * 1e3 *
                               len(times[("side_decode_layers", w)]) / n, 2),
            "int8_products_ms": round(sum(times[("gemv_int8", w)]) * 1e3 / n, 2),
            "step_ms": round(statistics.median(steps[w::2]) * 1e3, 2)}
    report = {"benchmark": ("torch against C reads" if args.reads else "the LM head's layouts" if args.head
                            else "two kernel builds") +
              ", alternating decode steps of one batch", "rows": args.rows,
              "memory_tokens": args.memory_tokens, "prompt_tokens": args.prompt_tokens, "steps": args.steps,
              "columns_at_end": batch.columns, "per_library": per_step,
              "step_ratio_b_over_a_median": round(statistics.median(
                  b / a for a, b in zip(steps[0::2], steps[1::2])), 3),
              "provenance": run.finish()}
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}, indent=1))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()

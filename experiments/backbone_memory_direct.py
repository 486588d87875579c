"""Does backbone memory need the blocks above it? Its reads put into the residual stream
(injected, as shipped) against the same reads added straight to the last block's output.

    python experiments/backbone_memory_direct.py --segments 16 --json results/backbone_memory_direct.json

Backbone memory edits the attention output of blocks 15-29 inside the backbone, so every
block above a reading block computes on the edited stream. That is why memorizing with it
must run the Hugging Face forward with hooks, why the server's batched step cannot take
it, and why a feature cache cannot replay its features. The residual stream is a sum:
block L's edit reaches the last hidden state directly as `o_proj_L(a' - a)` and
indirectly through the blocks above it. Row "direct" keeps the direct part only: the same
reads, their `o_proj_L(a' - a)` summed over the blocks and added to the last block's
output, the backbone otherwise untouched. If "direct" keeps most of "injected"'s gain,
memory can be read beside a frozen backbone (a side path) instead of inside it.

Rows (shipped checkpoint, token cache off, one book of the test split streamed in
1024-token segments from an empty memory, segments 2..N scored): off, injected, direct.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

import torch
from tqdm.auto import tqdm

from longside.config import parse_blocks
from longside.eval.common import book_chapters, git_commit, load_book_data, load_model
from longside.nn.backbone_memory import BackboneMemory
from longside.paths import check_output_file, write_json


@contextlib.contextmanager
def direct_reads():
    """While inside, backbone memory's reads leave each block's attention output as it is
    and add `o_proj(a' - a)` of every reading block to the last block's output instead."""
    original = BackboneMemory.attach

    @contextlib.contextmanager
    def attach(self, seg, read=True):
        bb = self.backbone
        parts = bb.parts
        acc: list[torch.Tensor] = []
        handles = []

        def editor(L):
            edit = self._editor(L, seg, read)
            proj = parts.out_proj(parts.layers[L])

            def direct(kv):
                new = edit(kv)
                if new is not None:
                    with torch.no_grad():
                        acc.append(proj.forward((new - kv["a"]).flatten(2)))
                return None
            return direct

        def add_to_last(_m, _args, out):
            if not acc:
                return None
            delta = torch.stack(acc).sum(0)
            acc.clear()
            if isinstance(out, tuple):
                return (out[0] + delta.to(out[0].dtype),) + tuple(out[1:])
            return out + delta.to(out.dtype)

        try:
            for L in self.layers:
                handles += bb.edit_attention(L, editor(L))
            handles.append(parts.layers[-1].register_forward_hook(add_to_last))
            yield
        finally:
            for h in handles:
                h.remove()

    BackboneMemory.attach = attach
    try:
        yield
    finally:
        BackboneMemory.attach = original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--book", type=int, default=0, help="index in the test split (0: Sense and Sensibility)")
    p.add_argument("--segments", type=int, default=16, help="segments of the book (the first is not scored)")
    p.add_argument("--blocks", default="15-29")
    p.add_argument("--k-chunks", type=int, default=16)
    p.add_argument("--rows", nargs="+", choices=("off", "injected", "direct"), default=["off", "injected", "direct"])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")  # before the long work
    model, info = load_model()
    W = model.config.window
    books, data_id = load_book_data(None, "test")
    book = books[args.book]
    ids = [t for ch in book_chapters(model.backbone.tokenizer, book) for t in ch][:args.segments * W]
    rows = {}
    for name in args.rows:
        model.reset_memory()
        model.use_backbone_memory(parse_blocks("" if name == "off" else args.blocks), k_chunks=args.k_chunks)
        model.reset_memory()
        nll = n = 0.0
        per_segment = []
        started = time.time()
        with direct_reads() if name == "direct" else contextlib.nullcontext():
            for s in tqdm(range(0, len(ids), W), desc=name, leave=False):
                seg = torch.tensor([ids[s:s + W]])
                with torch.no_grad():
                    out = model(seg, labels=seg if s else None, return_logits=False, token_cache=False)
                if s:
                    nll += out.loss.item() * out.n_tokens
                    n += out.n_tokens
                    per_segment.append(out.loss.item())
        rows[name] = {"ppl": math.exp(nll / n), "tokens": int(n), "segment_losses": per_segment,
                      "seconds": round(time.time() - started, 1)}
        print(json.dumps({name: {k: v for k, v in rows[name].items() if k != "segment_losses"}}), file=sys.stderr)
    base = rows.get("off", {}).get("ppl")
    for r in rows.values():
        r["vs_off"] = r["ppl"] / base - 1 if base else None
    report = {"experiment": "backbone_memory_direct", "model": info, "git_commit": git_commit(),
              "data": {"books": data_id, "title": book["title"]}, "config": vars(args), "results": rows}
    if args.json:
        write_json(report, args.json)
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far decoding on int8 activations moves perplexity from the exact whole-segment read:
rows x tokens of held-out Austen (Sense and Sensibility, the first six chapters, as
tests/test_backbone.py reads them), read once exactly (fp32 activations), then decoded token
by token with int8 activations through the one-call C step and through the torch step.

    python experiments/int8_decode_ppl.py [--tokens 256] [--rows 8]

Prints the nats per token over the exact read for each way of decoding (0.005 nats is +0.5%
perplexity, the bound test_native_decode_step_int8_perplexity holds on 8 x 256 tokens).
"""

import argparse
import os

import torch
from transformers import DynamicCache

from longside.backbone import load_backbone
from longside.data import load_books
from longside.kernels import gguf_linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per row")
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    bb = load_backbone("smollm2-135m")
    book = next(b for b in load_books() if b["book_id"] == "austen/sensesensibility")
    text = "\n\n".join(c["text"] for c in book["chapters"][:6])
    ids = torch.tensor(bb.tokenizer(text).input_ids[:args.rows * args.tokens]).reshape(args.rows, args.tokens)

    def nll(logits: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    gguf_linear.set_activations(bb.model, "fp32")
    with torch.no_grad():
        exact = nll(bb.logits(ids))
    gguf_linear.set_activations(bb.model, "int8")
    for mode in ("c", "torch"):
        os.environ["LONGSIDE_DECODE"] = mode
        cache, rows = DynamicCache(), []
        with torch.no_grad():
            for t in range(args.tokens):
                out = bb.encode(ids[:, t:t + 1], memory_layer=15, cache=cache, use_cache=True)
                rows.append(bb.parts.lm_head(out.last_hidden))
        print(f"decode={mode}: {nll(torch.cat(rows, 1)) - exact:+.5f} nats over the exact read "
              f"({args.rows} x {args.tokens} tokens)", flush=True)


if __name__ == "__main__":
    main()

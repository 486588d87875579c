"""The shipped model with its backbone in NF4 against the same model in fp32: perplexity
ratio and top-1 agreement on the first 1024 tokens of a held-out Austen novel (the test
`tests/test_loading.py` checks the same on 512 tokens, with a tolerance).

    python experiments/nf4_vs_fp32.py
"""

import json
import math

import torch

from longside import load_model
from longside.backbone import tokenize
from longside.data import load_books


def main() -> None:
    fp32, _ = load_model(quantize="fp32")
    nf4, _ = load_model(quantize="nf4")
    book = load_books("test")[1]
    text = "\n\n".join(c["text"] for c in book["chapters"][:2])
    ids = torch.tensor([tokenize(fp32.backbone.tokenizer, text)[:1024]])
    with torch.no_grad():
        a = fp32(ids, labels=ids, write_memory=False)
        b = nf4(ids, labels=ids, write_memory=False)
    print(json.dumps({"book": book["title"], "tokens": ids.shape[1], "ppl_fp32": round(math.exp(a.loss.item()), 3),
                      "ppl_nf4": round(math.exp(b.loss.item()), 3),
                      "ppl_ratio": round(math.exp(b.loss.item() - a.loss.item()), 4),
                      "top1_agreement": round((a.logits.argmax(-1) == b.logits.argmax(-1)).float().mean().item(), 4)}))


if __name__ == "__main__":
    main()

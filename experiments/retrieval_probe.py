"""Does the frozen backbone already retrieve the right memory? (no training involved)

Builds synthetic pass-key documents (real filler text, a number stated once), writes all
but the last 1024-token segment into a memory of chunk keys (the mean of 4 pre-rotary
keys of block 15, as the memory bank stores them), and asks which chunks the backbone's
own block-15 query at the answer position ranks in its top 16, head by head.

    python experiments/retrieval_probe.py [--docs 6]
"""

import argparse

import numpy as np
import torch

from longside.backbone import load_backbone
from longside.training.config import preset
from longside.training.data import DocumentStream, tokenized_books


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=6)
    p.add_argument("--layer", type=int, default=15)
    args = p.parse_args()
    bb = load_backbone("smollm2-135m")
    cfg = preset("smollm2-135m", synthetic_share=1.0, synthetic_max_segments=3)
    stream = DocumentStream(tokenized_books(bb, "validation"), cfg, bb.tokenizer)
    S, H, G = cfg.segment, bb.spec.num_heads, bb.spec.num_kv_heads
    fact = bb.tokenizer("\nThe pass key is", add_special_tokens=False).input_ids
    found = []
    for i in range(args.docs):
        ids, labels = stream._passkey(np.random.default_rng([7, i]))
        seq = ids.tolist()
        at = next(p for p in range(len(seq)) if seq[p:p + len(fact)] == fact)
        segs = torch.from_numpy(ids).view(-1, S)
        keys = torch.cat([bb.encode(s[None], memory_layer=args.layer).memory_keys[0] for s in segs[:-1]])
        chunks = keys.view(-1, 4, G, keys.shape[-1]).mean(1)  # [C, G, D]
        last = bb.encode(segs[-1][None], memory_layer=args.layer)
        answer = int((labels[-S:] != -100).nonzero()[0][0])
        q = last.memory_queries[0, answer - 1]  # the query that predicts the first digit, [H, D]
        wanted = set(range(at // 4, (at + 30) // 4 + 1))
        heads = sum(bool(wanted & set((chunks[:, h // (H // G)] @ q[h]).topk(16).indices.tolist()))
                    for h in range(H))
        found.append(heads)
        print(f"doc {i}: {len(chunks)} chunks in memory, fact at token {at}: "
              f"{heads}/{H} heads rank its chunk in their top 16")
    print(f"mean: {np.mean(found):.1f} of {H} heads")


if __name__ == "__main__":
    with torch.no_grad():
        main()

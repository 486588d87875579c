"""Where the backbone looks for a fact that is in its own window: per block and head.

Pass-key documents of two 1024-token segments (`longside.training.data.recall_document`, as
`memory_read_probe.py` builds them: the key stated once in the first segment, asked for at
the end of the second) are read whole by the bare backbone, the teacher of the distillation.
At each position that predicts an answer token, per block and head: the share of attention on
the key's sentence (`fact`) and on the whole first segment past its first 4 tokens (`far`,
what memory would hold). The side network reads memory at one block (`memory_layer`, 15);
this says which blocks and heads the teacher reads the fact with.

    python experiments/teacher_fact_attention.py --docs 8 --json results/teacher_fact_attention.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from longside.backbone import load_backbone
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.data import recall_document, tokenized_books

SINKS = 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    record = RunRecord.start(["python", "experiments/teacher_fact_attention.py", *sys.argv[1:]])
    backbone = load_backbone("smollm2-135m")
    tok, model, S = backbone.tokenizer, backbone.model, args.segment
    books = tokenized_books(backbone, "train")
    # attention weights are only returned by the eager implementation
    for m in model.modules():
        if getattr(getattr(m, "config", None), "_attn_implementation", None) is not None:
            m.config._attn_implementation = "eager"
    fact_sum = far_sum = None
    for d in range(args.docs):
        ids, labels = recall_document(tok, books, 2 * S, np.random.default_rng([args.seed, d]), fact_before=S)
        first = ids[:S].tolist()
        key = tok.decode(ids[S:][labels[S:] != -100]).strip(" .")
        fact = next(i for i in range(S) if tok.decode(first[i:i + 6]).strip().startswith("The pass key"))
        span = len(tok(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                       add_special_tokens=False).input_ids)
        with torch.no_grad():
            out = model(torch.from_numpy(ids)[None], output_attentions=True)
        answer = (torch.from_numpy(labels) != -100).nonzero().flatten() - 1
        att = torch.stack([a[0].float() for a in out.attentions])[:, :, answer]  # [L, H, answers, T]
        fact_share = att[..., fact:fact + span].sum(-1).mean(-1)  # [L, H]
        far_share = att[..., SINKS:S].sum(-1).mean(-1)
        fact_sum = fact_share if fact_sum is None else fact_sum + fact_share
        far_sum = far_share if far_sum is None else far_sum + far_share
    fact_mean, far_mean = fact_sum / args.docs, far_sum / args.docs
    blocks = [{"block": L, "fact": [round(float(x), 3) for x in fact_mean[L]],
               "far": [round(float(x), 3) for x in far_mean[L]]} for L in range(fact_mean.shape[0])]
    report = {"docs": args.docs, "segment": S, "seed": args.seed, "blocks": blocks, "provenance": record.finish()}
    for b in blocks:
        print(f"block {b['block']:2d}  fact max {max(b['fact']):.2f}  far mean {sum(b['far']) / len(b['far']):.2f}  "
              + " ".join(f"{x:.2f}" for x in b["fact"]))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()

"""What memory attention reads: per head, on the answer of pass-key documents.

Each document (`longside.training.data.recall_document`: real filler, a five-digit key stated
once, asked for at the end) is two segments: the first, holding the key, is written to
memory; the second, ending with the question and the answer, is read with memory attention
alone (token cache off). At each position that predicts an answer token, per head of the
memory layer:

- `w`: memory's share of the joint softmax, sigmoid(lse_mem - lse_local);
- `gap`: lse_mem - lse_local itself (the mean, each position's gap floored at -30, so a mean near -30
  is an upper bound; a head that retrieved nothing counts -30), what
  a bias on memory's log-sum-exp would have to make up for memory to get weight;
- `sink`: the share of the memory read that falls on the first 4 tokens of the written
  segment (the backbone's attention sinks);
- `fact`: the share on the key's sentence; `next`: on a token of the sentence equal to the
  token being predicted (a read that could copy it).

Rows: the checkpoint as shipped (position-free, every token written), with
`memory_sink_tokens` 4, with sinks 4 and `memory_distance` 768, and with those and the
reader's learned query correction zeroed (`reset_memory_query`: the backbone's own query). Positions of retrieved
tokens are recovered as the written token whose stored value is nearest (values are kept in
float16, so the nearest is the token itself).

    python experiments/memory_read_probe.py --docs 8 --json results/memory_read_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

import longside.nn.memory_attention as memory_attention
from longside.backbone import load_backbone
from longside.model import LongSideModel
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.data import recall_document, tokenized_books

SINKS = 4
SETTINGS = {"as shipped": (0, 0, False), "sinks 4": (4, 0, False), "sinks 4, distance 768": (4, 768, False),
            "sinks 4, distance 768, backbone query": (4, 768, True)}


def probe(model: LongSideModel, books, docs: int, segment: int, seed: int) -> dict:
    """Per-head means over every answer position of `docs` documents."""
    tok = model.backbone.tokenizer
    seen: dict = {}
    attend, local_lse = memory_attention.attend_retrieved, memory_attention.causal_lse

    def spy_attend(q, keys, values, mask):
        out = attend(q, keys, values, mask)
        seen.update(q=q, keys=keys, values=values, mask=mask, lse=out[1])
        return out

    def spy_local(*a, **kw):
        seen["local"] = local_lse(*a, **kw)
        return seen["local"]

    sums, n = {}, 0
    memory_attention.attend_retrieved, memory_attention.causal_lse = spy_attend, spy_local
    try:
        for d in range(docs):
            ids, labels = recall_document(tok, books, 2 * segment, np.random.default_rng([seed, d]),
                                          fact_before=segment)
            ids, labels = torch.from_numpy(ids)[None], torch.from_numpy(labels)[None]
            first = ids[0, :segment].tolist()
            key = tok.decode(ids[0, segment:][labels[0, segment:] != -100]).strip(" .")
            fact = next(i for i in range(segment) if tok.decode(first[i:i + 6]).strip().startswith("The pass key"))
            fact_span = range(fact, fact + len(tok(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                                                   add_special_tokens=False).input_ids))
            model.init_memory(1)
            with torch.no_grad():
                model(ids[:, :segment], use_memory=False, write_memory=True, return_logits=False)
                stored = model.encode(ids[:, :segment], False).memory_values[0].float()  # [S, G, D]
                model(ids[:, segment:], use_memory=True, write_memory=False, token_cache=False, return_logits=False)
            answer = (labels[0, segment:] != -100).nonzero().flatten() - 1  # positions predicting the answer
            H, G = seen["q"].shape[2], stored.shape[1]
            w = torch.sigmoid(seen["lse"] - seen["local"])[0, :, :, 0]  # [T, H]
            for t in answer.tolist():
                target = ids[0, segment + t + 1].item()
                row = {"w": w[t], "gap": (seen["lse"] - seen["local"])[0, t, :, 0].clamp(min=-30)}
                for part in ("sink", "fact", "next"):
                    row[part] = torch.zeros(H)
                for h in range(H):
                    m = seen["mask"][0, t, h]
                    if not bool(m.any()):
                        continue
                    scores = seen["q"][0, t, h] @ seen["keys"][0, t, h].T / seen["q"].shape[-1] ** 0.5
                    p = torch.softmax(scores.masked_fill(~m, float("-inf")), -1)
                    pos = torch.cdist(seen["values"][0, t, h], stored[:, h // (H // G)]).argmin(-1)
                    for s in m.nonzero().flatten().tolist():
                        at = pos[s].item()
                        row["sink"][h] += p[s] * (at < SINKS)
                        row["fact"][h] += p[s] * (at in fact_span)
                        row["next"][h] += p[s] * (at in fact_span and first[at] == target)
                for k, v in row.items():
                    sums[k] = sums.get(k, 0) + v
                n += 1
    finally:
        memory_attention.attend_retrieved, memory_attention.causal_lse = attend, local_lse
    return {k: [round(float(x), 4) for x in v / n] for k, v in sums.items()} | {"answer_positions": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the shipped one)")
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--json")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    record = RunRecord.start(["python", "experiments/memory_read_probe.py", *sys.argv[1:]])
    backbone = load_backbone("smollm2-135m")
    books = tokenized_books(backbone, "train")
    rows = {}
    for name in args.settings:
        sinks, distance, reset = SETTINGS[name]
        model = LongSideModel.from_pretrained(args.model, backbone=backbone)
        model.use_memory_sink_tokens(sinks)
        model.use_memory_distance(distance)
        if reset:
            model.reset_memory_query()
        rows[name] = probe(model, books, args.docs, args.segment, args.seed)
        print(name, json.dumps(rows[name]), file=sys.stderr)
    report = {"docs": args.docs, "segment": args.segment, "seed": args.seed, "model": args.model or "shipped",
              "rows": rows, "provenance": record.finish()}
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}, indent=1))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()

"""The ceiling of one memory layer: train the side network with a perfect read there.

    python experiments/oracle_train.py [--minutes 25] [--segments 4] [--json PATH]

`oracle_read.py` showed the shipped side network ignores what its memory reader adds (even
the teacher's own change at block 15 moves its perplexity by 0.00%). Is that the training or
the design? Here the reader's output (its input to `into_side`) is replaced, on every
segment after a document's first, by the teacher's change at the memory layer
(`attn_delta`: what a perfect reader would add), and the shipped side network is trained
further with that in place: next-token loss plus the distillation's mse and kl toward the
teacher (training/teacher.py), token cache off, lr 5e-4 for `--minutes` of wall time, on the
first `--segments` x 1024 tokens of training books (later passes move on in each book).
Before and after, on `--eval-docs` stretches of the validation books: the side network with
memory off, with its own memory read and with the oracle read. The gap after training is what a single memory layer
at block 15 could give if the reader matched the teacher there; the 'memory off' row after
training shows what the training alone did.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from longside.model import LongSideModel
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.data import tokenized_books
from longside.training.teacher import TeacherTargets, distill_terms, stack_targets


def _docs(books: list[np.ndarray], length: int, limit: int | None = None, passes: int = 1) -> list[np.ndarray]:
    out = []
    for p in range(passes):  # pass p reads the p-th stretch of each book long enough
        out += [b[p * length:(p + 1) * length].astype(np.int64) for b in books if len(b) >= (p + 1) * length]
    return out[:limit] if limit else out


def _oracle(model: LongSideModel, delta: torch.Tensor | None):
    """Replace the reader's output by `delta [1, T, d]` (None: leave the reader alone)."""
    if delta is None:
        return None
    return model.side.reader.into_side.register_forward_pre_hook(lambda _m, _a: (delta,))


@torch.no_grad()
def evaluate(model: LongSideModel, teacher: TeacherTargets, docs: list[np.ndarray], S: int) -> dict:
    tot = {"memory off": [0.0, 0], "oracle read": [0.0, 0], "memory read": [0.0, 0]}
    for doc in docs:
        target, ids = teacher.document(doc), torch.from_numpy(doc)
        model.reset_memory()
        for i in range(len(doc) // S):
            seg = ids[None, i * S:(i + 1) * S]
            if i:
                for row, use, delta in (("memory off", False, None), ("memory read", True, None),
                                        ("oracle read", True, target.attn_delta[None, i * S:(i + 1) * S].float())):
                    hook = _oracle(model, delta)
                    try:
                        out = model(seg, labels=seg, use_memory=use, write_memory=False, return_logits=False)
                    finally:
                        if hook is not None:
                            hook.remove()
                    tot[row][0] += out.loss.item() * out.n_tokens
                    tot[row][1] += out.n_tokens
            model(seg, use_memory=i > 0, write_memory=True, return_logits=False)
    return {k: math.exp(v[0] / v[1]) for k, v in tot.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=25)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--eval-docs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--json")
    args = ap.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start()
    torch.manual_seed(0)
    model = LongSideModel.from_pretrained()
    model.drop_token_cache()
    bb, S = model.backbone, 1024
    L = S * args.segments
    teacher = TeacherTargets(None, bb, window=L, segment=S, top_k=16, memory_layer=model.config.memory_layer)
    val = _docs(tokenized_books(bb, "validation"), L, passes=8)
    val = val[:: max(1, len(val) // args.eval_docs)][: args.eval_docs]
    train_docs = _docs(tokenized_books(bb, "train"), L, passes=4)
    np.random.default_rng(0).shuffle(train_docs)
    before = evaluate(model, teacher, val, S)
    print("before", before, flush=True)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr, weight_decay=0.01)
    t0, steps, docs_seen, hist = time.time(), 0, 0, []
    while time.time() - t0 < 60 * args.minutes and docs_seen < len(train_docs):
        doc = train_docs[docs_seen]
        docs_seen += 1
        target, ids = teacher.document(doc), torch.from_numpy(doc)
        model.reset_memory()
        with torch.no_grad():
            model(ids[None, :S], use_memory=False, write_memory=True, return_logits=False)
        for i in range(1, args.segments):
            seg = ids[None, i * S:(i + 1) * S]
            part = stack_targets([target.segment(i, S)])
            hook = _oracle(model, part.attn_delta)
            try:
                out, h, tok_keys, hits = model.read_segment(seg, use_memory=True)
            finally:
                hook.remove()
            lm, _ = model.lm_loss(h, seg, hits)
            terms = distill_terms(bb, h, out.hidden_states[-1], part)
            loss = lm + terms["mse"] + terms["kl"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.write_segment(out, seg, tok_keys)
            steps += 1
            hist.append({"step": steps, "lm": lm.item(), "mse": terms["mse"].item(), "kl": terms["kl"].item()})
        if docs_seen % 10 == 0:
            print(f"{docs_seen} docs, {steps} steps, {time.time() - t0:.0f} s, last lm {hist[-1]['lm']:.3f} "
                  f"mse {hist[-1]['mse']:.3f}", flush=True)
    train_s = time.time() - t0
    after = evaluate(model, teacher, val, S)
    print("after", after, flush=True)
    result = {"before": before, "after": after, "steps": steps, "docs": docs_seen, "train_s": round(train_s, 1),
              "segments": args.segments, "lr": args.lr, "eval_docs": len(val), "history": hist, "run": run.finish()}
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()

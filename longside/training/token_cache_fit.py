"""Fitting the token cache's 14 numbers (`TokenCacheReader`) on validation books and
synthetic recall and many-shot classification documents, with the backbone and side
network frozen: read the data once (`read_cache_data`), then fit (`fit_reader`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from longside.errors import LongsideError
from longside.nn.token_cache import COPY_FEATURES, FEATURES, SPREAD_FEATURES, TokenCacheReader, TokenHits, target_terms
from longside.training.data import recall_document

# fact and question templates of the recall tasks `fit_token_cache` can add; deliberately
# not the pass-key wording of `longside eval passkey`, which stays a held-out test
RECALL_TEMPLATES = (
    ("\nThe secret code is {key}. Keep it safe: {key} is the secret code.\n",
     "\nWhat is the secret code? The secret code is"),
    ("\nMy locker number is {key}. Do not forget, {key} is my locker number.\n",
     "\nWhich is my locker number? My locker number is"),
    ("\nThe vault opens with the number {key}.\n", "\nAnd so the vault opens with the number"),
    ("\nNote for later: the ticket number is {key}.\n", "\nQuestion: what was the ticket number? Answer: the ticket number is"),
)


def recall_tasks(tokenizer, books, n: int, window: int, seed: int = 0) -> list[tuple]:
    """`n` synthetic recall documents (train.recall_document) in filler from `books`, with
    the RECALL_TEMPLATES and 4-7 digit numbers, 2-4 windows long, the fact always before
    the last window (so only memory can supply it)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        w = int(rng.integers(2, 5))
        docs.append(recall_document(tokenizer, books, w * window, rng, fact_before=(w - 1) * window,
                                    template=RECALL_TEMPLATES[i % len(RECALL_TEMPLATES)],
                                    digits=int(rng.integers(4, 8))))
    return docs


def fit_token_cache(model, books, segments: int = 12, steps: int = 400, lr: float = 0.05,
                    tasks: list[tuple] = (), progress: bool = True, classify: list[tuple] = ()) -> dict:
    """Fit the reader's parameters on `books` (token id arrays, never test books), optional
    recall `tasks` and many-shot `classify` documents ((ids, labels) such as `recall_tasks`
    and `fit_tasks.classification_tasks`; labels -100 unscored): `read_cache_data`, then
    `fit_reader`. Returns perplexities before/after per group."""
    reader: TokenCacheReader = model.side.token_reader
    if reader is None:
        raise LongsideError("this model has no token cache (config.token_cache is False)")
    data = read_cache_data(model, books, segments, tasks, progress, classify)
    report = fit_reader(reader, data, steps, lr, progress)
    report.update(books=len(books), **({"tasks": len(tasks)} if tasks else {}),
                  **({"classify_docs": len(classify)} if classify else {}))
    return report


def read_cache_data(model, books, segments: int = 12, tasks: list[tuple] = (), progress: bool = True,
                    classify: list[tuple] = ()) -> dict:
    """What fitting the reader needs, per group ("books", "tasks", "classify"): (hits `[N, ...]`,
    target, its log-prob, entropy, max log-prob `[N]`) of every scored token after a
    document's first segment.

    Each document streams through `model` in segments of `model.config.window` tokens with
    a fresh memory, exactly as evaluation does (books: their first `segments` segments)."""
    W = model.config.window
    docs = [("books", np.asarray(b[:segments * W], dtype=np.int64), None) for b in books if len(b) >= W]
    docs += [(g, np.asarray(i, dtype=np.int64), np.asarray(lab, dtype=np.int64))
             for g, group in (("tasks", tasks), ("classify", classify)) for i, lab in group]
    model.init_memory(1)
    rows: dict[str, list] = {"books": [], "tasks": [], "classify": []}
    total = sum(-(-len(d) // W) for _, d, _ in docs)
    with torch.no_grad(), tqdm(total=total, desc="fit token cache: read", unit="seg", disable=not progress) as bar:
        for group, doc, labels in docs:
            model.reset_memory()
            for i in range(0, len(doc), W):
                ids = torch.from_numpy(doc[i:i + W])[None]
                lab = ids if labels is None else torch.from_numpy(labels[i:i + W])[None]
                keep = lab[0, 1:] != -100
                out, h, keys, hits = model.read_segment(ids, use_memory=bool(keep.any()))
                if hits is not None:
                    logits = model.backbone.lm_head(model.backbone.final_norm(h[0, :-1][keep]))
                    target = lab[0, 1:][keep].to(logits.device)
                    row = (hits.map(lambda x: x[0, :-1][keep]), target, *target_terms(logits, target))
                    if group == "classify":  # the document's label words: the choice a prediction makes
                        row += _candidates(logits, torch.from_numpy(np.unique(labels[labels != -100])))
                    rows[group].append(row)
                model.write_segment(out, ids, keys)
                bar.update(1)
    model.reset_memory()
    if not rows["books"]:
        raise LongsideError("no book is longer than one window: nothing to fit the token cache on")
    return {g: _stack_rows(r) for g, r in rows.items() if r}


def fit_reader(reader: TokenCacheReader, data: dict, steps: int = 400, lr: float = 0.05,
               progress: bool = True) -> dict:
    """Adam on the reader's parameters: the mean negative log-likelihood of the mixture over
    book tokens, plus, when `data` has "classify" documents, the mean NLL of the right
    label among the document's label words (what a classifier by label likelihood
    decides on: the gate learns where earlier demonstrations predict the label better
    than the model, not merely that label words are likely), plus, when `data` has
    tasks, a hinge over the task answers' log-probabilities: mean(max(-log p, log 2)).
    An answer at probability >= 1/2 is what greedy decoding produces, and beyond that a
    task no longer pulls the gate open, so the books pay as little as possible for it
    (the plain task NLL drove task perplexity to 1.03 at a 4% book-perplexity cost; the
    hinge costs 1% for 99% of answers above 1/2, on the data of `longside fit-cache`).
    Each group weighs as much in all: 45k book tokens must not drown a few hundred
    answers."""
    def nll(g: str) -> torch.Tensor:
        hits, target, lpt, ent, lpmax = data[g][:5]
        return -reader.log_prob(hits, target, lpt, ent, lpmax).mean()

    def choice(reader_on: bool = True):
        """Log-probabilities `[N, 8]` of each classify position's label words, renormalised
        over them (-inf at padding): the mixture's, or the model's alone."""
        hits, target, lpt, ent, lpmax, cands, lpc = data["classify"]
        if reader_on:
            m = torch.stack([reader.log_prob(hits, cands[:, c].clamp_min(0), lpc[:, c], ent, lpmax)
                             for c in range(cands.shape[1])], 1)
        else:
            m = lpc
        m = m.masked_fill(cands < 0, float("-inf"))
        return m - m.logsumexp(1, keepdim=True)

    def choice_nll() -> torch.Tensor:
        hits, target, *_, cands, _ = data["classify"]
        return -choice()[cands == target[:, None]].mean()

    def hinge() -> torch.Tensor:
        hits, target, lpt, ent, lpmax = data["tasks"]
        return (-reader.log_prob(hits, target, lpt, ent, lpmax)).clamp_min(math.log(2)).mean()

    before = {g: math.exp(-d[2].mean().item()) for g, d in data.items()}
    opt = torch.optim.Adam(reader.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="fit token cache: gate", disable=not progress):
        loss = nll("books") + (hinge() if "tasks" in data else 0.0) + (choice_nll() if "classify" in data else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = {g: math.exp(nll(g).item()) for g in data}
    hits = data["books"][0]
    report = {"tokens": int(hits.sims.shape[0]), "ppl_model": before["books"], "ppl_with_cache": after["books"],
              "temperature": reader.log_tau.exp().item(), "gate": dict(zip(FEATURES, reader.gate.tolist()))}
    if reader.spread:
        report["spread_gate"] = dict(zip(SPREAD_FEATURES, reader.spread_gate.tolist()))
    if reader.copy:
        report.update(copy_scale=reader.copy_log_scale.exp().item(),
                      copy_gate=dict(zip(COPY_FEATURES, reader.copy_gate.tolist())),
                      matched_share=float((hits.copy_len > 0).any(-1).float().mean()))
    if "classify" in data:
        target, cands = data["classify"][1], data["classify"][5]
        with torch.no_grad():
            acc = {k: (cands.gather(1, choice(on).argmax(1, keepdim=True))[:, 0] == target).float().mean().item()
                   for k, on in (("model", False), ("with_cache", True))}
        report.update(classify_tokens=int(target.numel()), classify_accuracy_model=acc["model"],
                      classify_accuracy_with_cache=acc["with_cache"])
    if "tasks" in data:
        hits, target, lpt, ent, lpmax = data["tasks"]
        with torch.no_grad():
            half = (reader.log_prob(hits, target, lpt, ent, lpmax) > math.log(0.5)).float().mean().item()
        report.update(task_tokens=int(target.numel()), task_ppl_model=before["tasks"],
                      task_ppl_with_cache=after["tasks"], task_share_above_half=half,
                      task_share_above_half_model=(lpt > math.log(0.5)).float().mean().item())
    return report


def _candidates(logits: torch.Tensor, words: torch.Tensor, width: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate label ids `[N, width]` (-1 = padding) and the model's log-probabilities of
    them `[N, width]` (-1e4 at padding: finite, so the mixture over a padded slot has no
    NaN gradient; the fit masks them), for logits `[N, V]` and label ids `words [L]`."""
    if len(words) > width:
        raise LongsideError(f"a classification document has {len(words)} labels; at most {width} are supported")
    lp = torch.log_softmax(logits.float(), -1)[:, words.to(logits.device)]
    pad = width - len(words)
    N = logits.shape[0]
    cands = torch.cat([words.to(logits.device).expand(N, -1), words.new_full((N, pad), -1).to(logits.device)], 1)
    return cands, torch.cat([lp, lp.new_full((N, pad), -1e4)], 1)


def _stack_rows(rows: list[tuple]) -> tuple:
    """Concatenate kept (hits, target, lp_target, entropy, max lp[, candidates, their lp])
    rows along tokens."""
    k = min(r[0].sims.shape[1] for r in rows)  # the first segments may have had fewer neighbours
    hits = TokenHits(*(torch.cat([getattr(r[0], f)[:, :k] if f in ("sims", "nxt") else getattr(r[0], f)
                                  for r in rows]) for f in ("sims", "nxt", "copy_len", "copy_nxt")))
    return (hits, *(torch.cat([r[j] for r in rows]) for j in range(1, len(rows[0]))))

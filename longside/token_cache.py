"""The token-cache read of memory: a copy distribution mixed into the output.

Memory attention (side_network.MemoryReader) must be trained to move what it reads into
the logits, and 0.9M tokens of CPU training did not teach it (README). This second read
path needs almost no training: every memorized token t is also stored as its unit-norm
backbone hidden state h_t at depth `token_depth` with the token that followed it
(memory_bank.TokenMemory), as in the continuous cache (Grave et al., 2017) and kNN-LM
(Khandelwal et al., 2020). For a position with hidden state q, the `token_k` most
similar stored contexts vote for their next tokens:

    w_j = softmax_j(sim(q, h_j) / tau)                       over the k neighbours
    p_cache(v) = sum_j w_j [x_{j+1} = v]
    lam = sigmoid(g . [1, sim_1, H(p_lm), max log p_lm, agree])   per position
    p(v) = (1 - lam) p_lm(v) + lam p_cache(v)

sim_1 is the best similarity, H the model's entropy, agree the weight of neighbours
that predict the same token as the best one: the gate trusts the cache where a stored
context is close and unanimous, and where the model itself is unsure. With `spread` on,
the gate also sees s = log(distinct tokens the neighbours predict) / log k and s * sim_1:
where they choose among a few tokens (the label words after many demonstrations) the
vote is worth trusting even when it is split. With an empty memory lam = 0 and p is the
model's distribution exactly.

With `copy` on, a second source joins: exact matches of the text that ends at the
position (memory_bank.TokenMemory.match: the most recent stored places where the last n
tokens occurred, n up to 32, and how many tokens the match really runs back). Their next
tokens vote with weights softmax(beta * match length), and a second gate
c . [1, log(1 + longest match), agree, H, max log p] decides how far to trust them. The
three sources mix by a softmax over [0, gate logit, copy gate logit] (a source without
candidates gets -inf), so without copy hits the mixture is exactly the one above.

`tau`, beta and the gates (14 numbers) are the only parameters. `fit_token_cache` fits
them on validation books and, optionally, synthetic recall documents and many-shot
classification documents (fit_tasks.py); they also train with the side network
(`longside train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from longside.errors import LongsideError

FEATURES = ("bias", "top_similarity", "lm_entropy", "lm_max_log_prob", "agreement")
SPREAD_FEATURES = ("vote_spread", "vote_spread_x_top_similarity")
COPY_FEATURES = ("bias", "log_match_length", "agreement", "lm_entropy", "lm_max_log_prob")


@dataclass
class TokenHits:
    """What the token memory returned for each query position (leading dims `...`, e.g. [B, T]).

    sims `[..., k]` float32: cosine similarity of the nearest stored contexts, best first,
    -inf where there is none; nxt `[..., k]` int64: the token that followed each.
    copy_len `[..., c]` int64: exact match lengths (0 = no candidate); copy_nxt `[..., c]`
    int64: the token that followed each match (c = 0 without the copy read)."""

    sims: torch.Tensor
    nxt: torch.Tensor
    copy_len: torch.Tensor
    copy_nxt: torch.Tensor

    def map(self, fn) -> "TokenHits":
        """The same hits with `fn` applied to each tensor (slicing, flattening, masking)."""
        return TokenHits(fn(self.sims), fn(self.nxt), fn(self.copy_len), fn(self.copy_nxt))


def _agreement(w: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """Weight `[N]` of the candidates that predict what the heaviest one predicts."""
    top = nxt.gather(-1, w.argmax(-1, keepdim=True))
    return (w * (nxt == top)).sum(-1)


def _vote_spread(nxt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log(distinct next tokens among the valid neighbours) / log(k), `[N]` in [0, 1]: 0
    where they all predict one token, small where they choose among a few (the label
    words of a many-shot prompt), near 1 in running text."""
    s = torch.where(valid, nxt, -1).sort(-1).values
    distinct = (s.diff(dim=-1) != 0).sum(-1) + 1 - (s[:, 0] < 0).long()
    return distinct.clamp_min(1).float().log() / math.log(max(2, nxt.shape[-1]))


class TokenCacheReader(nn.Module):
    """Mixes the votes of retrieved (context, next token) pairs, and with `copy` of exact
    matches, into the output distribution."""

    def __init__(self, temperature: float = 0.03, copy: bool = False, spread: bool = False):
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)))
        # until fitted: trust the cache only where a stored context is nearly identical
        self.gate = nn.Parameter(torch.tensor([-9.0, 6.5, 0.0, 0.0, 2.5]))
        self.spread = spread
        if spread:  # zero: no effect until fitted
            self.spread_gate = nn.Parameter(torch.zeros(len(SPREAD_FEATURES)))
        self.copy = copy
        if copy:
            self.copy_log_scale = nn.Parameter(torch.tensor(0.0))
            # until fitted: trust a unanimous match of about 8 tokens or more
            self.copy_gate = nn.Parameter(torch.tensor([-6.0, 2.0, 2.0, 0.0, 0.0]))

    def _mixture(self, hits: TokenHits, ent: torch.Tensor, lpmax: torch.Tensor):
        """hits `[N, ...]`, model entropy and max log-prob `[N]` -> log mixture weights
        `[N, 3]` (model, neighbours, matches) and the vote weights `[N, k]`, `[N, c]`."""
        sims, nxt = hits.sims, hits.nxt
        N = ent.shape[0]
        ninf = ent.new_full((N,), float("-inf"))
        if sims.shape[-1]:
            valid = torch.isfinite(sims[:, 0])  # best first: padding (-inf) only at the end
            s = torch.where(valid[:, None], sims, 0.0)  # rows without neighbours: no NaN, weight 0 below
            wk = torch.softmax(s / self.log_tau.exp(), -1) * valid[:, None]
            x = torch.stack([torch.ones_like(ent), s[:, 0], ent, lpmax, _agreement(wk, nxt)], -1)
            a = x @ self.gate
            if self.spread:
                sp = _vote_spread(nxt, valid[:, None] & torch.isfinite(sims))
                a = a + torch.stack([sp, sp * s[:, 0]], -1) @ self.spread_gate
            a_knn = torch.where(valid, a, ninf)
        else:
            wk, a_knn = sims, ninf
        lens = hits.copy_len
        if self.copy and lens.shape[-1]:
            has = lens > 0
            valid = has.any(-1)
            z = torch.where(has, self.copy_log_scale.exp() * lens, float("-inf"))
            wc = torch.softmax(torch.where(valid[:, None], z, 0.0), -1) * has
            longest = torch.log1p(lens.max(-1).values.float())
            y = torch.stack([torch.ones_like(ent), longest, _agreement(wc, hits.copy_nxt), ent, lpmax], -1)
            a_copy = torch.where(valid, y @ self.copy_gate, ninf)
        else:
            wc, a_copy = ent.new_zeros(N, 0), ninf  # no copy read: no votes
        log_pi = torch.log_softmax(torch.stack([torch.zeros_like(ent), a_knn, a_copy], -1), -1)
        return log_pi, wk, wc

    def mix(self, logits: torch.Tensor, hits: TokenHits) -> torch.Tensor:
        """logits `[N, V]`, hits with leading dim N -> logits `[N, V]` float32 of the mixed
        distribution, offset so that they equal the input logits wherever memory is
        silent (no neighbour, no match): samplers and logit processors (repetition
        penalty, ...) then behave exactly as on the backbone's logits.

        Only the k + c tokens that received a vote are computed in full (as `log_prob`
        does for a target); every other token keeps the model's share, log pi_model + its
        log-probability, without a dense `[N, V]` vote tensor."""
        logits = logits.float()
        lse = logits.logsumexp(-1, keepdim=True)
        lp = logits - lse
        ent = -(lp.exp() * lp).sum(-1)
        log_pi, wk, wc = self._mixture(hits, ent, lp.max(-1).values)
        voted = torch.cat([hits.nxt, hits.copy_nxt], -1).clamp_min(0)  # [N, k + c], padding -> token 0, weight 0
        terms = [log_pi[:, :1] + lp.gather(1, voted)]
        for j, (w, nxt) in enumerate(((wk, hits.nxt), (wc, hits.copy_nxt)), 1):
            if w.shape[-1]:
                vote = (w[:, None, :] * (nxt.clamp_min(0)[:, None, :] == voted[:, :, None])).sum(-1)
                terms.append(log_pi[:, j:j + 1] + vote.clamp_min(1e-30).log())
        at_voted = torch.stack(terms).logsumexp(0) + lse
        mixed = (logits + log_pi[:, :1]).scatter_(1, voted, at_voted)
        return torch.where(log_pi[:, :1] < 0, mixed, logits)

    def log_prob(self, hits: TokenHits, target: torch.Tensor, lp_target: torch.Tensor,
                 ent: torch.Tensor, lpmax: torch.Tensor) -> torch.Tensor:
        """The mixed log-probability of `target [N]` from precomputed model quantities
        (its log-prob, entropy and max log-prob, each `[N]`): what `mix` gives at the
        target, without `[N, V]` tensors. Used for the training loss and the fit."""
        log_pi, wk, wc = self._mixture(hits, ent, lpmax)
        terms = [log_pi[:, 0] + lp_target]
        for j, (w, nxt) in enumerate(((wk, hits.nxt), (wc, hits.copy_nxt)), 1):
            if w.shape[-1]:
                vote = (w * (nxt == target[:, None])).sum(-1)
                terms.append(log_pi[:, j] + vote.clamp_min(1e-30).log())
        return torch.stack(terms).logsumexp(0)


def target_terms(logits: torch.Tensor, target: torch.Tensor):
    """What the gate and `TokenCacheReader.log_prob` need of the model at each target:
    logits `[N, V]`, target `[N]` -> its log-probability `[N]` (differentiable), and the
    entropy and max log-probability `[N]` (gate features, no gradient)."""
    lp = torch.log_softmax(logits.float(), -1)
    with torch.no_grad():
        ent = -(lp.exp() * lp).sum(-1)
        lpmax = lp.max(-1).values
    return lp.gather(1, target[:, None])[:, 0], ent, lpmax


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
    import numpy as np

    from longside.train import recall_document

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
    import numpy as np
    from tqdm.auto import tqdm

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
                out, h, keys, hits = model._read(ids, use_memory=bool(keep.any()))
                if hits is not None:
                    logits = model.backbone.lm_head(model.backbone.final_norm(h[0, :-1][keep]))
                    target = lab[0, 1:][keep].to(logits.device)
                    row = (hits.map(lambda x: x[0, :-1][keep]), target, *target_terms(logits, target))
                    if group == "classify":  # the document's label words: the choice a prediction makes
                        row += _candidates(logits, torch.from_numpy(np.unique(labels[labels != -100])))
                    rows[group].append(row)
                model._write(out, ids, keys)
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
    from tqdm.auto import tqdm

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

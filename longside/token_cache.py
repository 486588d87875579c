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
context is close and unanimous, and where the model itself is unsure. `tau` and the 5
gate weights are the only parameters (`fit_token_cache` fits them on the validation
books; they also train with the side network). With an empty memory lam = 0 and p is
the model's distribution exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from longside.errors import LongsideError

FEATURES = ("bias", "top_similarity", "lm_entropy", "lm_max_log_prob", "agreement")


class TokenCacheReader(nn.Module):
    """Mixes the copy distribution of retrieved (context, next token) pairs into the output."""

    def __init__(self, temperature: float = 0.03):
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)))
        # until fitted: trust the cache only where a stored context is nearly identical
        self.gate = nn.Parameter(torch.tensor([-9.0, 6.5, 0.0, 0.0, 2.5]))

    def _weights(self, sims: torch.Tensor, nxt: torch.Tensor):
        """sims, nxt `[..., k]` -> neighbour weights `[..., k]`, valid `[...]`, agreement `[...]`."""
        valid = torch.isfinite(sims[..., 0])  # best first: padding (-inf) only at the end
        s = torch.where(valid[..., None], sims, 0.0)  # rows without neighbours: no NaN, weight 0 below
        w = torch.softmax(s / self.log_tau.exp(), -1) * valid[..., None]
        agree = (w * (nxt == nxt[..., :1])).sum(-1)
        return w, valid, agree, s[..., 0]

    def _lambda(self, top: torch.Tensor, ent: torch.Tensor, lpmax: torch.Tensor, agree: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        x = torch.stack([torch.ones_like(top), top, ent, lpmax, agree], -1)
        return torch.sigmoid(x @ self.gate) * valid

    def mix(self, logits: torch.Tensor, sims: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """logits `[N, V]`, sims/nxt `[N, k]` (sims -inf = no neighbour) -> logits `[N, V]`
        float32 of the mixed distribution, offset so that they equal the input logits
        wherever the cache is silent (lam = 0): samplers and logit processors (repetition
        penalty, ...) then behave exactly as on the backbone's logits."""
        logits = logits.float()
        if sims.shape[-1] == 0:
            return logits
        lse = logits.logsumexp(-1, keepdim=True)
        lp = logits - lse
        w, valid, agree, top = self._weights(sims, nxt)
        ent = -(lp.exp() * lp).sum(-1)
        lam = self._lambda(top, ent, lp.max(-1).values, agree, valid)[:, None]
        p_cache = torch.zeros_like(lp).scatter_add_(1, nxt.clamp_min(0), w)
        mixed = torch.logaddexp(torch.log1p(-lam.clamp(max=1 - 1e-6)) + lp,
                                lam.clamp_min(1e-30).log() + p_cache.clamp_min(1e-30).log())
        return torch.where(lam > 0, mixed + lse, logits)

    def log_prob(self, sims: torch.Tensor, nxt: torch.Tensor, target: torch.Tensor, lp_target: torch.Tensor,
                 ent: torch.Tensor, lpmax: torch.Tensor) -> torch.Tensor:
        """The mixed log-probability of `target [N]` from precomputed model quantities
        (its log-prob, entropy and max log-prob, each `[N]`): what `mix` gives at the
        target, without `[N, V]` tensors. Used to fit the reader."""
        if sims.shape[-1] == 0:
            return lp_target
        w, valid, agree, top = self._weights(sims, nxt)
        lam = self._lambda(top, ent, lpmax, agree, valid)
        p_cache = (w * (nxt == target[:, None])).sum(-1)
        # log((1 - lam) p + lam c), stable when p underflows: logaddexp of the two terms
        return torch.logaddexp(torch.log1p(-lam.clamp(max=1 - 1e-6)) + lp_target,
                               lam.clamp_min(1e-30).log() + p_cache.clamp_min(1e-30).log())


def target_terms(logits: torch.Tensor, target: torch.Tensor):
    """What the gate and `TokenCacheReader.log_prob` need of the model at each target:
    logits `[N, V]`, target `[N]` -> its log-probability `[N]` (differentiable), and the
    entropy and max log-probability `[N]` (gate features, no gradient)."""
    lp = torch.log_softmax(logits.float(), -1)
    with torch.no_grad():
        ent = -(lp.exp() * lp).sum(-1)
        lpmax = lp.max(-1).values
    return lp.gather(1, target[:, None])[:, 0], ent, lpmax


def fit_token_cache(model, books, segments: int = 12, steps: int = 400, lr: float = 0.05,
                    progress: bool = True) -> dict:
    """Fit the reader's temperature and gate on `books` (token id arrays, never test books).

    Each book streams through `model` in segments of `model.config.window` tokens with a
    fresh memory, exactly as evaluation does; for every token of segments 2.. the model's
    log-probability of the truth, its entropy and max log-probability and the cache's
    neighbours are kept; then the 6 reader parameters are fitted by Adam on the mean
    negative log-likelihood of the mixture. Returns perplexities before/after on that data.
    """
    import numpy as np
    from tqdm.auto import tqdm

    reader: TokenCacheReader = model.side.token_reader
    if reader is None:
        raise LongsideError("this model has no token cache (config.token_cache is False)")
    W = model.config.window
    model.init_memory(1)
    rows: list[tuple[torch.Tensor, ...]] = []
    total = sum(min(segments, len(b) // W) for b in books)
    with torch.no_grad(), tqdm(total=total, desc="fit token cache: read", unit="seg", disable=not progress) as bar:
        for book in books:
            model.reset_memory()
            for i in range(min(segments, len(book) // W)):
                ids = torch.from_numpy(np.asarray(book[i * W:(i + 1) * W], dtype=np.int64))[None]
                out, h, keys, hits = model._read(ids, use_memory=True)
                if hits is not None:
                    logits = model.backbone.lm_head(model.backbone.final_norm(h[0, :-1]))
                    target = ids[0, 1:].to(logits.device)
                    rows.append((hits[0][0, :-1], hits[1][0, :-1], target, *target_terms(logits, target)))
                model._write(out, ids, keys)
                bar.update(1)
    model.reset_memory()
    if not rows:
        raise LongsideError("no book is longer than one window: nothing to fit the token cache on")
    k = min(r[0].shape[1] for r in rows)
    sims, nxt, target, lpt, ent, lpmax = (torch.cat([r[j][:, :k] if j < 2 else r[j] for r in rows])
                                          for j in range(6))

    def nll() -> torch.Tensor:
        return -reader.log_prob(sims, nxt, target, lpt, ent, lpmax).mean()

    before = math.exp(-lpt.mean().item())
    opt = torch.optim.Adam(reader.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="fit token cache: gate", disable=not progress):
        loss = nll()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = math.exp(nll().item())
    return {"tokens": int(target.numel()), "books": len(books), "ppl_model": before, "ppl_with_cache": after,
            "temperature": reader.log_tau.exp().item(), "gate": dict(zip(FEATURES, reader.gate.tolist()))}

"""The token-cache read of memory: a copy distribution mixed into the output.

Memory attention (side_network.MemoryReader) must be trained to move what it reads into
the logits, and 0.9M tokens of CPU training did not teach it (docs/results.md). This second read
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

`tau`, beta and the gates (14 numbers) are the only parameters. `longside.training.token_cache_fit` fits
them on validation books and, optionally, synthetic recall documents and many-shot
classification documents (fit_tasks.py); they also train with the side network
(`longside train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from longside.kernels import ggml_cpu

FEATURES = ("bias", "top_similarity", "lm_entropy", "lm_max_log_prob", "agreement")
SPREAD_FEATURES = ("vote_spread", "vote_spread_x_top_similarity")
COPY_FEATURES = ("bias", "log_match_length", "agreement", "lm_entropy", "lm_max_log_prob")
# up to this many rows of a decode step (one per user) `mix` runs in one C call; segment reads
# (evaluations, training) keep the torch code and its published numbers
C_MIX_MAX_ROWS = 64


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
    """log(distinct next tokens among the valid neighbours) / log(valid neighbours), `[N]`
    in [0, 1]: 0 where they all predict one token, small where they choose among a few
    (the label words of a many-shot prompt), near 1 in running text. Padding slots
    (`valid` False) change nothing, so a batch row's value never depends on the others."""
    s = torch.where(valid, nxt, -1).sort(-1).values
    distinct = (s.diff(dim=-1) != 0).sum(-1) + 1 - (s[:, 0] < 0).long()
    return distinct.clamp_min(1).float().log() / valid.sum(-1).clamp_min(2).float().log()


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

    def mix(self, logits: torch.Tensor, hits: TokenHits, decode: bool = False) -> torch.Tensor:
        """logits `[N, V]`, hits with leading dim N -> logits `[N, V]` float32 of the mixed
        distribution, offset so that they equal the input logits wherever memory is
        silent (no neighbour, no match): samplers and logit processors (repetition
        penalty, ...) then behave exactly as on the backbone's logits.

        Only the k + c tokens that received a vote are computed in full (as `log_prob`
        does for a target); every other token keeps the model's share, log pi_model + its
        log-probability, without a dense `[N, V]` vote tensor. `decode`: the rows are a
        decode step's (one position per row); up to `C_MIX_MAX_ROWS` of them without gradient on
        the CPU take one C call that does all of it (`ggml_cpu.token_cache_mix`)."""
        if decode and logits.shape[0] <= C_MIX_MAX_ROWS and not (torch.is_grad_enabled() and (
                logits.requires_grad or any(p.requires_grad for p in self.parameters()))) \
                and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous() \
                and ggml_cpu.decode_in_c():
            return ggml_cpu.token_cache_mix(logits, hits.sims.float().contiguous(), hits.nxt.contiguous(),
                                            hits.copy_len.contiguous(), hits.copy_nxt.contiguous(),
                                            self._c_params(), self.spread, self.copy)
        logits = logits.float()
        lse, ent, lpmax = _logit_stats(logits)
        log_pi, wk, wc = self._mixture(hits, ent, lpmax)
        voted = torch.cat([hits.nxt, hits.copy_nxt], -1).clamp_min(0)  # [N, k + c], padding -> token 0, weight 0
        at_model = logits.gather(1, voted)
        terms = [log_pi[:, :1] + (at_model - lse)]
        for j, (w, nxt) in enumerate(((wk, hits.nxt), (wc, hits.copy_nxt)), 1):
            if w.shape[-1]:
                vote = (w[:, None, :] * (nxt.clamp_min(0)[:, None, :] == voted[:, :, None])).sum(-1)
                terms.append(log_pi[:, j:j + 1] + vote.clamp_min(1e-30).log())
        at_voted = torch.stack(terms).logsumexp(0) + lse
        # where memory is silent log pi_model is exactly 0: logits + 0 and the model's own
        # values at the voted tokens give those rows' logits bit for bit
        at_voted = torch.where(log_pi[:, :1] < 0, at_voted, at_model)
        return (logits + log_pi[:, :1]).scatter_(1, voted, at_voted)

    def _c_params(self) -> torch.Tensor:
        """The 14 numbers `ggml_cpu.token_cache_mix` reads, float32 (absent parts as zeros)."""
        zeros = self.log_tau.new_zeros
        return torch.cat([self.log_tau.detach().reshape(1), self.gate.detach(),
                          self.spread_gate.detach() if self.spread else zeros(len(SPREAD_FEATURES)),
                          self.copy_log_scale.detach().reshape(1) if self.copy else zeros(1),
                          self.copy_gate.detach() if self.copy else zeros(len(COPY_FEATURES))]).float()

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


def _logit_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits `[N, V]` float32 -> logsumexp `[N, 1]`, entropy `[N]`, max log-probability `[N]`;
    in one C pass where it can run (a decode step's few rows: the torch ops below make
    several vocabulary-wide temporaries, ~3 ms of an 8-row step), else in torch."""
    if not (logits.requires_grad and torch.is_grad_enabled()) and logits.device.type == "cpu" \
            and logits.is_contiguous() and ggml_cpu.decode_in_c():
        return ggml_cpu.logit_stats(logits)
    lse = logits.logsumexp(-1, keepdim=True)
    lp = logits - lse
    p = lp.exp()
    return lse, -torch.where(p > 0, p * lp, 0.0).sum(-1), lp.max(-1).values  # a -inf logit adds 0, not NaN


def target_terms(logits: torch.Tensor, target: torch.Tensor):
    """What the gate and `TokenCacheReader.log_prob` need of the model at each target:
    logits `[N, V]`, target `[N]` -> its log-probability `[N]` (differentiable), and the
    entropy and max log-probability `[N]` (gate features, no gradient)."""
    lp = torch.log_softmax(logits.float(), -1)
    with torch.no_grad():
        ent = -(lp.exp() * lp).sum(-1)
        lpmax = lp.max(-1).values
    return lp.gather(1, target[:, None])[:, 0], ent, lpmax

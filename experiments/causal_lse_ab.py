"""Time of `causal_lse` against the one-matrix version it replaced (session 33), in one process.

    python experiments/causal_lse_ab.py --repeats 5 --json results/causal_lse_ab.json

Shapes of SmolLM2's blocks: 9 query heads on 3 kv heads of 64; a 1,024-token segment read
whole (what memorizing with backbone memory runs in each of its 15 blocks) and a decode step.
Pairs alternate the two versions; reported are the medians and their ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from longside.nn.attention import causal_lse
from longside.paths import check_output_file, write_json


def whole_matrix(qr: torch.Tensor, kr: torch.Tensor) -> torch.Tensor:
    """The version before session 33: every [T, P+T] score at once, masked, then logsumexp."""
    B, T, H, D = qr.shape
    G, P = kr.shape[2], kr.shape[1] - T
    q = qr.reshape(B, T, G, H // G, D).permute(0, 2, 3, 1, 4).reshape(B, G, H // G * T, D)
    s = (q @ kr.permute(0, 2, 3, 1) / math.sqrt(D)).view(B, G, H // G, T, P + T)
    causal = torch.ones(T, P + T, dtype=torch.bool).tril(P)
    lse = torch.logsumexp(s.masked_fill(~causal, float("-inf")), -1)
    return lse.reshape(B, H, T).transpose(1, 2).unsqueeze(-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")  # before the long work
    g = torch.Generator().manual_seed(0)
    report = {"experiment": "causal_lse_ab", "threads": torch.get_num_threads(), "cases": {}}
    for name, T, P in [("segment 1024", 1024, 0), ("decode step at 1000", 1, 1000)]:
        qr, kr = torch.randn(1, T, 9, 64, generator=g), torch.randn(1, P + T, 3, 64, generator=g)
        torch.testing.assert_close(causal_lse(qr, kr), whole_matrix(qr, kr), atol=1e-4, rtol=1e-5)
        n = 20 if T > 1 else 2000
        times = {"blocked": [], "whole": []}
        with torch.no_grad():
            for _ in range(args.repeats):
                for label, fn in (("blocked", causal_lse), ("whole", whole_matrix)):
                    t = time.perf_counter()
                    for _ in range(n):
                        fn(qr, kr)
                    times[label].append((time.perf_counter() - t) / n * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        report["cases"][name] = {"ms_blocked": med["blocked"], "ms_whole": med["whole"],
                                 "time_ratio": med["blocked"] / med["whole"], "runs_ms": times}
        print(name, {k: round(v, 3) for k, v in med.items()}, round(med["blocked"] / med["whole"], 3))
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

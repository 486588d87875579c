"""Two training-free changes to backbone memory's read with the carried window, each run
through `longside eval ppl` with the library changed for that process only
(docs/results.md#teacher-headroom, session 46):

    python experiments/backbone_memory_carry_variants.py hold-back -- \
        --backbone-memory 15-29 --token-cache off --max-books 1 --max-tokens 16384 \
        --memory-tokens 16384 --rows memory --json results/backbone_memory_carry_hold_back.json
    python experiments/backbone_memory_carry_variants.py bias 0.5 -- ...

- `hold-back`: with a carry of c tokens, a window's last c tokens go into backbone memory
  only with the next window, the one that carries them, so no token is in the window and in
  memory at once. (Its first `sink_tokens` tokens are then held out as sinks, so 4 tokens per
  window never reach memory; the shipped reading writes them with the window before.)
- `bias B`: memory's weight against the window is sigmoid(lse_mem - lse_local + B) instead of
  B = 0 (each memory key's attention multiplied by e^B).

Only backbone memory changes: the token cache and the side network's memory layer read and
write as shipped. The carry is the model's (256 for the shipped checkpoint).
"""

from __future__ import annotations

import argparse
import sys

from longside.cli.main import main as longside_main
from longside.nn import backbone_memory


def hold_back(carry: int) -> None:
    write = backbone_memory.BackboneMemory.write

    def held_back_write(self, seg, skip=0):
        for L in seg.layers():  # the last `carry` tokens wait for the window that carries them
            seg._lengths[L] = max(seg.length(L) - carry, 0)
        write(self, seg, 0)  # its own carried tokens were held back by the window before: write them

    backbone_memory.BackboneMemory.write = held_back_write


def memory_bias(b: float) -> None:
    causal_lse = backbone_memory.causal_lse
    # lowering the window's log-sum-exp by b raises memory's log-weight against it by b
    backbone_memory.causal_lse = lambda q, k: causal_lse(q, k) - b


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="variant", required=True)
    sub.add_parser("hold-back").add_argument("--carry", type=int, default=256, help="the model's window carry")
    sub.add_parser("bias").add_argument("b", type=float)
    args = p.parse_args(ours)
    hold_back(args.carry) if args.variant == "hold-back" else memory_bias(args.b)
    return longside_main(["eval", "ppl", *rest])


if __name__ == "__main__":
    sys.exit(main())

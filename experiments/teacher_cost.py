"""What one document's teacher targets cost on this CPU, per backbone kind.

The distillation (`longside train --distill`) runs the teacher once per document: the frozen
backbone over the whole document (up to its native 8,192 tokens), then the student's backbone
over each segment, keeping top-k log-probabilities and the hidden-state targets
(`longside.training.teacher.TeacherTargets.document`, no store). This times that for one
document of `--segments` x 1024 tokens of a training book, with the backbone as shipped
(the GGUF file's own blocks) and dequantized to fp32, each after one untimed warm-up on a
shorter document.

    python experiments/teacher_cost.py --segments 8 --json results/teacher_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from longside.backbone import load_backbone
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.data import tokenized_books
from longside.training.teacher import TeacherTargets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    record = RunRecord.start(["python", "experiments/teacher_cost.py", *sys.argv[1:]])
    S = 1024
    rows = {}
    for kind in (None, "fp32"):
        bb = load_backbone("smollm2-135m", quantize=kind)
        book = max(tokenized_books(bb, "train"), key=len)
        ids = torch.from_numpy(book[:args.segments * S].astype(np.int64))
        teacher = TeacherTargets(None, bb, args.segments * S, S, 16, 15)
        with torch.no_grad():
            TeacherTargets(None, bb, S, S // 4, 16, 15).document(ids[:S])  # warm-up
            t = time.perf_counter()
            teacher.document(ids)
            seconds = time.perf_counter() - t
        rows["as shipped" if kind is None else kind] = {"seconds": round(seconds, 2),
                                                          "tokens_per_s": round(len(ids) / seconds, 1)}
        print(kind, rows, file=sys.stderr)
    report = {"segments": args.segments, "tokens": args.segments * S, "rows": rows, "provenance": record.finish()}
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}, indent=1))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()

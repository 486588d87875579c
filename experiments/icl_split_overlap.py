"""How many ICL test snippets nearly repeat a training snippet, in the data v1 split (exact
text dedupe only) that the full ICL run of docs/results.md used, and how many of them the
run scored (the 50 sentences `longside eval icl` samples per task with seed 0).

    python experiments/icl_split_overlap.py

Data v2 drops them (`longside.data.icl.near_keys`); this rebuilds v1 from the raw snippets.
"""

import json
import random

from longside.data import icl
from longside.paths import cache_dir


def main() -> None:
    raw = cache_dir() / "data" / "raw" / "vadersentiment"
    snippets = icl.read_snippets(raw)
    source = {c: i for i, c in enumerate(icl._FILES)}
    plans = {"mr2": (snippets["movie"], icl._sign), "mr5": (snippets["movie"], icl._mr5),
             "tweets2": (snippets["tweet"], icl._sign), "amazon2": (snippets["product"], icl._sign),
             "nyt2": (snippets["news"], icl._sign),
             "source4": (icl._balanced(snippets), lambda s: source[s.collection])}
    report = {}
    for name, (items, labeller) in plans.items():
        train, test = [], []
        for s in items:
            label = labeller(s)
            if label is not None and s.text:
                (test if icl.is_test(s) else train).append({"text": s.text, "label": label})
        seen = {r["text"] for r in train}
        test = [r for r in test if r["text"] not in seen]  # v1: exact repeats only
        keys = {k for r in train for k in icl.near_keys(r["text"])}
        repeats = [bool(icl.near_keys(r["text"]) & keys) for r in test]
        scored = random.Random(0).sample(range(len(test)), min(50, len(test)))
        report[name] = {"test": len(test), "near_repeats": sum(repeats), "scored": len(scored),
                        "scored_near_repeats": sum(repeats[i] for i in scored)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

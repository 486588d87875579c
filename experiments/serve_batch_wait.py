"""`longside serve --batch-wait-ms`: 8 users' turns sent at once, with and without the wait.

    python experiments/serve_batch_wait.py [--wait-ms 50] [--pairs 2] [--json PATH]

Prepares the store of `longside bench serve` (8 users, each with 16,384 tokens of its own
memory), then sends the bench's 8 chat turns (64 new tokens each) all at once to fresh
servers on copies of it, alternating `--batch-wait-ms 0` and `--wait-ms`, every user's
memory read into RAM first by an untimed listing (so the wait alone decides which prompts
are read together). Reported per run: wall time, tokens/s, time to first token (each
turn's), and how many prompts the engine read together (its counters). Then one user's
turn alone with each setting (what a lone request pays). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import httpx

from longside.bench.serve import WORDS, _memory, _prepare, _turns
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.server.keys import KeyFile
from longside.server.process import running_server

PROMPT = "Tell me what you remember about the story so far."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wait-ms", type=float, default=50.0)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    check_output_file(args.json, "--json")
    run = RunRecord.start(["python", "experiments/serve_batch_wait.py", f"--wait-ms={args.wait_ms}",
                           f"--pairs={args.pairs}"])
    users = [f"user{i}" for i in range(8)]
    passwords = {u: f"{WORDS[i]}-{1000 + i}" for i, u in enumerate(users)}
    runs = []
    with tempfile.TemporaryDirectory(prefix="longside-batch-wait-") as tmp:
        tmp = Path(tmp)
        keys = tmp / "keys.json"
        kf = KeyFile(keys)
        headers = {u: {"Authorization": f"Bearer {kf.add(u)}"} for u in users}
        _prepare(tmp / "store", keys, users, headers, passwords, 16384)
        prompts = {u: [{"role": "user", "content": PROMPT}] for u in users}
        for r in range(args.pairs):
            for wait in ((0.0, args.wait_ms) if r % 2 == 0 else (args.wait_ms, 0.0)):
                for together in (True, False):
                    shutil.rmtree(tmp / "run", ignore_errors=True)
                    shutil.copytree(tmp / "store", tmp / "run")
                    asked = prompts if together else {users[0]: prompts[users[0]]}
                    with running_server(tmp / "run", keys=keys, args=["--batch-wait-ms", str(wait)]) as s:
                        for u in asked:
                            _memory(s.url, headers[u])
                        before = httpx.get(s.url + "/v1/stats", headers=headers[users[0]]).json()
                        out = _turns(s.url, headers, asked, 64, concurrent=together)
                        after = httpx.get(s.url + "/v1/stats", headers=headers[users[0]]).json()
                    runs.append({"batch_wait_ms": wait, "users": len(asked), **out,
                                 "prompts_read_together": after["prompts_together"] - before["prompts_together"],
                                 "steps": after["steps"] - before["steps"]})
                    print(json.dumps(runs[-1]), flush=True)
    report = {"experiment": "serve_batch_wait", "wait_ms": args.wait_ms, "runs": runs, "provenance": run.finish()}
    if args.json:
        write_json(report, args.json, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

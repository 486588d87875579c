"""`longside bench serve`: users with their own long memories, served together versus one by one.

    longside bench serve [--users 8] [--memory-tokens 16384] [--new-tokens 64] [--requests 1000] [--repeats 3]

1. Prepare a store: each user memorizes their own `--memory-tokens` of held-out Austen
   (consecutive, different passages) plus one sentence with a password of their own.
2. Sequential: a server on a copy of the store; each user's chat turn (streamed,
   `--new-tokens` tokens with `ignore_eos`) is sent after the previous one ended.
3. Concurrent: a server on another copy; the same turns sent all at once.
   Steps 2 and 3 alternate `--repeats` times, each on fresh copies, the concurrent one
   first in every other pair (a shared machine's speed drifts within minutes: one pair
   alone has moved the ratio by a quarter).
   Reported: each pair's total new tokens / wall time and their ratio, and for how many
   users the (greedy) reply was the same in both modes (`same_replies`: it should not depend
   on who else came, beyond float rounding); the headline ratio
   is the median pair's (the lower one of the middle two for an even count; target
   >= 3x), with its time to first token p50 / p95 and how many users the engine decoded
   per step, and the engine's seconds in each phase (`engine`: users read from disk before
   their turns, prompts read, batch steps). Every user starts on disk, so both modes
   include reading the 8 memories into RAM (on this VM 0.04-0.5 s a user, growing with
   the process's fresh pages).
   Each repeat also runs a resident pair (`resident`): the same turns after one
   untimed memory listing per user has read every memory into RAM, as on a server that
   has served its users before; it measures the batching alone.
4. Restart: that server is stopped and started again; each user's stored memory
   checksum must be identical.
5. Isolation: `--requests` randomized requests from all users at once (chat turns asking
   for the password, memory listings); a cross-user read is any reply or listing that
   shows another user's password or document. Target: 0.

Everything runs over loopback against real `longside serve` processes. Prints JSON
(`--json PATH` also writes it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from longside.backbone import load_tokenizer, tokenize
from longside.data import load_books
from longside.errors import LongsideError
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.server.keys import KeyFile
from longside.server.process import running_server

WORDS = ["amber", "basalt", "cobalt", "dahlia", "ember", "fennel", "garnet", "heron", "indigo", "juniper",
         "kestrel", "lichen", "marlin", "nutmeg", "obsidian", "plover", "quartz", "russet", "saffron", "thistle"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longside bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 users, 2k-token memories, 16 tokens, 100 requests, 1 pair")
    p.add_argument("--users", type=int, default=None, help="default 8 (quick 4)")
    p.add_argument("--memory-tokens", type=int, default=None, help="per user; default 16384 (quick 2048)")
    p.add_argument("--new-tokens", type=int, default=None, help="per turn; default 64 (quick 16)")
    p.add_argument("--requests", type=int, default=None, help="isolation check; default 1000 (quick 100)")
    p.add_argument("--repeats", type=int, default=None, help="sequential/concurrent pairs; default 3 (quick 1)")
    p.add_argument("--json", metavar="PATH", help="also write the report here")
    return p


def main(argv: list[str]) -> int:
    run = RunRecord.start(["longside", "bench", "serve", *argv])
    args = build_parser().parse_args(argv)
    check_output_file(args.json, "--json")
    users_n = _given(args.users, 4 if args.quick else 8)
    mem_tokens = _given(args.memory_tokens, 2048 if args.quick else 16384)
    new_tokens = _given(args.new_tokens, 16 if args.quick else 64)
    n_requests = _given(args.requests, 100 if args.quick else 1000)
    repeats = _given(args.repeats, 1 if args.quick else 3)
    if min(users_n, mem_tokens, new_tokens, n_requests, repeats) < 1 or users_n > len(WORDS):
        raise LongsideError(f"--users 1..{len(WORDS)}; the other sizes must be >= 1")
    users = [f"user{i}" for i in range(users_n)]
    passwords = {u: f"{WORDS[i]}-{random.Random(i).randint(1000, 9999)}" for i, u in enumerate(users)}
    with tempfile.TemporaryDirectory(prefix="longside-bench-serve-") as tmp:
        tmp = Path(tmp)
        keys = tmp / "keys.json"
        kf = KeyFile(keys)
        headers = {u: {"Authorization": f"Bearer {kf.add(u)}"} for u in users}
        _log(f"preparing {users_n} users x {mem_tokens} memory tokens")
        t0 = time.perf_counter()
        _prepare(tmp / "store", keys, users, headers, passwords, mem_tokens)
        prepare_s = time.perf_counter() - t0
        prompts = {u: [{"role": "user", "content": "Tell me what you remember about the story so far."}]
                   for u in users}
        pairs, resident_pairs = [], []
        for r in range(repeats):
            for resident in (False, True):
                for name in ("sequential", "concurrent"):
                    shutil.rmtree(tmp / name, ignore_errors=True)  # the previous pair's
                    shutil.copytree(tmp / "store", tmp / name)
                for mode in ("sequential", "concurrent")[::-1 if r % 2 else 1]:
                    _log(f"{mode}{' (users resident)' if resident else ''} ({r + 1}/{repeats})")
                    with running_server(tmp / mode, keys=keys) as s:
                        if resident:  # untimed: every memory read into RAM, the conversations unchanged
                            for u in users:
                                _memory(s.url, headers[u])
                        stats0 = httpx.get(s.url + "/v1/stats", headers=headers[users[0]]).json()
                        result = _turns(s.url, headers, prompts, new_tokens, concurrent=mode == "concurrent")
                        stats1 = httpx.get(s.url + "/v1/stats", headers=headers[users[0]]).json()
                        result["engine"] = {k: round(stats1[k] - stats0[k], 3) for k in _PHASES}
                        if mode == "sequential":
                            seq = result
                            continue
                        con = result
                        before = {u: _memory(s.url, headers[u]) for u in users}  # the last one's: restarted below
                steps, rows = con["engine"]["steps"], con["engine"]["rows_stepped"]  # the concurrent phase's
                # greedy turns: a user's reply should not depend on whether the others came at once
                alone, together = seq.pop("replies"), con.pop("replies")
                same = sum(alone[u] == together[u] for u in users)
                (resident_pairs if resident else pairs).append(
                    {"sequential": seq, "concurrent": con,
                     "ratio": round(con["tokens_per_s"] / seq["tokens_per_s"], 2),
                     "mean_rows_per_step": round(rows / steps, 2) if steps else None,
                     "same_replies": same})
        _log("restart")  # the last pair's concurrent store
        with running_server(tmp / "concurrent", keys=keys) as s:
            after = {u: _memory(s.url, headers[u]) for u in users}
            _log(f"isolation: {n_requests} randomized requests")
            isolation = _isolation(s.url, headers, passwords, n_requests)
    same = sum(before[u]["sha256"] == after[u]["sha256"] and before[u]["sha256"] is not None for u in users)
    median = _median(pairs)
    warm = _median(resident_pairs)
    report = {
        "benchmark": "serve", "quick": args.quick, "users": users_n, "memory_tokens_per_user": mem_tokens,
        "new_tokens_per_turn": new_tokens, "prepare_s": round(prepare_s, 1), "repeats": repeats,
        "sequential": median["sequential"], "concurrent": median["concurrent"],
        "concurrent_over_sequential_tokens_per_s": median["ratio"],
        "target_ratio": 3.0,
        "mean_rows_per_step": median["mean_rows_per_step"],
        "pairs": [_pair_row(p) for p in pairs],
        "resident": {"sequential": warm["sequential"], "concurrent": warm["concurrent"],
                     "concurrent_over_sequential_tokens_per_s": warm["ratio"],
                     "mean_rows_per_step": warm["mean_rows_per_step"],
                     "pairs": [_pair_row(p) for p in resident_pairs]},
        "same_replies": {"users": users_n, "pairs": [p["same_replies"] for p in pairs],
                         "resident_pairs": [p["same_replies"] for p in resident_pairs]},
        "restart": {"users_identical_checksum": same, "users": users_n,
                    "memory_tokens": {u: after[u]["tokens"] for u in users}},
        "isolation": isolation,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1m": os.getloadavg()[0]},
        "provenance": run.finish(),
    }
    if args.json:
        write_json(report, args.json, indent=1)
    print(json.dumps(report, indent=1))
    return 0


# the engine's counters over a mode's turns (Engine.stats): batch steps and rows stepped,
# users read from disk before their turns began, and seconds reading them, reading prompts, stepping
_PHASES = ("steps", "rows_stepped", "users_read_ahead", "read_ahead_s", "prefill_s", "step_s")


def _median(pairs: list[dict]) -> dict:
    """The median pair by ratio (the lower of the middle two for an even count)."""
    return sorted(pairs, key=lambda p: p["ratio"])[(len(pairs) - 1) // 2]


def _pair_row(p: dict) -> dict:
    return {"sequential_tokens_per_s": p["sequential"]["tokens_per_s"],
            "concurrent_tokens_per_s": p["concurrent"]["tokens_per_s"], "ratio": p["ratio"],
            "concurrent_ttft_p50_s": p["concurrent"]["ttft_p50_s"], "mean_rows_per_step": p["mean_rows_per_step"],
            "same_replies": p["same_replies"], "sequential_engine": p["sequential"]["engine"],
            "concurrent_engine": p["concurrent"]["engine"]}


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def _log(msg: str) -> None:
    print(f"[bench serve] {msg}", file=sys.stderr, flush=True)


def _prepare(store: Path, keys: Path, users, headers, passwords, mem_tokens: int) -> None:
    """Each user memorizes different consecutive passages of the held-out Austen novels."""
    tok = load_tokenizer("smollm2-135m")
    ids: list[int] = []
    for book in load_books("test"):
        for ch in book["chapters"]:
            ids += tokenize(tok, ch["text"] + "\n\n")
        if len(ids) >= mem_tokens * len(users):
            break
    if len(ids) < mem_tokens * len(users):
        raise LongsideError(f"the test books hold {len(ids)} tokens; {mem_tokens * len(users)} needed")
    with running_server(store, keys=keys) as s:
        def one(i_user):
            i, user = i_user
            text = tok.decode(ids[i * mem_tokens:(i + 1) * mem_tokens])
            for name, body in ((f"austen-{i}.txt", text),
                               (f"password-{user}.txt", f"My password is {passwords[user]}. Remember it.")):
                r = httpx.post(s.url + "/v1/memories/documents", headers=headers[user],
                               json={"name": name, "text": body}, timeout=3600)
                if r.status_code != 200:
                    raise LongsideError(f"preparing {user}: {r.status_code} {r.text}")
        with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
            list(pool.map(one, enumerate(users)))


def _turn(url: str, headers: dict, messages: list, new_tokens: int, t_start: float) -> dict:
    """One streamed chat turn -> new tokens, its text, time to first token and end (from t_start)."""
    body = {"model": "longside", "messages": messages, "max_tokens": new_tokens, "stream": True, "ignore_eos": True}
    first, usage, text = None, None, []
    with httpx.stream("POST", url + "/v1/chat/completions", headers=headers, json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise LongsideError(f"chat failed: {r.status_code} {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise LongsideError(f"chat failed: {chunk['error']}")
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if piece:
                first = time.perf_counter() - t_start if first is None else first
                text.append(piece)
            usage = chunk.get("usage") or usage
    return {"tokens": usage["completion_tokens"], "text": "".join(text), "ttft_s": first,
            "end_s": time.perf_counter() - t_start}


def _turns(url: str, headers: dict, prompts: dict, new_tokens: int, concurrent: bool) -> dict:
    t0 = time.perf_counter()
    if concurrent:
        with concurrent_pool(len(prompts)) as pool:
            results = list(pool.map(lambda u: _turn(url, headers[u], prompts[u], new_tokens, t0), prompts))
    else:
        results = []
        for u in prompts:  # each turn's first token is timed from its own send
            t = time.perf_counter()
            r = _turn(url, headers[u], prompts[u], new_tokens, t)
            results.append({**r, "end_s": time.perf_counter() - t0})
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    replies = {u: r.pop("text") for u, r in zip(prompts, results)}  # pool.map keeps the order
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2), "replies": replies,
            "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3) if ttft else None,
            "ttft_s": [round(t, 3) for t in ttft]}


def concurrent_pool(n: int):
    return concurrent.futures.ThreadPoolExecutor(n)


def _memory(url: str, headers: dict) -> dict:
    r = httpx.get(url + "/v1/memories", headers=headers, timeout=600)
    if r.status_code != 200:
        raise LongsideError(f"memory listing failed: {r.status_code} {r.text[:300]}")
    return r.json()


def _isolation(url: str, headers: dict, passwords: dict, n: int) -> dict:
    """`n` randomized requests from all users at once; count replies showing another's data."""
    rng = random.Random(0)
    plan = [(rng.choice(list(passwords)), rng.random() < 0.5) for _ in range(n)]

    def one(item):
        user, chat = item
        if chat:
            body = {"model": "longside", "max_tokens": 12,
                    "messages": [{"role": "user", "content": "What is my password?"}]}
            r = httpx.post(url + "/v1/chat/completions", headers=headers[user], json=body, timeout=3600)
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
        else:
            r = httpx.get(url + "/v1/memories", headers=headers[user], timeout=600)
            text = r.text
        others = [p for u, p in passwords.items() if u != user]
        other_docs = [f"password-{u}.txt" for u in passwords if u != user]
        leaked = any(p in text or p.split("-")[0] in text for p in others) or any(d in text for d in other_docs)
        own = passwords[user] in text
        return {"chat": chat, "ok": r.status_code == 200, "cross": leaked, "own": own}

    t0 = time.perf_counter()
    with concurrent_pool(8) as pool:
        results = list(pool.map(one, plan))
    chats = [r for r in results if r["chat"]]
    return {"requests": n, "chat_turns": len(chats), "listings": n - len(chats),
            "failed": sum(not r["ok"] for r in results), "cross_user_reads": sum(r["cross"] for r in results),
            "chat_replies_with_own_password": sum(r["own"] for r in chats),
            "target_cross_user_reads": 0, "wall_s": round(time.perf_counter() - t0, 1)}

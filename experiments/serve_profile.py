"""Where the server's time goes (numbers in docs/results.md#server and the session-13 note).

    python experiments/serve_profile.py threads   # one SmolLM2 product on the main thread, on a second
                                                  # thread, and on the main thread after another thread
                                                  # ran torch with (and without) its own OpenMP team
    python experiments/serve_profile.py steps     # RaggedWindows: one batch step of 1, 2, 4 and 8 rows
                                                  # (each with its own copy of ~19k tokens of memory),
                                                  # and a cProfile of 8
    python experiments/serve_profile.py long      # batch steps of 1 and 8 rows whose windows hold ~940 tokens
    python experiments/serve_profile.py prefill   # 8 users' chat prompts read one by one (exact, then
                                                  # the batch's path), then together, and how far apart
    python experiments/serve_profile.py reader    # 8-row steps before and after a read on a reader
                                                  # thread (one torch thread there, or default)
    python experiments/serve_profile.py search    # one row's memory reads in a decode step, torch's
                                                  # operations and the one-call C searches
    python experiments/serve_profile.py agree     # how often the C searches return torch's answer
    python experiments/serve_profile.py read      # ChatSession.read of a user with ~19k tokens of memory
    python experiments/serve_profile.py products  # SmolLM2's products on M rows: the int8 kernel against
                                                  # exact tiles + BLAS (the prefill path above INT8_MAX_M)
    python experiments/serve_profile.py engine    # the server's Engine in-process (no HTTP): 8 users'
                                                  # 64-token turns one after another, then at once,
                                                  # each mode from the same stored users (as the bench)
    python experiments/serve_profile.py first     # the first chat turns of a fresh engine process (users
                                                  # with ~15k tokens of memory, read from disk), without
                                                  # and with Engine.warm_up, three fresh processes each

Timings are means over many calls on a shared 2-core machine: compare within one run.
"""

import concurrent.futures
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from longside import load_model
from longside.backbone import load_backbone
from longside.data import load_books
from longside.inference.chat import ChatSession
from longside.inference.ragged import RaggedWindows
from longside.inference.sampling import GenerationConfig
from longside.inference.window import LocalWindow
from longside.kernels import ggml_cpu
from longside.server.engine import Engine, Job
from longside.server.store import UserStore

PROMPT = "Tell me what you remember about the story so far."


def _book(chars: int) -> str:
    return "".join(ch["text"] for ch in load_books("test")[0]["chapters"])[:chars]


def threads() -> None:
    layer = load_backbone("smollm2-135m").parts.layers[0].mlp.gate_proj
    x = torch.randn(1, 1, 576)

    def us(n: int = 2000) -> float:
        with torch.no_grad():
            for _ in range(50):
                layer(x)
            t = time.perf_counter()
            for _ in range(n):
                layer(x)
            return (time.perf_counter() - t) / n * 1e6

    print(f"main thread: {us():.0f} us per product")
    out = []
    t = threading.Thread(target=lambda: out.append(us()))
    t.start()
    t.join()
    print(f"a second thread: {out[0]:.0f} us")
    one = concurrent.futures.ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
    one.submit(lambda: torch.randn(1000, 1000) @ torch.randn(1000, 1000)).result()
    print(f"main, after torch on another thread with one OpenMP thread: {us():.0f} us")
    team = concurrent.futures.ThreadPoolExecutor(1)
    team.submit(lambda: torch.randn(1000, 1000) @ torch.randn(1000, 1000)).result()
    print(f"main, after torch on another thread with its own OpenMP team: {us():.0f} us")


def products() -> None:
    """A decoder block's four products (fused q/k/v, o, fused gate/up, down) of SmolLM2 on M
    rows: `gemv_int8` (what matmul_ggml runs up to INT8_MAX_M rows) against `gemm_tiled`."""
    from longside.backbone.decode_step import _Fused

    layer = load_backbone("smollm2-135m").parts.layers[0]
    fused = _Fused(layer)
    shapes = {"qkv": fused.qkv, "o": layer.self_attn.o_proj, "gate_up": fused.gate_up, "down": layer.mlp.down_proj}
    for m in (1, 8, 16, 41, 64, 128, 328, 512):
        cells = []
        for name, lin in shapes.items():
            w, x = lin.ggml_weight(), torch.randn(m, lin.in_features)
            us = []
            for f in (ggml_cpu.gemv_int8, ggml_cpu.gemm_tiled):
                for _ in range(5):
                    f(x, w)
                reps = max(10, 2000 // m)
                t = time.perf_counter()
                for _ in range(reps):
                    f(x, w)
                us.append((time.perf_counter() - t) / reps * 1e6)
            cells.append(f"{name} {us[0]:.0f}/{us[1]:.0f} us ({us[1] / us[0]:.2f}x)")
        print(f"M={m:3d}: int8/tiles " + ", ".join(cells), flush=True)


def steps() -> None:
    model, _ = load_model()
    tok = model.backbone.tokenizer
    mem = model.new_memory(1)
    mem.memorize(_book(70000), progress=False, as_text=True)
    path = Path(tempfile.mkdtemp()) / "memory.safetensors"
    mem.save(path)
    mems = []  # each row its own copy, as each user of a server has its own bank
    for _ in range(8):
        mems.append(model.new_memory(1))
        mems[-1].load(path)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])

    def batch(rows: int) -> RaggedWindows:
        ragged = RaggedWindows(model, write_memory=False)
        for r in range(rows):
            w = LocalWindow(model, 1, memory=mems[r], write_memory=False)
            w.feed(ids)
            ragged.join(w)
        return ragged

    spent = {"gemv_int8": 0.0, "gemv_f32": 0.0}  # the C decode products, timed in place

    def timed(name):
        f = getattr(ggml_cpu, name)

        def run(*args):
            t = time.perf_counter()
            out = f(*args)
            spent[name] += time.perf_counter() - t
            return out
        return run

    for name in spent:
        setattr(ggml_cpu, name, timed(name))
    for rows in (1, 2, 4, 8):
        ragged = batch(rows)
        for i in range(4):
            ragged.step(torch.tensor([100 + i] * rows))
        spent.update(gemv_int8=0.0, gemv_f32=0.0)
        t = time.perf_counter()
        for i in range(16):
            ragged.step(torch.tensor([100 + i] * rows))
        print(f"{rows} row(s): {(time.perf_counter() - t) / 16 * 1000:.0f} ms per step, of which int8 products "
              f"{spent['gemv_int8'] / 16 * 1000:.1f} ms (the LM head's since session 28) and fp32 products "
              f"{spent['gemv_f32'] / 16 * 1000:.1f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for i in range(16):
        ragged.step(torch.tensor([100 + i] * 8))
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def long_windows() -> None:
    """Batch steps of 1 and 8 rows (each its own copy of ~19k tokens of memory) whose windows
    already hold 900 tokens of a book: a long conversation's decoding."""
    model, _ = load_model()
    mem = model.new_memory(1)
    mem.memorize(_book(70000), progress=False, as_text=True)
    path = Path(tempfile.mkdtemp()) / "memory.safetensors"
    mem.save(path)
    ids = torch.tensor([model.backbone.tokenizer(_book(106000)[100000:])["input_ids"][:900]])
    for rows in (1, 8):
        ragged = RaggedWindows(model, write_memory=False)
        for _ in range(rows):
            m = model.new_memory(1)
            m.load(path)
            w = LocalWindow(model, 1, memory=m, write_memory=False)
            w.feed(ids)
            ragged.join(w)
        for i in range(3):
            ragged.step(torch.tensor([100 + i] * rows))
        best = []
        for _ in range(3):
            t = time.perf_counter()
            for i in range(12):
                ragged.step(torch.tensor([100 + i] * rows))
            best.append((time.perf_counter() - t) / 12 * 1000)
        print(f"{rows} row(s), {ragged.columns} columns: {min(best):.1f} ms per step (best of 3 x 12)", flush=True)


def prefill() -> None:
    """8 users' chat prompts (each user its own copy of ~19k tokens of memory), read one by
    one by their own windows (`LocalWindow.feed`: exact activations), one by one by the
    batch's path (`RaggedWindows.feed` of one row: what the engine does for a lone prompt
    since session 40) and together (`RaggedWindows.feed` of eight); then how far the last
    position's next-token distributions of the three are apart."""
    model, _ = load_model()
    mem = model.new_memory(1)
    mem.memorize(_book(70000), progress=False, as_text=True)
    path = Path(tempfile.mkdtemp()) / "memory.safetensors"
    mem.save(path)
    mems = []
    for _ in range(8):
        mems.append(model.new_memory(1))
        mems[-1].load(path)
    ids = ChatSession(model, memory=mems[0]).begin([{"role": "user", "content": PROMPT}])[0]

    def one_by_one():
        return [LocalWindow(model, 1, memory=m, write_memory=False).feed(ids[None]) for m in mems]

    def one_by_one_batch_path():
        out = []
        for m in mems:
            group = RaggedWindows(model, write_memory=False)
            group.join(LocalWindow(model, 1, memory=m, write_memory=False))
            out.append(group.feed([ids]))
            group.leave(0)
        return out

    def together():
        group = RaggedWindows(model, write_memory=False)
        for m in mems:
            group.join(LocalWindow(model, 1, memory=m, write_memory=False))
        logits = group.feed([ids] * len(mems))
        for _ in mems:
            group.leave(0)
        return list(logits.split(1))

    for f in (one_by_one, one_by_one_batch_path, together) * 2:
        f()
        t = time.perf_counter()
        for _ in range(3):
            f()
        print(f"8 prompts of {len(ids)} tokens, {f.__name__.replace('_', ' ')}: "
              f"{(time.perf_counter() - t) / 3 * 1000:.0f} ms", flush=True)
    exact, alone, among = (torch.cat(f()).float().log_softmax(-1) for f in (one_by_one, one_by_one_batch_path,
                                                                             together))
    for name, a, b in (("exact vs batch path alone", exact, alone), ("batch path alone vs among 8", alone, among)):
        kl = (a.exp() * (a - b)).sum(-1).max().item()
        same = (a.argmax(-1) == b.argmax(-1)).sum().item()
        print(f"{name}: largest KL {kl:.2e} nats, largest |log p| difference {(a - b).abs().max().item():.2e}, "
              f"first tokens the same {same}/8", flush=True)


def reader() -> None:
    """8-row batch steps before and after a user is read on a reader thread (as the engine's
    `_read_ahead` does): with torch on one OpenMP thread there, and with a default thread."""
    model, _ = load_model()
    mem = model.new_memory(1)
    mem.memorize(_book(70000), progress=False, as_text=True)
    path = Path(tempfile.mkdtemp()) / "memory.safetensors"
    mem.save(path)
    store = UserStore(model, tempfile.mkdtemp())
    store.session("u").memory.load(path)
    store.save("u")
    ids = torch.tensor([model.backbone.tokenizer(PROMPT)["input_ids"]])
    ragged = RaggedWindows(model, write_memory=False)
    for _ in range(8):
        m = model.new_memory(1)
        m.load(path)
        w = LocalWindow(model, 1, memory=m, write_memory=False)
        w.feed(ids)
        ragged.join(w)

    def step_ms(n: int = 24) -> float:
        t = time.perf_counter()
        for i in range(n):
            ragged.step(torch.tensor([100 + i] * 8))
        return (time.perf_counter() - t) / n * 1000

    step_ms(8)
    # the default-thread reader last: its OpenMP team slows the main thread while it lives
    for name, pool in (("on this thread", None),
                       ("reader thread, one torch thread", concurrent.futures.ThreadPoolExecutor(
                           1, initializer=torch.set_num_threads, initargs=(1,))),
                       ("reader thread, default threads", concurrent.futures.ThreadPoolExecutor(1))):
        for _ in range(3):
            before = step_ms()
            store.read("u") if pool is None else pool.submit(store.read, "u").result()
            print(f"read {name}: 8-row step {before:.1f} ms before, {step_ms():.1f} ms after", flush=True)


def search() -> None:
    """One row's memory reads in a decode step, a bank of ~19k tokens: the chunk search of
    the memory layer (9 query heads), the token cache's neighbours and its exact-match read,
    by torch's operations (LONGSIDE_SEARCH_ISA=off) and by one C call each (the default), each
    timed on one bank and round-robin over 8 copies (as 8 users' banks in a step, which do not
    all stay in cache)."""
    model, _ = load_model()
    mem = model.new_memory(1)
    mem.memorize(_book(70000), progress=False, as_text=True)
    path = Path(tempfile.mkdtemp()) / "memory.safetensors"
    mem.save(path)
    banks = []
    for _ in range(8):
        m = model.new_memory(1)
        m.load(path)
        banks.append(m.banks[0])
    cfg, spec = model.config, model.backbone.spec
    q = torch.randn(1, spec.num_heads, spec.head_dim)
    key = torch.randn(1, spec.hidden_size)
    context = torch.randint(0, 1000, (50,))
    reads = {"chunk search": lambda b: b.search(q, cfg.k_chunks),
             "token-cache neighbours": lambda b: b.tokens.search(key, cfg.token_k),
             "exact-match read": lambda b: b.tokens.match(context, 1, cfg.token_copy_k)}

    def us(f, n: int = 200) -> float:
        for _ in range(10):
            f()
        t = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t) / n * 1e6

    print(f"a bank of {len(banks[0])} tokens, one query token, us per read (one bank / round-robin over 8):")
    for mode in ("off", "avx2"):
        os.environ["LONGSIDE_SEARCH_ISA"] = mode
        cells = []
        for name, read in reads.items():
            one = us(lambda: read(banks[0]))
            rr = us(lambda: [read(b) for b in banks], n=50) / 8
            cells.append(f"{name} {one:.0f} / {rr:.0f}")
        print(f"  {'torch' if mode == 'off' else 'one C call'}: " + ", ".join(cells))


def agree() -> None:
    """How often a decode step's one-call searches (memory_bank/search_cpu.c) return what
    torch's path returns, on real text: a memory of ~16.9k tokens of a held-out novel, queried
    by the token-cache keys (and chunk keys) of the ~12.5k tokens that follow it."""
    model, _ = load_model()
    book = _book(120000)
    mem, after = model.new_memory(1), model.new_memory(1)
    mem.memorize(book[:70000], progress=False, as_text=True)
    after.memorize(book[70000:], progress=False, as_text=True)
    bank, later = mem.banks[0], after.banks[0]
    queries = later.tokens._keys[:len(later.tokens)].float()
    k = model.config.token_k
    same_order = same_set = 0
    for i in range(queries.shape[0]):
        got = []
        for mode in ("off", "avx2"):
            os.environ["LONGSIDE_SEARCH_ISA"] = mode
            got.append(bank.tokens.search(queries[i:i + 1], k)[1][0].tolist())
        same_order += got[0] == got[1]
        same_set += sorted(got[0]) == sorted(got[1])
    n = queries.shape[0]
    print(f"token-cache neighbours ({k}) of {n} real queries: the same in the same order {same_order / n:.2%}, "
          f"the same set {same_set / n:.2%}")
    spec = model.backbone.spec
    heads = later._chunk_keys[:, :later._used].float()  # [H, used, D]: real memory-layer keys as queries
    g = spec.num_heads // spec.num_kv_heads
    same = total = 0
    for j in range(0, heads.shape[1] - g, g):
        q = heads[:, j:j + g].permute(1, 0, 2).reshape(1, spec.num_heads, spec.head_dim)
        got = []
        for mode in ("off", "avx2"):
            os.environ["LONGSIDE_SEARCH_ISA"] = mode
            got.append(bank.search(q, model.config.k_chunks)[0])
        same += torch.equal(got[0], got[1])
        total += 1
    print(f"chunk search ({model.config.k_chunks} chunks x {spec.num_heads} heads) of {total} real queries: "
          f"the same keys read {same / total:.2%}")


def read() -> None:
    model, _ = load_model()
    store = UserStore(model, tempfile.mkdtemp())
    session = store.session("u")
    session.memory.memorize(_book(80000), progress=False, as_text=True)
    store.save("u")
    for _ in range(2):
        store.read("u")
    t = time.perf_counter()
    for _ in range(5):
        store.read("u")
    print(f"reading a user with {len(session.memory.banks[0])} tokens of memory from disk: "
          f"{(time.perf_counter() - t) / 5:.3f} s")


def engine() -> None:
    """As `longside bench serve` does, without HTTP: both modes start from the same stored
    users (each has memorized ~15k tokens and not chatted yet), each read from disk at its
    first request."""
    model, _ = load_model()
    root = Path(tempfile.mkdtemp())
    store = UserStore(model, root / "store")
    eng = Engine(model, store)
    text = _book(60000)

    def submit(job: Job):
        done, events = threading.Event(), []

        def emit(e):
            events.append((time.perf_counter(), e))
            if e["type"] in ("done", "result", "error"):
                done.set()
        job.emit = emit
        eng.submit(job)
        return done, events

    def client():
        for d, _ in [submit(Job("memorize", f"u{i}", name="book", text=text)) for i in range(8)]:
            d.wait()
        shutil.copytree(root / "store", root / "prepared")
        cfg = GenerationConfig(max_new_tokens=64)

        def turn(i):
            return submit(Job("chat", f"u{i}", messages=[{"role": "user", "content": PROMPT}], config=cfg,
                              ignore_eos=True))

        for mode in ("one after another", "at once"):
            done = threading.Event()
            eng.submit(Job("info", "u0", emit=lambda _e: done.set()))  # the engine idle: swap the store
            done.wait()
            for i in range(8):
                store.unload(f"u{i}")
            shutil.rmtree(root / "store" / "users")
            shutil.copytree(root / "prepared" / "users", root / "store" / "users")
            for i in range(8):
                store.unload(f"u{i}")  # "info" read u0 back in
            t0, steps = time.perf_counter(), eng.steps
            if mode == "at once":
                turns = [turn(i) for i in range(8)]
                for d, _ in turns:
                    d.wait()
            else:
                turns = []
                for i in range(8):
                    turns.append(turn(i))
                    turns[-1][0].wait()
            wall = time.perf_counter() - t0
            firsts = [next(t for t, e in ev if e["type"] == "text") - t0 for _, ev in turns]
            print(f"8 users x 64 tokens {mode}: {wall:.2f} s, {512 / wall:.1f} tok/s, first tokens at "
                  f"{', '.join(f'{f:.2f}' for f in firsts)} s, {eng.steps - steps} batch steps", flush=True)
        eng.stop()

    threading.Thread(target=client, daemon=True).start()
    eng.run()  # the model on the main thread, as `longside serve` runs it


def first() -> None:
    """A store of three users who memorized ~15k tokens each, made once; then fresh processes
    (`first_turns`), alternately cold and warmed up, each answering the users' first turns one
    after another."""
    import subprocess

    root = Path(tempfile.mkdtemp())
    model, _ = load_model()
    store = UserStore(model, root / "store")
    text = _book(60000)
    for i in range(3):
        store.session(f"u{i}").memorize(text[i * 1000:], progress=False)
        store.save(f"u{i}")
    del model, store
    for i in range(6):
        mode = ("cold", "warm")[i % 2]
        shutil.rmtree(root / "copy", ignore_errors=True)
        shutil.copytree(root / "store", root / "copy")
        out = subprocess.run([sys.executable, __file__, "first_turns", mode, str(root / "copy")],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)


def first_turns(mode: str, store_dir: str) -> None:
    torch.set_num_threads(2)
    model, _ = load_model()
    eng = Engine(model, UserStore(model, Path(store_dir)))
    warm = eng.warm_up() if mode == "warm" else 0.0
    times = []

    def client():
        cfg = GenerationConfig(max_new_tokens=4)
        for i in range(3):
            done, first = threading.Event(), []
            t0 = time.perf_counter()

            def emit(e, first=first, done=done, t0=t0):
                if e["type"] == "text" and not first:
                    first.append(time.perf_counter() - t0)
                if e["type"] in ("done", "error"):
                    done.set()
            eng.submit(Job("chat", f"u{i}", emit=emit, messages=[{"role": "user", "content": PROMPT}], config=cfg,
                           ignore_eos=True))
            done.wait()
            times.append(first[0])
        eng.stop()

    threading.Thread(target=client, daemon=True).start()
    eng.run()  # the model on the main thread, as `longside serve` runs it
    print(f"{mode:4s} (warm-up {warm:.2f} s): time to first token of users 1, 2, 3: "
          f"{', '.join(f'{t:.3f}' for t in times)} s", flush=True)
    os._exit(0)  # the engine's reader thread would abort a normal interpreter exit


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "first_turns":
        first_turns(sys.argv[2], sys.argv[3])
        raise SystemExit(0)
    {"threads": threads, "products": products, "steps": steps, "long": long_windows, "read": read, "reader": reader, "search": search, "agree": agree, "prefill": prefill, "engine": engine, "first": first}[sys.argv[1] if len(sys.argv) > 1 else "threads"]()

"""Where a decoded token's time goes, for the shipped model on its GGUF blocks (numbers in
docs/results.md#generation-speed-native and the session-12 note).

    python experiments/decode_profile.py profile [MEMORY_TOKENS]  # cProfile of generate(): 33 tokens after a
                                                    # 128-token prompt (memory filled as bench generate --quick does)
    python experiments/decode_profile.py phases [MEMORY_TOKENS]  # a token's phases timed in place (no profiler):
                                                    # each C call, the Python around it, the memory reads
    python experiments/decode_profile.py products   # the 90 MLP products of SmolLM2's 30 blocks, in a tight loop,
                                                    # and the fixed cost of one call
    python experiments/decode_profile.py rows       # the same 90 products for 1, 2, 4 and 8 rows of x (a server's
                                                    # batch step), 2 threads
    python experiments/decode_profile.py compile    # the 30 MLP halves at T=1: eager against torch.compile,
                                                    # the GGUF product as a torch.library custom op

Threads: 2 (the bench's setting); `products` also times one. Timings are best/mean of a
few repeats on a shared machine: compare within one run.
"""

import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

from longside import load_model
from longside.backbone import load_backbone
from longside.inference.generate import generate
from longside.kernels import ggml_cpu
from longside.kernels.ggml import GGMLWeight


def profile(memory_tokens: int = 0) -> None:
    """cProfile of 33 generated tokens after a 128-token prompt; with `memory_tokens`, memory
    filled as `longside bench generate --quick` fills it (real keys of 4,096 memorized tokens,
    repeated)."""
    if memory_tokens:
        from longside.bench.generate import _longside_row

        gen_fn, _ = _longside_row("longside-native", memory_tokens, True)
        gen = lambda prompt, n: gen_fn(prompt, n)  # noqa: E731
    else:
        model, _ = load_model()
        gen = lambda prompt, n: generate(model, prompt, n, eos_token_id=[], write_memory=False)  # noqa: E731
    prompt = torch.randint(0, 49000, (1, 128), generator=torch.Generator().manual_seed(0))
    gen(prompt, 4)

    def run(n):
        t = time.perf_counter()
        gen(prompt, n)
        return time.perf_counter() - t

    t1, tn = min(run(1) for _ in range(2)), min(run(33) for _ in range(2))
    print(f"decode {32 / (tn - t1):.1f} tokens/s")
    prof = cProfile.Profile()
    prof.runcall(run, 33)
    pstats.Stats(prof).sort_stats("tottime").print_stats(40)


def phases(memory_tokens: int = 0) -> None:
    """Each phase of a decoded token, timed where it runs (a wrapper per function, no
    profiler: cProfile's own cost per call hides the Python being measured): 65 tokens after a
    128-token prompt of the held-out books, memory filled as `bench generate --quick` fills
    it; per phase the mean of the middle half of its calls, in ms per token, three times."""
    import collections

    import longside.inference.window as window_mod
    import longside.memory_bank.batch as batch_mod
    from longside.backbone import decode_step
    from longside.bench.generate import _longside_row, _texts

    gen, extra = _longside_row("longside-native", memory_tokens, True)
    model = gen.__closure__[0].cell_contents  # the row's model
    ids, _ = _texts(max(memory_tokens, 4096) + 2048 + 128, extra["tokenizer"])
    prompt = torch.tensor([ids[-128:]])
    times, on = collections.defaultdict(list), [False]

    def wrap(obj, name, label):
        f = getattr(obj, name)

        def timed(*a, **k):
            if not on[0]:
                return f(*a, **k)
            t = time.perf_counter()
            out = f(*a, **k)
            times[label].append(time.perf_counter() - t)
            return out
        setattr(obj, name, timed)

    wrap(window_mod.LocalWindow, "_step", "whole step")
    wrap(model, "encode", "backbone (encode)")
    wrap(decode_step, "_native_step", "  its C step, with set-up")
    wrap(ggml_cpu, "llama_decode_step", "    the C call")
    wrap(model.side, "forward", "side network")
    wrap(ggml_cpu, "side_decode_layers", "  its C calls")
    wrap(batch_mod.BatchMemory, "search", "  memory search")
    wrap(model.side.reader, "forward", "  memory reader (with search)")
    wrap(model, "search_tokens", "token cache search")
    wrap(model, "output", "LM head and token-cache mix")
    wrap(ggml_cpu, "gemv_f32", "  the LM head's product")
    gen(prompt, 65)
    for _ in range(3):
        times.clear()
        on[0] = True
        gen(prompt, 65)
        on[0] = False
        print(f"{memory_tokens} tokens in memory, ms per decoded token:")
        for label, ts in times.items():
            ts = sorted(ts[1:] if label != "    the C call" else ts)  # the first step is the prompt's
            mid = ts[len(ts) // 4: 3 * len(ts) // 4] or ts
            print(f"  {label:34s} {sum(mid) / len(mid) * 1e3 * len(ts) / 64:6.2f}")


def _mlp_weights(bb):
    return [m.ggml_weight() for layer in bb.parts.layers
            for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]


def products() -> None:
    ws = _mlp_weights(load_backbone("smollm2-135m"))
    xs = {k: torch.randn(1, k) for k in (576, 1536)}
    nbytes = sum(w.blocks.numel() for w in ws)
    for threads in (1, 2):
        torch.set_num_threads(threads)

        def run():
            for w in ws:
                ggml_cpu.gemv_int8(xs[w.shape[1]], w)

        run()
        t = time.perf_counter()
        for _ in range(20):
            run()
        dt = (time.perf_counter() - t) / 20
        print(f"{threads} thread(s): {dt * 1e3:.2f} ms for {len(ws)} products, {nbytes / dt / 1e9:.1f} GB/s of weights")
    tiny = GGMLWeight(ws[0].blocks[:4].contiguous(), ws[0].qtype, (4, ws[0].shape[1]))
    for _ in range(100):
        ggml_cpu.gemv_int8(xs[576], tiny)
    t = time.perf_counter()
    for _ in range(2000):
        ggml_cpu.gemv_int8(xs[576], tiny)
    print(f"fixed cost of one call (a 4 x 576 product): {(time.perf_counter() - t) / 2000 * 1e6:.1f} us")


def rows() -> None:
    ws = _mlp_weights(load_backbone("smollm2-135m"))
    torch.set_num_threads(2)
    for m in (1, 2, 4, 8):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}

        def run():
            for w in ws:
                ggml_cpu.gemv_int8(xs[w.shape[1]], w)

        run()
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        print(f"{m} row(s) of x: {best * 1e3:.2f} ms for {len(ws)} products (best of 10, isa {ggml_cpu.isa()})")


@torch.library.custom_op("longside_experiment::ggml_mm", mutates_args=())
def _ggml_mm(x: torch.Tensor, blocks: torch.Tensor, qtype: str, n: int, k: int) -> torch.Tensor:
    return ggml_cpu.gemv_int8(x.reshape(-1, k).contiguous(), GGMLWeight(blocks, qtype, (n, k))).reshape(*x.shape[:-1], n)


@_ggml_mm.register_fake
def _(x, blocks, qtype, n, k):
    return x.new_empty(*x.shape[:-1], n)


def compile_mlp() -> None:
    layers = load_backbone("smollm2-135m").parts.layers

    def lin(m, x):
        return torch.ops.longside_experiment.ggml_mm(x, m.blocks, m.qtype, m.out_features, m.in_features)

    def mlp_stack(h):
        for layer in layers:
            x = F.rms_norm(h, (h.shape[-1],), layer.post_attention_layernorm.weight, 1e-5)
            h = h + lin(layer.mlp.down_proj, F.silu(lin(layer.mlp.gate_proj, x)) * lin(layer.mlp.up_proj, x))
        return h

    h = torch.randn(1, 1, 576)

    def ms(f, reps=30):
        f(h)
        t = time.perf_counter()
        for _ in range(reps):
            f(h)
        return (time.perf_counter() - t) / reps * 1e3

    print(f"eager {ms(mlp_stack):.1f} ms")
    t = time.perf_counter()
    compiled = torch.compile(mlp_stack, dynamic=False)
    compiled(h)
    print(f"compile {time.perf_counter() - t:.0f} s; compiled {ms(compiled):.1f} ms; eager again {ms(mlp_stack):.1f} ms")


if __name__ == "__main__":
    torch.set_num_threads(2)
    mode = sys.argv[1] if len(sys.argv) > 1 else "profile"
    if mode in ("profile", "phases"):
        (profile if mode == "profile" else phases)(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    else:
        {"products": products, "rows": rows, "compile": compile_mlp}[mode]()

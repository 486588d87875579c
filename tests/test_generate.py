"""Generation: incremental decoding equals the training forward, memory moves at window
overflow, HF-style arguments, stop strings, streaming, batch isolation, memory helpers.

Uses the real SmolLM2 backbone with a 64-token window and a perturbed (non-zero) side
output, so the side network and its memory read change the logits."""

from __future__ import annotations

import pytest
import torch

from longside.backbone import encode_memory
from longside.config import SideNetConfig
from longside.errors import LongsideError, MemoryBankError
from longside.inference.generate import generate, stream
from longside.inference.sampling import GenerationConfig, TextPieces, process_logits
from longside.inference.window import LocalWindow
from longside.model import LongSideModel

W = 64


def make_model(backbone, mode: str = "gated", std: float = 0.01, **side) -> LongSideModel:
    model = LongSideModel(backbone, SideNetConfig(window=W, capacity_tokens=4096, memory_attention=mode, **side))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained side network adds exactly zero; make it matter
        model.side.up.weight.copy_(torch.randn(model.side.up.weight.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def model(smollm2):
    return make_model(smollm2)


@pytest.fixture(autouse=True)
def _fresh_memory(request):
    if "model" in request.fixturenames:
        request.getfixturevalue("model").init_memory(1)


def ids_of(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(100, 5000, (batch, n), generator=torch.Generator().manual_seed(seed))


def backbone_noise(bb, ids: torch.Tensor, cuts: list[int]) -> float:
    """How far the bare backbone's own logits move between a whole-segment pass and cached
    steps over `cuts` (segments of W restart at position 0), and between batch rows run
    together and alone: the float32 noise of this CPU's kernels (~7e-5 on AVX2, ~3e-4 on
    AVX-512), against which longside's incremental and batched logits are judged."""
    from transformers import DynamicCache

    cuts = sorted(set(cuts) | set(range(0, ids.shape[1], W)))  # pieces never straddle a segment
    with torch.no_grad():
        full = torch.cat([bb.logits(ids[:, a:a + W]) for a in range(0, ids.shape[1], W)], 1)
        outs, cache = [], None
        for a, b in zip(cuts, cuts[1:]):
            if a % W == 0:
                cache = DynamicCache()
            pos = torch.arange(a % W, a % W + b - a).expand(ids.shape[0], b - a)
            out = bb.encode(ids[:, a:b], cache=cache, use_cache=True, position_ids=pos)
            cache = out.cache
            outs.append(bb.lm_head(out.last_hidden))
        alone = torch.cat([bb.logits(ids[i:i + 1, :W]) for i in range(ids.shape[0])])
    return max((torch.cat(outs, 1) - full).abs().max().item(), (alone - full[:, :W]).abs().max().item())


# -- incremental decoding -------------------------------------------------------------------
@pytest.mark.parametrize("mode, side", [("gated", {}), ("joint", {}),
                                        ("joint", {"memory_sink_tokens": 4, "memory_distance": 48})])
def test_incremental_logits_match_full_segments(smollm2, mode, side):
    model = make_model(smollm2, mode, **side)
    ids = ids_of(W + 16, batch=2)
    model.init_memory(2)
    full = torch.cat([model(ids[:, :W]).logits, model(ids[:, W:]).logits], 1)  # read, then write
    model.init_memory(2)
    no_mem = model(ids[:, W:], use_memory=False, write_memory=False).logits
    window = LocalWindow(model, 2)
    # pieces of 9 tokens (a cached prefix and a causal block), then one token at a time
    # across the segment boundary
    cuts = [0, 5, *range(14, W - 4, 9), *range(W - 4, ids.shape[1] + 1)]
    inc = torch.cat([window.feed(ids[:, a:b], all_logits=True) for a, b in zip(cuts, cuts[1:])], 1)
    # float32 over 30 backbone blocks: the bare backbone alone differs between cached steps
    # and a whole-segment pass; memory read through keys made either way adds a little
    atol = max(1e-4, 5 * backbone_noise(smollm2, ids, cuts))
    torch.testing.assert_close(inc, full, atol=atol, rtol=1e-5)
    # the second segment really read memory (far above the float noise)
    assert (full[:, W:] - no_mem).abs().max() > 100 * atol


def test_fork_continues_a_prefix_without_touching_it(model):
    ids = ids_of(52)  # a prefix of 20 tokens, two continuations of 16: within one segment
    model.memorize("A first text to remember, so that memory is read. " * 20)
    conts = [ids[:, 20:36], ids[:, 36:52]]
    whole = [model(torch.cat([ids[:, :20], c], 1), write_memory=False).logits[:, 20:] for c in conts]
    window = LocalWindow(model, write_memory=False)
    window.feed(ids[:, :20])
    forks = [window.fork() for _ in conts]
    for f, c, want in zip(forks, conts, whole):
        torch.testing.assert_close(f.feed(c, all_logits=True), want, atol=1e-4, rtol=1e-5)
    assert window.n == 20 and forks[0].n == 36  # the prefix window itself did not move
    torch.testing.assert_close(window.feed(conts[1], all_logits=True), whole[1], atol=1e-4, rtol=1e-5)


def test_decoding_in_c_grows_side_caches_in_place_and_forks_stay_apart(smollm2, monkeypatch):
    """One token per row in C writes each side block's new position into a buffer with room
    to grow (no copy of the cache per token). Forks share that buffer with their prefix and
    whichever grows second copies it: the prefix and two forks, stepped in turn past the
    buffer's first capacity, each give the torch loops' logits."""
    model = LongSideModel(smollm2, SideNetConfig(window=160, capacity_tokens=4096))
    with torch.no_grad():
        model.side.up.weight.copy_(torch.randn(model.side.up.weight.shape, generator=torch.Generator().manual_seed(0))
                                   * 0.1)
    model.init_memory(1)
    model.memorize("A first text to remember, so that memory is read. " * 20)
    prefix, conts = ids_of(20), [ids_of(90, seed=s) for s in (2, 3, 4)]

    def run(native: bool):
        monkeypatch.setenv("LONGSIDE_DECODE", "c" if native else "torch")
        window = LocalWindow(model, write_memory=False)
        window.feed(prefix[:, :19])
        window.feed(prefix[:, 19:])  # one token: the side caches now view a buffer with room
        assert not native or hasattr(window.side_caches[0], "rooms")
        wins, outs, rooms = [window.fork(), window.fork(), window], [[], [], []], [{}, {}, {}]
        for t in range(90):
            for w, c, out, seen in zip(wins, conts, outs, rooms):
                out.append(w.feed(c[:, t:t + 1]))
                room = getattr(w.side_caches[0], "rooms", (None,))[0]
                seen[id(room)] = room  # held: an id is not reused while the test looks
        return [torch.cat(o) for o in outs], rooms

    c, rooms = run(True)
    # each grew in place: a buffer of its own after the shared one (the first fork keeps the
    # shared one), and one more when 64 positions were full
    assert all(2 <= len(r) <= 3 for r in rooms), rooms
    loops, _ = run(False)
    for a, b in zip(c, loops):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_window_grows_its_per_token_tensors_in_place(model):
    """A token's ids, memory keys/values and token-cache keys are written into buffers with
    room (no copy of the segment so far per token); a fork shares them until one grows, and
    each then holds its own text."""
    ids = ids_of(40)
    window = LocalWindow(model, write_memory=False)
    window.feed(ids[:, :5])
    ptrs = [t.data_ptr() for t in (window.ids, window.keys, window.token_keys)]
    for t in range(5, 30):
        window.feed(ids[:, t:t + 1])
    assert [t.data_ptr() for t in (window.ids, window.keys, window.token_keys)] == ptrs
    assert torch.equal(window.ids, ids[:, :30])
    fork = window.fork()
    fork.feed(ids[:, 30:35])
    window.feed(ids[:, 35:40])
    assert torch.equal(fork.ids, ids[:, :35]) and torch.equal(window.ids, torch.cat([ids[:, :30], ids[:, 35:]], 1))
    assert fork.keys.data_ptr() == ptrs[1] and window.keys.data_ptr() != ptrs[1]  # the fork grew first
    torch.testing.assert_close(fork.keys[:, :30], window.keys[:, :30])


def test_greedy_equals_transformers_generate_when_side_is_silent(smollm2):
    model = LongSideModel(smollm2, SideNetConfig(window=W, capacity_tokens=4096))  # up == 0: the backbone
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    ours = generate(model, ids, 12)
    ref = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=smollm2.tokenizer.eos_token_id)
    assert torch.equal(ours, ref)


# -- memory moves at window overflow --------------------------------------------------------
def test_memory_written_only_when_the_segment_fills(model):
    window = LocalWindow(model, 1)
    window.feed(ids_of(W - 1))
    assert window.n == W - 1 and len(model.memory.banks[0]) == 0
    window.feed(ids_of(1, seed=2))
    assert window.n == 0 and len(model.memory.banks[0]) == W and window.segments_written == 1
    keys = window.keys
    assert keys.shape[1] == 0  # the local caches restarted empty
    window.feed(ids_of(10, seed=3))
    assert window.n == 10 and len(model.memory.banks[0]) == W


def test_memory_holds_the_segment_keys(model, smollm2):
    ids = ids_of(W)
    LocalWindow(model, 1).feed(ids)
    k, _, h = encode_memory(smollm2, ids, model.config.memory_layer, model.token_layer)
    ref = smollm2.encode(ids, memory_layer=model.config.memory_layer)
    torch.testing.assert_close(k, ref.memory_keys)
    torch.testing.assert_close(h, ref.hidden_states[model.token_layer])
    got, _, mask = model.memory.banks[0].search(ref.memory_queries[0, :1], 1)
    assert mask.any()


def test_long_prompt_is_read_segment_by_segment(model):
    out = generate(model, ids_of(2 * W + 10), 3)
    assert out.shape == (1, 2 * W + 13)
    assert len(model.memory.banks[0]) == 2 * W  # two full segments; the partial one stays local


def test_generation_crossing_a_boundary_writes_once(model):
    generate(model, ids_of(W - 3), 8, eos_token_id=[])
    assert len(model.memory.banks[0]) == W


# -- arguments ----------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed(model):
    kw = dict(do_sample=True, temperature=1.3, top_k=50, top_p=0.95, eos_token_id=[])
    a = generate(model, ids_of(8), 6, seed=3, **kw)
    b = generate(model, ids_of(8), 6, seed=3, **kw)
    c = generate(model, ids_of(8), 6, seed=4, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(generate(model, ids_of(8), 6, do_sample=True, top_k=1, seed=5),
                       generate(model, ids_of(8), 6))


def test_logits_processing_matches_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 3
    seen = torch.randint(0, 500, (3, 20), generator=g)
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.8, repetition_penalty=1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8)):
        ref = proc(seen, ref)
    ours = process_logits(logits, seen, cfg)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_repetition_penalty_changes_greedy_output(model):
    plain = generate(model, "the the the the the", 8, eos_token_id=[])
    penal = generate(model, "the the the the the", 8, eos_token_id=[], repetition_penalty=2.0)
    assert "the the" not in penal.lower() and plain != penal


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1),
                                 dict(repetition_penalty=0.0), dict(temperature=float("nan")),
                                 dict(repetition_penalty=float("nan")), dict(top_k=2.5), dict(temperature="hot"),
                                 dict(max_new_tokens="3"), dict(max_new_tokens=2.0)])
def test_bad_sampling_arguments_are_refused(model, bad):
    with pytest.raises(LongsideError):
        generate(model, "hi", **{"max_new_tokens": 2, "do_sample": True, **bad})


def test_prompts_of_different_lengths_decode_together(model):
    prompts = ["Short one.", "A much longer prompt than the first, about the sea and its tides"]
    alone = []
    for p in prompts:
        model.init_memory(1)
        alone.append(generate(model, p, 60, eos_token_id=[]))  # the long row crosses its segment end
    model.init_memory(2)
    assert generate(model, prompts, 60, eos_token_id=[]) == alone
    assert [len(b) for b in model.memory.banks] == [0, W]  # the long row wrote its own segment


def test_bad_prompts_are_refused(model):
    with pytest.raises(LongsideError, match="max_new_tokens"):
        generate(model, "hi", 0)
    with pytest.raises(LongsideError, match="empty"):
        generate(model, "", 2)
    with pytest.raises(LongsideError, match="vocabulary"):
        generate(model, torch.tensor([[1, model.backbone.spec.vocab_size]]), 2)
    with pytest.raises(LongsideError, match="vocabulary"):
        generate(model, torch.tensor([[-1, 5]]), 2)
    with pytest.raises(TypeError, match="unknown generation option"):
        generate(model, "hi", 2, temprature=0.5)


def test_eos_ends_generation(model):
    free = generate(model, ids_of(6), 6, eos_token_id=[])
    eos = int(free[0, 6 + 2])  # make the third new token the end-of-sequence id
    stopped = generate(model, ids_of(6), 6, eos_token_id=eos)
    assert torch.equal(stopped, free[:, :6 + 3])


# -- stop strings and streaming --------------------------------------------------------------------
def test_stop_string_cuts_the_text(model):
    text = generate(model, "Once upon a time", 24, eos_token_id=[])
    word = text.split()[3]
    cut = generate(model, "Once upon a time", 24, eos_token_id=[], stop=[word, "zzzz-never"])
    assert cut == text[:text.index(word)]


def test_stream_pieces_join_to_the_generated_text(model):
    text = generate(model, "My favourite book is", 20)
    pieces = list(stream(model, "My favourite book is", 20))
    assert len(pieces) > 3 and "".join(pieces) == text


def test_streamed_pieces_never_show_a_stop_string(smollm2):
    tok = smollm2.tokenizer
    ids = tok("Hello, world. Stop here: END of it", add_special_tokens=False).input_ids
    pieces = TextPieces(tok, ["END"])
    shown = [pieces.push(i) for i in ids]
    assert pieces.stopped and "".join(shown) == "Hello, world. Stop here: "
    assert not any("E" in s for s in shown)
    utf = TextPieces(tok)
    out = "".join(utf.push(i) for i in tok("naïve café ☕", add_special_tokens=False).input_ids) + utf.finish()
    assert out == "naïve café ☕"


def _whole_decode_pieces(tok, ids, stops):
    """What the pieces must be: each token, decode the whole sequence so far; wait on a
    half character; cut at the first stop string; hold back a tail that may start one.
    -> the pieces, the text shown (at a stop) or finished (the last whole decoding), stopped."""
    shown, out, last = "", [], ""
    for n in range(1, len(ids) + 1):
        full = tok.decode(ids[:n], skip_special_tokens=True)
        if full.endswith("\ufffd"):
            out.append("")
            continue
        last = full
        cut = min((i for i in (full.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            new = full[:cut][len(shown):]
            out.append(new)
            return out, shown + new, True
        held = max((k for s in stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        upto = full[:len(full) - held]
        new = upto[len(shown):] if upto.startswith(shown) else ""
        shown += new
        out.append(new)
    return out, last, False


def test_text_pieces_equal_decoding_the_whole_sequence_each_token(smollm2):
    """TextPieces decodes a few tokens per push; piece by piece it must equal decoding the
    whole sequence at every token (multi-byte characters split across tokens, special tokens
    in the middle, random ids, stop strings anywhere), and no decode may grow with the text."""
    import random

    tok = smollm2.tokenizer
    text = "It was a truth universally acknowledged — “naïve café ☕”, 日本語 🎉 Ünïcödé.\n\n" * 6
    ids = tok(text, add_special_tokens=False).input_ids
    special = tok.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(0)
    longest = []

    class Counting:  # the tokenizer, recording how many ids each decode is given
        def decode(self, ids, **kw):
            longest.append(len(ids))
            return tok.decode(ids, **kw)

    for trial in range(60):
        seq = ids[rng.randrange(0, len(ids) // 2):][:rng.randrange(1, 120)]
        if trial % 3 == 1:
            seq = seq[:len(seq) // 2] + [special] + seq[len(seq) // 2:]
        if trial % 5 == 2:
            seq = [rng.randrange(0, tok.vocab_size) for _ in range(40)]
        full = tok.decode(seq, skip_special_tokens=True)
        stops = [full[i:i + 3], "zzqq"] if trial % 2 and len(full) > 8 and (i := rng.randrange(len(full) - 4)) else []
        want, want_text, want_stopped = _whole_decode_pieces(tok, seq, stops)
        pieces = TextPieces(Counting(), stops)
        got = [pieces.push(t) for t in seq]
        assert got[:len(want)] == want and pieces.stopped == want_stopped, (trial, stops)
        tail = pieces.finish()
        assert pieces.text == want_text and (tail == "" or not want_stopped)
    longest.clear()
    pieces = TextPieces(Counting(), ["zzqq"])
    for t in ids * 4:
        pieces.push(t)
    assert pieces.text + pieces.finish() == tok.decode(ids * 4, skip_special_tokens=True)
    assert max(longest) <= 8, max(longest)  # a few tokens per decode, not the reply so far


def test_hf_streamer_receives_prompt_then_each_token(model):
    class Recorder:
        def __init__(self):
            self.calls, self.ended = [], False

        def put(self, value):
            self.calls.append(value.clone())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = generate(model, ids_of(5), 4, streamer=rec, eos_token_id=[])
    assert rec.ended and torch.equal(rec.calls[0], out[:, :5])
    assert torch.equal(torch.cat([c.view(-1) for c in rec.calls[1:]]), out[0, 5:])
    with pytest.raises(LongsideError, match="batch size 1"):
        generate(model, ids_of(5, batch=2), 2, streamer=rec)


# -- batch isolation ------------------------------------------------------------------------
def test_batch_rows_read_only_their_own_memory(smollm2):
    model = make_model(smollm2, std=0.1)  # a louder side network: memories differ visibly
    book_a, book_b = ids_of(2 * W, seed=10), ids_of(2 * W, seed=11)
    prompt = ids_of(12, seed=12)

    def alone(book):
        model.init_memory(1)
        LocalWindow(model, 1).feed(book)  # two full segments -> memory
        return LocalWindow(model, 1, write_memory=False).feed(prompt, all_logits=True)

    ref_a, ref_b = alone(book_a), alone(book_b)
    model.init_memory(2)
    LocalWindow(model, 2).feed(torch.cat([book_a, book_b]))
    both = LocalWindow(model, 2, write_memory=False).feed(prompt.expand(2, -1), all_logits=True)
    atol = max(1e-4, 5 * backbone_noise(smollm2, torch.cat([book_a, book_b]), [0, 5, *range(14, 2 * W, 9), 2 * W]))
    torch.testing.assert_close(both[0], ref_a[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(both[1], ref_b[0], atol=atol, rtol=1e-5)
    assert (ref_a - ref_b).abs().max() > 10 * atol  # the memories differ far beyond the tolerance above
    texts = generate(model, ["Tell me a story", "Tell me a story"], 3)
    assert len(texts) == 2 and model.memory.lengths() == [2 * W, 2 * W]


def test_memorize_into_one_row(model, tmp_path):
    model.init_memory(2)
    path = tmp_path / "notes.txt"
    path.write_text("The secret password is swordfish. " * 20)
    n = model.memorize(path, row=1, progress=False)
    assert n > 0 and model.memory.lengths() == [0, n]
    model.memorize(["one text", "another text"], progress=False)  # every row
    assert model.memory.lengths()[0] > 0
    with pytest.raises(LongsideError, match="out of range"):
        model.memorize("x", row=5)
    with pytest.raises(LongsideError, match="empty"):
        model.memorize("")


# -- memory persistence -------------------------------------------------------------------------
def test_save_and_load_memory(model, tmp_path):
    model.memorize("It was a truth universally acknowledged. " * 30, progress=False)
    q = torch.randn(3, 9, 64)
    before = model.memory.banks[0].search(q, 4)
    model.save_memory(tmp_path / "m.lsmb")
    model.init_memory(1)
    model.load_memory(tmp_path / "m.lsmb")
    after = model.memory.banks[0].search(q, 4)
    for x, y in zip(before, after):
        assert torch.equal(x, y)


def test_load_memory_refuses_another_backbone(model, tmp_path):
    from longside.memory_bank import MemoryBank
    spec = model.backbone.spec
    alien = MemoryBank(spec.num_kv_heads, spec.head_dim, owner="gpt2:0123:layer5")
    alien.add(torch.randn(8, spec.num_kv_heads, spec.head_dim), torch.randn(8, spec.num_kv_heads, spec.head_dim))
    alien.save(tmp_path / "alien.lsmb")
    model.memorize("kept", progress=False)
    with pytest.raises(MemoryBankError, match="gpt2"):
        model.load_memory(tmp_path / "alien.lsmb")
    assert len(model.memory.banks[0]) > 0  # what was there is kept


# -- command line -------------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_cli_memorizes_and_streams(tmp_path):
    import os
    import subprocess
    import sys
    notes = tmp_path / "notes.txt"
    notes.write_text("The lighthouse keeper is called Morwenna. " * 5)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "longside", "generate", "--prompt", "Who keeps the lighthouse?",
                          "--chat", "--memorize", str(notes), "--max-new-tokens", "6"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "memorized" in run.stderr
    assert run.stdout.strip()
    bad = subprocess.run([sys.executable, "-m", "longside", "generate", "--prompt", "x", "--backbone-only",
                          "--memorize", str(notes)], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "--backbone-only" in bad.stderr


@pytest.mark.slow
def test_bench_generate_writes_the_schema(tmp_path):
    import json

    from longside.bench.generate import main
    out = tmp_path / "b.json"
    assert main(["--quick", "--rows", "longside-nf4", "--prompt-tokens", "16", "--new-tokens", "2",
                 "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [r["memory_tokens"] for r in rows] == [0, 16384, 65536]
    for r in rows:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["rss_mb"] > 0
    assert report["summary"]["decode_64k_memory_over_no_memory"] is not None


def test_bench_generate_llamacpp_row(tmp_path):
    """The llama.cpp row runs the very GGUF file where llama-cpp-python is installed, and
    says how to install it where not (a row error, not a crash of the whole run)."""
    import importlib.util
    import json

    from longside.bench.generate import main
    out = tmp_path / "b.json"
    assert main(["--quick", "--rows", "llama.cpp", "--prompt-tokens", "16", "--new-tokens", "2",
                 "--threads", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "llama.cpp"
    if importlib.util.find_spec("llama_cpp") is None:
        assert "longside[bench]" in row["error"]
    else:
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
        assert row["weights"].endswith(".gguf") and "llama-cpp-python" in row["backend"]


def test_bench_generate_refuses_a_bad_block_spec_before_any_row():
    from longside.bench.generate import main
    from longside.errors import CheckpointError
    with pytest.raises(CheckpointError, match="15-29"):
        main(["--quick", "--rows", "longside-nf4+bm", "--backbone-memory", "29-15"])


@pytest.mark.slow
def test_bench_generate_times_backbone_memory_rows(tmp_path):
    import json

    from longside.bench.generate import main
    out = tmp_path / "b.json"
    assert main(["--quick", "--rows", "longside-native+bm", "--backbone-memory", "29", "--prompt-tokens", "16",
                 "--new-tokens", "2", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["model"], r["memory_tokens"]) for r in rows] == [("longside-native+bm", m) for m in (0, 16384, 65536)]
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and r["backbone_memory_layers"] == [29]
    assert "65536" in rows[2]["memory_fill"] or "times over" in rows[2]["memory_fill"]
    assert report["backbone_memory"] == "29"


# -- a carried window ---------------------------------------------------------------------------
C = 16  # tokens carried into the next segment


def make_carrying_model(backbone, **kw) -> LongSideModel:
    model = make_model(backbone)
    return LongSideModel(backbone, SideNetConfig(window=W, capacity_tokens=4096, memory_attention="gated",
                                                 window_carry=C, **kw), side=model.side)


def test_a_carried_window_decodes_as_forward_reads_carried_segments(smollm2):
    """LocalWindow with window_carry = C: after a full segment, the next one reads the last C
    tokens again (not written twice). Its logits equal forward's on the same readings:
    [0, W), then [W - C, 2W - C) with carried=C, then the partial rest."""
    model = make_carrying_model(smollm2)
    ids = ids_of(2 * W + 20)
    model.init_memory(1)
    starts = [0, W - C, 2 * W - 2 * C]
    ref = []
    for i, a in enumerate(starts):
        carried = C if i else 0
        ref.append(model(ids[:, a:a + W], carried=carried).logits[:, carried:])
    ref = torch.cat(ref, 1)
    written = len(model.memory.banks[0])
    assert written == W + (W - C) + (ids.shape[1] - (2 * W - C))  # each token once; forward writes the partial one
    model.init_memory(1)
    window = LocalWindow(model, 1)
    cuts = [0, 7, *range(11, W - 2, 13), *range(W - 2, W + 3), 2 * W - C - 1, 2 * W - C + 1, ids.shape[1]]
    inc = torch.cat([window.feed(ids[:, a:b], all_logits=True) for a, b in zip(cuts, cuts[1:])], 1)
    atol = max(1e-3, 5 * backbone_noise(smollm2, ids, cuts))
    torch.testing.assert_close(inc, ref, atol=atol, rtol=1e-5)
    assert window.carried == C and window.n == C + ids.shape[1] - (2 * W - C) and window.segments_written == 2
    assert len(model.memory.banks[0]) == W + (W - C)  # the partial segment stays in the window
    window.flush()  # writes all but the carried tokens
    assert len(model.memory.banks[0]) == written and window.carried == 0


def test_memorizing_with_a_carried_window_writes_what_decoding_writes(smollm2):
    model = make_carrying_model(smollm2)
    ids = ids_of(2 * W + 20, seed=7)
    model.init_memory(1)
    window = LocalWindow(model, 1)
    window.feed(ids)
    window.flush()
    bank = model.memory.banks[0]
    fed = bank._keys[:, :bank.num_chunks].clone(), len(bank), len(bank.tokens)
    model.init_memory(1)
    assert model.memory.write_ids(ids[0].tolist()) == 3
    bank = model.memory.banks[0]
    assert (len(bank), len(bank.tokens)) == fed[1:] == (ids.shape[1], ids.shape[1] - 1)
    torch.testing.assert_close(bank._keys[:, :bank.num_chunks].float(), fed[0].float(), atol=2e-2, rtol=0)


def test_a_carried_window_with_backbone_memory_stores_each_token_once(smollm2):
    model = make_carrying_model(smollm2, backbone_memory_layers=[20])
    model.init_memory(1)
    window = LocalWindow(model, 1)
    window.feed(ids_of(2 * W, seed=8))
    sinks = model.backbone_memory.sink_tokens
    # the first segment keeps its sink tokens out; the second its carried ones (already stored)
    assert model.backbone_memory.lengths() == [(W - sinks) + (W - C)]
    assert len(model.memory.banks[0]) == W + (W - C)


def test_a_carry_must_be_below_the_window(smollm2):
    for bad in (-1, W):
        with pytest.raises(Exception, match="window_carry"):
            SideNetConfig(window=W, window_carry=bad)
    model = make_carrying_model(smollm2)
    with pytest.raises(LongsideError, match="carried"):
        model(ids_of(8), carried=8)


@pytest.mark.parametrize("change", ["drop_token_cache", "use_window_carry", "use_memory_distance", "use_query_maps",
                                    "the same carry again"])
def test_a_window_made_before_a_setting_changed_is_refused(smollm2, change):
    """A changed setting brings a new, empty memory: an old window must not read it the old way
    nor write its half-read segment into it."""
    model = make_model(smollm2, mode="joint")
    early, fed = LocalWindow(model), LocalWindow(model)
    fed.feed(ids_of(16))
    {"drop_token_cache": lambda: model.drop_token_cache(),
     "use_window_carry": lambda: model.use_window_carry(16),
     "use_memory_distance": lambda: model.use_memory_distance(48),
     "use_query_maps": lambda: model.use_query_maps({}),
     "the same carry again": lambda: model.use_window_carry(model.config.window_carry)}[change]()
    field = {"drop_token_cache": "token_cache", "use_window_carry": "window_carry",
             "use_memory_distance": "memory_distance"}.get(change, "query maps, or a setting made again")
    with pytest.raises(LongsideError, match=rf"settings changed \({field}\).*make a new window"):
        early.feed(ids_of(4))
    with pytest.raises(LongsideError, match="settings changed"):
        fed.flush()
    assert model.memory.is_empty()
    assert LocalWindow(model).feed(ids_of(4)).shape == (1, smollm2.spec.vocab_size)

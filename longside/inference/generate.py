"""Text generation with long-term memory.

    model = LongSideModel.from_pretrained()
    model.memorize("pride_and_prejudice.txt")                  # into memory, with a progress bar
    print(generate(model, "Who is Mr. Darcy?", chat=True, max_new_tokens=60))
    for piece in stream(model, "Once upon a time", max_new_tokens=40):
        print(piece, end="", flush=True)

Decoding is incremental (see window.py): the prompt is read segment by segment (full
segments go to memory, as in training), then each new token costs one cached step of the
backbone and side network plus one memory search. Segments that fill during a call stay
in memory: the model remembers what it read and wrote. `model.reset_memory()` forgets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from longside.backbone import check_token_ids, plain_text, tokenize
from longside.errors import LongsideError
from longside.inference.ragged import RaggedWindows
from longside.inference.sampling import GenerationConfig, TextPieces, make_generator, next_token
from longside.inference.window import LocalWindow

if TYPE_CHECKING:
    from longside.model import LongSideModel


def eos_ids(model: "LongSideModel", eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """The token ids that end a sequence: the given ones, else the tokenizer's and the
    generation config's end-of-sequence ids."""
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    ids = {model.backbone.tokenizer.eos_token_id}
    gen = getattr(model.backbone.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return sorted(i for i in ids if i is not None)


def encode_prompt(model: "LongSideModel", prompt, chat: bool = False, system: str | None = None,
                  ragged: bool = False):
    """A prompt (text, a list of equally long texts, or ids `[T]`/`[B, T]`) -> ids `[B, T]`
    int64; with `ragged`, texts of different lengths give a list of `[1, T_b]` instead."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int64, torch.int32):
            raise LongsideError(f"input_ids must be a non-empty integer tensor [batch, tokens], got "
                                f"{tuple(prompt.shape)} {prompt.dtype}")
        check_token_ids(ids, model.backbone.spec.vocab_size)
        return ids.long()
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise LongsideError("prompt must be text, a list of texts, or a tensor of token ids")
    tok = model.backbone.tokenizer
    if chat:
        # the prompt is user text: special-token strings in it stay text, never markers
        msgs = ([{"role": "system", "content": plain_text(tok, system)}] if system else [])
        texts = [tok.apply_chat_template(msgs + [{"role": "user", "content": plain_text(tok, t)}],
                                         add_generation_prompt=True, tokenize=False) for t in texts]
    rows = [tokenize(tok, t) for t in texts]
    if any(len(r) == 0 for r in rows):
        raise LongsideError("empty prompt: give at least one token of text")
    if len({len(r) for r in rows}) > 1:
        if ragged:
            return [torch.tensor([r]) for r in rows]
        raise LongsideError(
            f"batched prompts must have the same number of tokens (got {sorted({len(r) for r in rows})}): "
            "each row decodes in lockstep with its own memory; generate rows of different lengths one by one")
    return torch.tensor(rows)


def decode_loop(window: LocalWindow, prompt_ids: torch.Tensor, cfg: GenerationConfig, eos: Sequence[int],
                generator: torch.Generator | None, pieces: list[TextPieces] | None = None,
                logits: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """The generation loop over a `LocalWindow`: feed `prompt_ids [B, T]` (unless the caller
    has read them already: `logits [B, V]` after them), then choose and feed tokens one at a
    time.

    Yields, per step, the chosen tokens `[B]` int64 and each row's new text (from
    `pieces`, one `TextPieces` per row, else empty strings). A row ends at an `eos` token
    or a stop string; ended rows repeat `eos[0]` (padding) until every row has ended or
    `cfg.max_new_tokens` were chosen (sampling as `cfg` says). The last chosen token is not fed: the caller (a chat)
    feeds it with whatever comes next.
    """
    B, max_new_tokens = prompt_ids.shape[0], cfg.max_new_tokens
    logits = window.feed(prompt_ids) if logits is None else logits
    # the tokens so far feed the repetition penalty alone: kept only where it is on
    seen = prompt_ids.to(logits.device) if cfg.repetition_penalty != 1.0 else None
    done = [False] * B
    eos_set, pad = {int(e) for e in eos}, max(int(eos[0]), 0) if eos else 0
    for step in range(max_new_tokens):
        tok = next_token(logits, seen, cfg, generator)
        if any(done):
            tok = torch.where(torch.tensor(done, device=tok.device), pad, tok)
        texts = [""] * B
        for b, t in enumerate(tok.tolist()):
            if done[b]:
                continue
            if t in eos_set:
                done[b] = True
            elif pieces is not None:
                texts[b] = pieces[b].push(t)
                done[b] = pieces[b].stopped
        yield tok, texts
        if all(done) or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen = torch.cat([seen, tok[:, None]], 1)
        logits = window.feed(tok[:, None])


def generate(model: "LongSideModel", prompt, max_new_tokens: int | None = None, *,
             config: GenerationConfig | None = None, streamer: Any = None, **options):
    """Generate from `prompt`; options are the fields of `GenerationConfig` (the Hugging
    Face arguments users know: do_sample, temperature, top_k, top_p, repetition_penalty,
    eos_token_id, stop, seed, chat, system, use_memory, write_memory), given one by one
    or as `config`.

    prompt: text (returns the new text, cut before any stop string, special tokens
        skipped), a list of texts (returns a list of texts; row b reads memory row b;
        rows of different lengths decode together, see ragged.py), or token ids
        `[B, T]`/`[T]` (returns ids `[B, T + new]` like HF `generate`, ended rows padded
        with the end-of-sequence id).
    streamer: an HF streamer (`put(ids)`, `end()`, e.g. `TextStreamer`); batch size 1.
    """
    cfg = (config or GenerationConfig()).updated(max_new_tokens=max_new_tokens, **options)
    ids = encode_prompt(model, prompt, chat=cfg.chat, system=cfg.system, ragged=streamer is None)
    if isinstance(ids, list):
        return _generate_rows(model, ids, cfg)
    B = ids.shape[0]
    if streamer is not None and B != 1:
        raise LongsideError("a streamer needs batch size 1; generate rows one by one to stream them")
    tok = model.backbone.tokenizer
    # token ids in and out need the text only to find stop strings
    pieces = None if isinstance(prompt, torch.Tensor) and not cfg.stops() else \
        [TextPieces(tok, cfg.stops()) for _ in range(B)]
    window = LocalWindow(model, B, use_memory=cfg.use_memory, write_memory=cfg.write_memory)
    if streamer is not None:
        streamer.put(ids.cpu())
    chosen = []
    try:
        for t, _ in decode_loop(window, ids, cfg, eos_ids(model, cfg.eos_token_id),
                                make_generator(cfg.seed), pieces):
            chosen.append(t.cpu())
            if streamer is not None:
                streamer.put(t.cpu())
    finally:
        if streamer is not None:
            streamer.end()
    if isinstance(prompt, torch.Tensor):
        return torch.cat([ids, torch.stack(chosen, 1)], 1)
    texts = [p.text + p.finish() for p in pieces]
    return texts[0] if isinstance(prompt, str) else texts


def _generate_rows(model: "LongSideModel", rows: list[torch.Tensor], cfg: GenerationConfig) -> list[str]:
    """Texts of rows of different lengths `[1, T_b]`, decoded together (RaggedWindows):
    each row reads its prompt in its own window, then all step as one batch."""
    memory = model.memory_for(len(rows))
    tok, eos, gen = model.backbone.tokenizer, eos_ids(model, cfg.eos_token_id), make_generator(cfg.seed)
    batch = RaggedWindows(model, use_memory=cfg.use_memory, write_memory=cfg.write_memory)
    pieces = [TextPieces(tok, cfg.stops()) for _ in rows]
    logits = []
    for b, ids in enumerate(rows):
        window = LocalWindow(model, 1, use_memory=cfg.use_memory, write_memory=cfg.write_memory,
                             memory=memory.row(b))
        logits.append(window.feed(ids))
        batch.join(window)
    logits, seen, done = torch.cat(logits), [r.to(logits[0].device) for r in rows], [False] * len(rows)
    pad = eos[0] if eos else 0
    for step in range(cfg.max_new_tokens):
        # ended rows are fed the end-of-sequence id, as decode_loop pads them, and draw nothing
        chosen = [pad if done[b] else int(next_token(logits[b:b + 1], seen[b], cfg, gen)[0])
                  for b in range(len(rows))]
        for b, t in enumerate(chosen):
            if done[b]:
                continue
            seen[b] = torch.cat([seen[b], seen[b].new_tensor([[t]])], 1)
            done[b] = t in eos
            if not done[b]:
                pieces[b].push(t)
                done[b] = pieces[b].stopped
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        logits = batch.step(torch.tensor(chosen))
    return [p.text + p.finish() for p in pieces]


def stream(model: "LongSideModel", prompt: str, max_new_tokens: int | None = None, *,
           config: GenerationConfig | None = None, **options) -> Iterator[str]:
    """Like `generate` for one text prompt, yielding the new text piece by piece as it is
    decided (never half a character, never part of a stop string)."""
    if not isinstance(prompt, str):
        raise LongsideError("stream takes one text prompt; use generate for token ids or batches")
    cfg = (config or GenerationConfig()).updated(max_new_tokens=max_new_tokens, **options)
    ids = encode_prompt(model, prompt, chat=cfg.chat, system=cfg.system)
    pieces = TextPieces(model.backbone.tokenizer, cfg.stops())
    window = LocalWindow(model, 1, use_memory=cfg.use_memory, write_memory=cfg.write_memory)
    for _, texts in decode_loop(window, ids, cfg, eos_ids(model, cfg.eos_token_id),
                                make_generator(cfg.seed), [pieces]):
        if texts[0]:
            yield texts[0]
    tail = pieces.finish()
    if tail:
        yield tail

"""Training the side network with the backbone frozen (`longside train`).

Each batch row streams one document in contiguous segments with its own memory bank,
reset at document boundaries. Documents are training books and, with probability
`synthetic_share`, synthetic pass-key documents (real filler text, a number stated once,
asked for at the end: only the answer is scored). Next-token loss, AdamW, warm-up +
cosine, gradient clipping; validation perplexity with and without memory; safetensors
checkpoints with exact resume (optimizer, scheduler, RNG, data position, memory banks).
With `feature_cache`, the backbone's features of each segment are kept on disk and
replayed when the segment comes back (feature_cache.py).
`accelerate` wraps the side network, so `accelerate launch -m longside train ...` runs
data-parallel with no code change (each process streams its own rows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from longside.backbone import Backbone, load_backbone
from longside.config import SideNetConfig
from longside.errors import LongsideError
from longside.model import LongSideModel
from longside.paths import atomic_dir, atomic_file, cache_dir


@dataclass
class TrainConfig:
    """One training run. `side` configures the side network; the rest the optimisation."""

    side: SideNetConfig = field(default_factory=SideNetConfig)
    backbone: str = "smollm2-135m"
    quantize: str | None = None  # "nf4": a 4-bit backbone
    batch_size: int = 1  # rows per process, each streaming its own document
    segment: int = 1024  # tokens per segment (<= side.window)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_steps: int = 400
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    synthetic_share: float = 0.25  # share of documents that are synthetic pass-key tasks
    synthetic_max_segments: int = 16  # a pass key stated up to this many segments back
    max_book_segments: int = 64  # a book is cut after this many segments (more books seen)
    eval_every: int = 100
    eval_segments: int = 6  # per validation book: memory helps from the second on
    save_every: int = 100
    seed: int = 0
    out: str = "runs/smollm2-135m"
    feature_cache: str | None = None  # a directory: backbone features replayed when a segment recurs
    feature_cache_gb: float = 20.0
    feature_cache_dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        raw = dict(raw)
        side = SideNetConfig(**raw.pop("side", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        if set(raw) - known:
            raise LongsideError(f"unknown training options {sorted(set(raw) - known)}")
        return cls(side=side, **raw)


PRESETS: dict[str, dict] = {
    # The shipped checkpoint: SmolLM2-135M, r=4 (side width 144), 10 side layers, memory at
    # block 15, 1024-token segments. Sized for this 2-core CPU (see README for wall time).
    "smollm2-135m": {"out": "runs/smollm2-135m", "max_steps": 1200, "warmup_steps": 30,
                     "synthetic_share": 0.5, "synthetic_max_segments": 4, "max_book_segments": 16,
                     "eval_every": 300, "eval_segments": 4, "save_every": 50,
                     "side": {"memory_attention": "joint"}},
    # A few steps on short segments: for tests and smoke runs.
    "tiny": {"segment": 64, "max_steps": 6, "warmup_steps": 2, "eval_every": 3, "eval_segments": 2,
             "save_every": 3, "synthetic_max_segments": 3, "max_book_segments": 4,
             "side": {"window": 64, "capacity_tokens": 1024}, "out": "runs/tiny"},
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise LongsideError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    raw = json.loads(json.dumps(PRESETS[name]))
    side = {**raw.pop("side", {}), **overrides.pop("side", {})}
    return TrainConfig.from_dict({**raw, **overrides, "side": side})


# -- data ------------------------------------------------------------------------------
def tokenized_books(backbone: Backbone, split: str) -> list[np.ndarray]:
    """Token ids (int32) of each book of a split, cached on disk per backbone."""
    path = cache_dir() / "tokens" / f"{backbone.name}-{backbone.fingerprint}" / f"{split}.npz"
    if path.exists():
        with np.load(path) as z:
            return [z[k] for k in sorted(z.files, key=int)]
    from longside.data import load_books

    books = load_books(split)
    out = []
    for book in books:
        text = "\n\n".join(f"{c['title']}\n\n{c['text']}" for c in book["chapters"])
        out.append(np.asarray(backbone.tokenizer(text).input_ids, dtype=np.int32))
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{str(i): a for i, a in enumerate(out)})
    return out


class DocumentStream:
    """Deterministic documents by number: doc `i` is a function of (seed, i) alone, so a
    stream resumes exactly from `(next_doc, per-row position)`."""

    def __init__(self, books: list[np.ndarray], cfg: TrainConfig, tokenizer, rank: int = 0, world: int = 1):
        self.books = [b for b in books if len(b) >= 2 * cfg.segment]
        if not self.books:
            raise LongsideError("no training book is long enough for two segments; prepare the corpora")
        self.cfg, self.tok, self.rank, self.world = cfg, tokenizer, rank, world

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of document i, both int64 `[n_segments * segment]`; labels -100 = unscored."""
        cfg = self.cfg
        i = i * self.world + self.rank
        rng = np.random.default_rng([cfg.seed, i])
        if rng.random() < cfg.synthetic_share:
            return self._passkey(rng)
        epoch, k = divmod(i, len(self.books))
        order = np.random.default_rng([cfg.seed, 1_000_003, epoch]).permutation(len(self.books))
        ids = self.books[order[k]]
        n = min(len(ids) // cfg.segment, cfg.max_book_segments)
        ids = ids[: n * cfg.segment].astype(np.int64)
        return ids, ids.copy()

    def _passkey(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = int(rng.integers(2, self.cfg.synthetic_max_segments + 1))
        # the fact sits somewhere in the segments before the last, so it must come from memory
        return recall_document(self.tok, self.books, n * self.cfg.segment, rng, fact_before=(n - 1) * self.cfg.segment)


# (fact, question) templates of synthetic recall documents; {key} is the number
PASSKEY_TEMPLATE = ("\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                    "\nWhat is the pass key? The pass key is")


def recall_document(tokenizer, books: list[np.ndarray], length: int, rng: np.random.Generator, *,
                    fact_before: int, template: tuple[str, str] = PASSKEY_TEMPLATE,
                    digits: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A number stated once in real filler text (a random stretch of one of `books`, token
    id arrays) and asked for at the end; `length` tokens in all, the fact starting before
    token `fact_before`. Returns (ids, labels) int64 `[length]`: only the answer
    (" {key}.") is scored, labels -100 elsewhere."""
    key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    fact, question, answer = enc(template[0].format(key=key)), enc(template[1]), enc(f" {key}.")
    need = length - len(fact) - len(question) - len(answer)
    if need < 1 or not len(fact) < fact_before <= need + len(fact):
        raise LongsideError(f"a recall document of {length} tokens cannot hold its fact before token "
                            f"{fact_before} and its question")
    book = books[int(rng.integers(len(books)))]
    start = int(rng.integers(0, max(1, len(book) - need)))
    text = np.resize(book[start:start + need], need)
    at = int(rng.integers(0, fact_before - len(fact)))
    ids = np.concatenate([text[:at], fact, text[at:], question, answer]).astype(np.int64)
    labels = np.full_like(ids, -100)
    labels[-len(answer):] = ids[-len(answer):]
    return ids, labels


class RowCursor:
    """Where each batch row is: its document number and next segment."""

    def __init__(self, stream: DocumentStream, rows: int, state: dict | None = None):
        self.stream = stream
        state = state or {"next_doc": rows, "rows": [[r, 0] for r in range(rows)]}
        self.next_doc = state["next_doc"]
        self.rows = [list(r) for r in state["rows"]]
        self._docs = {r: stream.document(d) for r, (d, _) in enumerate(self.rows)}

    def state(self) -> dict:
        return {"next_doc": self.next_doc, "rows": [list(r) for r in self.rows]}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """ids, labels `[B, S]` and the rows that start a new document (reset their memory)."""
        S = self.stream.cfg.segment
        ids, labels, fresh = [], [], []
        for r, (doc, seg) in enumerate(self.rows):
            d_ids, d_lab = self._docs[r]
            if (seg + 1) * S > len(d_ids):
                doc, seg = self.next_doc, 0
                self.next_doc += 1
                self._docs[r] = d_ids, d_lab = self.stream.document(doc)
            if seg == 0:
                fresh.append(r)
            ids.append(d_ids[seg * S:(seg + 1) * S])
            labels.append(d_lab[seg * S:(seg + 1) * S])
            self.rows[r] = [doc, seg + 1]
        return torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(labels)), fresh


# -- the loop --------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine decay to `min_lr_ratio`, as a multiplier of `cfg.lr`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def validate(model: LongSideModel, books: list[np.ndarray], segment: int, n_segments: int) -> dict:
    """Perplexity of segments 2..n of each validation book, memory on and off.

    Uses a memory of its own: the training rows' banks are set aside and restored."""
    saved = model._memory, model._memory_batch, model._backbone_memory
    model._memory = model._backbone_memory = None
    losses = {"memory": [0.0, 0], "no_memory": [0.0, 0]}
    for book in books:
        segs = [torch.from_numpy(book[i * segment:(i + 1) * segment].astype(np.int64))[None]
                for i in range(min(n_segments, len(book) // segment))]
        for mode, use in (("memory", True), ("no_memory", False)):
            model.reset_memory()
            for i, s in enumerate(segs):
                out = model(s, labels=s if i else None, use_memory=use, write_memory=use, return_logits=False)
                if i:
                    losses[mode][0] += out.loss.item() * out.n_tokens
                    losses[mode][1] += out.n_tokens
    model._memory, model._memory_batch, model._backbone_memory = saved
    return {f"ppl_{k}": math.exp(v[0] / max(v[1], 1)) for k, v in losses.items()}


def attach_feature_cache(model: LongSideModel, cfg: TrainConfig) -> None:
    """Give `model` the feature cache `cfg` names (none when `cfg.feature_cache` is unset)."""
    if not cfg.feature_cache:
        return
    from longside.feature_cache import FeatureCache

    if cfg.side.backbone_memory_layers:
        raise LongsideError("a feature cache cannot replay a backbone that reads memory (backbone_memory_layers "
                            f"{cfg.side.backbone_memory_layers}): its features depend on what memory holds")
    fc, out_dir = Path(cfg.feature_cache).resolve(), Path(cfg.out).resolve()
    if fc == out_dir or out_dir in fc.parents:
        raise LongsideError(f"the feature cache {fc} must not lie inside the checkpoint directory {cfg.out}, "
                            "which every save replaces; choose a directory outside it")
    model.feature_cache = FeatureCache(fc, model.backbone, model.feature_layers(), cfg.side.memory_layer,
                                       cfg.feature_cache_dtype, cfg.feature_cache_gb)


def train(cfg: TrainConfig, resume: str | Path | None = None, max_minutes: float | None = None,
          backbone: Backbone | None = None, progress: bool = True) -> dict:
    """Run (or resume) training; returns the final metrics. Checkpoints go to `cfg.out`."""
    from accelerate import Accelerator
    from tqdm import tqdm

    if cfg.segment > cfg.side.window:
        raise LongsideError(f"segment {cfg.segment} exceeds the side network's window {cfg.side.window}")
    if cfg.side.backbone_memory_layers:
        raise LongsideError(
            f"training with backbone memory (backbone_memory_layers {cfg.side.backbone_memory_layers}) is not "
            "supported: its banks are not part of the resumable state, and a feature cache cannot replay a "
            "backbone whose features depend on memory. Train with backbone_memory_layers [] and switch it "
            "on in the trained checkpoint's side_config.json (it needs no training)")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    backbone = backbone or load_backbone(cfg.backbone, quantize=cfg.quantize)
    model = LongSideModel(backbone, cfg.side)
    attach_feature_cache(model, cfg)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    stream = DocumentStream(tokenized_books(backbone, "train"), cfg, backbone.tokenizer,
                            acc.process_index, acc.num_processes)
    val_books = tokenized_books(backbone, "validation")
    step, cursor_state, history = 0, None, []
    if resume:
        step, cursor_state, history = _load_state(Path(resume), model, opt, sched)
    side, opt = acc.prepare(model.side, opt)
    model._side_runner = side  # gradients all-reduce through the wrapper when data-parallel
    cursor = RowCursor(stream, cfg.batch_size, cursor_state)
    if resume:
        _load_memory(Path(resume), model, cfg.batch_size)
    t_start, tokens, scored = time.time(), 0, 0
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress or not acc.is_local_main_process,
               desc="train", unit="step")
    metrics: dict = {}
    while step < cfg.max_steps:
        ids, labels, fresh = cursor.next_batch()
        if fresh:
            model.reset_memory(fresh)
        if (labels != -100).sum() == 0:  # filler of synthetic documents: only write memory
            with torch.no_grad():
                model(ids, use_memory=False, write_memory=True, return_logits=False)
            tokens += ids.numel()
            continue
        out = model(ids, labels=labels, return_logits=False)
        acc.backward(out.loss)
        grad_norm = acc.clip_grad_norm_(side.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += ids.numel()
        scored += out.n_tokens
        elapsed = time.time() - t_start
        metrics = {"step": step, "loss": out.loss.item(), "grad_norm": float(grad_norm),
                   "lr": sched.get_last_lr()[0], "tokens_per_s": tokens / elapsed, "tokens": tokens}
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        bar.update(1)
        done = step >= cfg.max_steps or (max_minutes is not None and elapsed > 60 * max_minutes)
        if step % cfg.eval_every == 0 or done:
            metrics.update(validate(model, val_books, cfg.segment, cfg.eval_segments))
        history.append(metrics)
        if acc.is_main_process and (step % cfg.save_every == 0 or done):
            _save_state(out_dir, model, opt, sched, step, cursor.state(), history, cfg)
        if done:
            break
    bar.close()
    if model.feature_cache is not None:
        metrics["feature_cache"] = model.feature_cache.stats()
    return {"step": step, "wall_s": time.time() - t_start, "tokens": tokens, "scored_tokens": scored, **metrics}


def _save_state(out: Path, model: LongSideModel, opt, sched, step: int, cursor: dict, history: list,
                cfg: TrainConfig) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "model", dtype=torch.float32)
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state(), "cursor": cursor}, tmp / "train_state.pt")
        if model._memory is not None:
            for r, bank in enumerate(model._memory.banks):
                bank.save(tmp / f"memory_row{r}.bank")
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (tmp / "history.json").write_text(json.dumps(history, indent=1))


def _load_state(path: Path, model: LongSideModel, opt, sched):
    from longside.errors import CheckpointError
    from safetensors.torch import load_file

    if not (path / "train_state.pt").exists():
        raise CheckpointError(f"{path} holds no training state to resume (train_state.pt missing)")
    state = load_file(str(path / "model" / "side_model.safetensors"))
    model.side.load_state_dict(state)
    ts = torch.load(path / "train_state.pt", weights_only=False)
    opt.load_state_dict(ts["optimizer"])
    sched.load_state_dict(ts["scheduler"])
    torch.set_rng_state(ts["torch_rng"])
    history = json.loads((path / "history.json").read_text()) if (path / "history.json").exists() else []
    return ts["step"], ts["cursor"], history


def _load_memory(path: Path, model: LongSideModel, rows: int) -> None:
    from longside.memory_bank import MemoryBank

    model._make_memory(rows)
    for r in range(rows):
        f = path / f"memory_row{r}.bank"
        if f.exists():
            model._memory.banks[r] = MemoryBank.load(f, expect_owner=model.backbone.owner_id(model.config.memory_layer))

"""What training reads: the books as token ids (cached per backbone), documents by number
(`DocumentStream`: books and synthetic pass-key documents), and one cursor per batch row
(`RowCursor`) whose position resumes exactly."""

from __future__ import annotations

import numpy as np
import torch

from longside.backbone import Backbone
from longside.data import load_books
from longside.errors import LongsideError
from longside.paths import atomic_file, cache_dir
from longside.training.config import TrainConfig


def tokenized_books(backbone: Backbone, split: str) -> list[np.ndarray]:
    """Token ids (int32) of each book of a split, cached on disk per backbone."""
    path = cache_dir() / "tokens" / f"{backbone.name}-{backbone.fingerprint}" / f"{split}.npz"
    if path.exists():
        with np.load(path) as z:
            return [z[k] for k in sorted(z.files, key=int)]
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
        # a book longer than one document: each epoch reads its next stretch (epoch 0 its
        # opening; the last stretch ends at the book's end), then the first again, so a long
        # run reads all of the text and a stretch recurs whole (the feature cache still pays)
        span = n * cfg.segment
        stretches = -(-len(ids) // span)
        start = min(epoch % stretches * span, len(ids) - span)
        ids = ids[start:start + span].astype(np.int64)
        return ids, ids.copy()

    def _passkey(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = int(rng.integers(2, self.cfg.synthetic_max_segments + 1))
        # the fact sits somewhere in the segments before the last, so it must come from memory
        return recall_document(self.tok, self.books, n * self.cfg.segment, rng, fact_before=(n - 1) * self.cfg.segment)


# (fact, question) templates of synthetic recall documents; {key} is the number
PASSKEY_TEMPLATE = ("\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                    "\nWhat is the pass key? The pass key is")



def book_documents(backbone: Backbone, split: str, n: int, length: int) -> list[np.ndarray]:
    """Up to `n` documents of `length` token ids (int64): consecutive non-overlapping
    stretches of the split's books, `n` picked evenly across all of them."""
    docs = [b[s:s + length].astype(np.int64) for b in tokenized_books(backbone, split) if len(b) >= length
            for s in range(0, len(b) - length + 1, length)]
    return docs[:: max(1, len(docs) // n)][:n]

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

    def position(self, row: int) -> tuple[np.ndarray, int]:
        """The document `row` is streaming (ids `[L]`) and the index of the segment the
        last batch gave it."""
        return self._docs[row][0], self.rows[row][1] - 1

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

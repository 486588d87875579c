"""`Memory`: everything a `LongSideModel` remembers, one row per sequence of a batch.

A memory owns two kinds of bank, both written by the frozen backbone alone:

- `layer`: a `BatchMemory` of the memory layer's pre-rotary keys/values in chunks, read
  by the side network's memory attention, and (with the token cache) each token's hidden
  state and the token that followed it;
- `blocks`: a `BackboneMemory` (per-block banks read inside the backbone's own
  attention), or None when `config.backbone_memory_layers` is empty.

Its lifecycle lives here and nowhere else: create (`Memory(backbone, config, rows)`),
write text (`memorize`, `write_ids`), `reset`, `save` / `load` of one row, `stats`.
The model holds one (`model.memory`) and can swap it for a scratch one
(`model.scoped_memory()`, e.g. for validation).

Text is cut into segments of `config.window` tokens, each encoded from position 0,
exactly as training writes memory; memorizing needs neither the side network nor the
blocks above the deepest memory layer (`encode_memory` stops the backbone there).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from longside.backbone import Backbone, encode_memory, tokenize
from longside.config import SideNetConfig
from longside.errors import LongsideError, MemoryBankError
from longside.memory_bank import BatchMemory, MemoryBank
from longside.nn.backbone_memory import BackboneMemory
from longside.paths import atomic_dir, recover, sha256_file

_FORMAT, _VERSION = "longside-memory", 1
_MANIFEST = "memory.json"
MAIN_FILE = "memory.lsmb"  # the memory layer's bank inside a memory or chat-session directory


def block_file(layer: int) -> str:
    """File name of backbone block `layer`'s bank inside a memory or session directory."""
    return f"backbone_block{layer}.lsmb"


def is_bank_file(name: str) -> bool:
    """Whether `name` is one of the bank files `Memory.write_files` writes."""
    return name == MAIN_FILE or re.fullmatch(r"backbone_block\d+\.lsmb", name) is not None



def segment_starts(n: int, window: int, carry: int = 0) -> range:
    """Where the segments of a text of `n` tokens start when each after the first begins with
    the last `carry` tokens of the one before (`config.window_carry`; 0: back to back):
    every window - carry tokens, as long as tokens are left that no segment has read yet."""
    carry = min(carry, window - 1)
    return range(0, max(n - carry, 1) if n else 0, window - carry)

class Memory:
    """The memory of `rows` sequences for one backbone and side configuration.

    `banks[r]` is row r's `MemoryBank` at the memory layer; `blocks.banks[L].banks[r]`
    its bank in backbone block L (with backbone memory). Search and add go through
    `layer` (a `BatchMemory`: row b of a batch reads and writes bank b only).
    """

    def __init__(self, backbone: Backbone, config: SideNetConfig, rows: int = 1,
                 query_maps: dict[int, "torch.Tensor"] | None = None):
        """`query_maps`: backbone memory's trained query maps by block (`LongSideModel.query_maps`);
        blocks without one read with their own query."""
        if not isinstance(rows, int) or rows < 1:
            raise LongsideError(f"a memory needs at least one row (batch_size >= 1), got {rows!r}")
        spec = backbone.spec
        self._backbone, self.config = backbone, config
        self.token_layer = config.token_layer(spec.num_layers) if config.token_cache else None
        self.layer = BatchMemory(
            rows, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, chunk_size=config.chunk_size,
            capacity_tokens=config.capacity_tokens, index=config.index,
            owner=backbone.owner_id(config.memory_layer),
            token_dim=spec.hidden_size if config.token_cache else None, token_layer=self.token_layer,
            device=backbone.device)  # on the GPU with a GPU backbone: no host round trip per segment
        self.blocks: BackboneMemory | None = None
        if config.backbone_memory_layers:
            self.blocks = BackboneMemory.from_config(backbone, config, rows, query_maps)

    @classmethod
    def stack(cls, memories: list["Memory"]) -> "Memory":
        """A memory whose row b is row 0 of `memories[b]` (the banks are shared, not
        copied): a batch of sequences that each keep a memory of their own. Without
        backbone memory only."""
        if not memories or any(m.rows != 1 or m.blocks is not None for m in memories):
            raise LongsideError("Memory.stack takes one-row memories without backbone memory")
        return memories[0]._sharing([m.banks[0] for m in memories])

    def row(self, r: int) -> "Memory":
        """A one-row memory sharing row `r`'s bank (e.g. to decode that row on its own).
        Without backbone memory only."""
        (r,) = self.check_rows([r])
        if self.blocks is not None:
            raise LongsideError("rows of a memory with backbone memory cannot be taken apart")
        return self._sharing([self.banks[r]])

    def _sharing(self, banks: list[MemoryBank]) -> "Memory":
        shared = Memory.__new__(Memory)
        shared._backbone, shared.config, shared.token_layer = self._backbone, self.config, self.token_layer
        shared.layer, shared.blocks = BatchMemory.of(banks), None
        return shared

    # -- what it holds ---------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.layer.banks)

    @property
    def banks(self) -> list[MemoryBank]:
        """The memory layer's bank of each row."""
        return self.layer.banks

    def lengths(self) -> list[int]:
        """Tokens stored per row."""
        return self.layer.lengths()

    def is_empty(self) -> bool:
        return not any(self.lengths())

    def stats(self) -> list[dict]:
        """Per row: the memory layer bank's stats, plus each backbone block's token count."""
        out = self.layer.stats()
        if self.blocks is not None:
            for r, s in enumerate(out):
                s["backbone_blocks"] = {L: len(self.blocks.banks[L].banks[r]) for L in self.blocks.layers}
        return out

    def check_rows(self, rows: list[int] | None) -> list[int]:
        """The rows `rows` names (every row when None); refuses rows out of range."""
        targets = list(range(self.rows)) if rows is None else list(rows)
        bad = [r for r in targets if not isinstance(r, int) or not 0 <= r < self.rows]
        if bad:
            raise LongsideError(f"row {bad[0]!r} out of range: memory has {self.rows} row(s); "
                                f"call model.init_memory(batch_size) first")
        return targets

    # -- reading and writing ---------------------------------------------------------
    def search(self, queries: torch.Tensor, k_chunks: int, counted: torch.Tensor | None = None):
        """The memory layer's retrieval for `queries [B, T, H, D]`: see `BatchMemory.search`."""
        return self.layer.search(queries, k_chunks, counted=counted)

    def add(self, keys: torch.Tensor, values: torch.Tensor, token_keys: torch.Tensor | None = None,
            token_ids: torch.Tensor | None = None, backbone_segment=None, skip: int = 0) -> None:
        """Write one segment: the memory layer's `keys, values [B, T, G, D]` (and token-cache
        `token_keys [B, T, d]`, `token_ids [B, T]`) and, with backbone memory, the blocks'
        keys/values recorded in `backbone_segment`. Its first `skip` tokens are already in
        memory (a window carried from the segment before, `config.window_carry`): not written.
        Of the first `config.memory_sink_tokens` (the forward's attention sinks) only the
        token-cache pairs are written."""
        sinks = self._sinks_after(skip)
        if skip:
            keys, values = keys[:, skip:], values[:, skip:]
            token_keys = None if token_keys is None else token_keys[:, skip:]
            token_ids = None if token_ids is None else token_ids[:, skip:]
        self.layer.add(keys, values, token_keys=token_keys, token_ids=token_ids, sinks=sinks)
        if self.blocks is not None and backbone_segment is not None:
            self.blocks.write(backbone_segment, skip)

    def _sinks_after(self, skip: int) -> int:
        """How many of a forward's tokens past its first `skip` (carried, already written) are
        its attention sinks, held out of the memory layer's bank (`config.memory_sink_tokens`)."""
        return max(0, self.config.memory_sink_tokens - skip)

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget everything (or only `rows`), e.g. at document boundaries."""
        if rows is not None and not isinstance(rows, torch.Tensor):
            rows = list(rows)  # both memories read it
        self.layer.reset(rows)
        if self.blocks is not None:
            self.blocks.reset(rows)

    def memorize(self, source, *, rows: list[int] | None = None, progress: bool = True,
                 as_text: bool = False) -> int:
        """Read `source` (text, a file path, or an iterable of those; `as_text`: strings are
        text, never paths) into the memory of `rows` (every row when None); returns the
        number of tokens written. See `read_texts`."""
        targets = self.check_rows(rows)
        tok = self._backbone.tokenizer
        texts = [(name, tokenize(tok, text)) for name, text in read_texts(source, as_text=as_text)]
        total = sum(len(ids) for _, ids in texts)
        if total == 0:
            raise LongsideError("nothing to memorize: the text is empty")
        with tqdm(total=total, unit="tok", desc="memorize", disable=not progress, leave=False) as bar:
            for name, ids in texts:
                bar.set_postfix_str(name[-40:], refresh=False)
                self.write_ids(ids, rows=targets, bar=bar)
        return total

    def write_ids(self, ids, *, window: int | None = None, rows: list[int] | None = None, bar=None,
                  encoded: dict | None = None, carried: int = 0) -> int:
        """Write token ids `ids` (a sequence of ints) into the memory of `rows` (every row
        when None) in segments of `window` tokens (default `config.window`), oldest first;
        returns the number of segments. What is written equals what `LongSideModel.forward`
        writes for the same segments. `bar`: a tqdm bar advanced by tokens written.

        `encoded`: a dict the caller keeps to reuse encodings of identical segments across
        calls (a segment's keys depend on its tokens alone; not used with backbone memory,
        whose keys also depend on what the row already holds).

        `carried`: the first segment starts with this many tokens that are already in memory
        (the end of a segment written before, as the next one of a longer text reads them
        with `config.window_carry`): read again, not written again."""
        targets = self.check_rows(rows)
        cfg, bb, bm = self.config, self._backbone, self.blocks
        W, layer = window or cfg.window, cfg.memory_layer
        if not 1 <= W <= cfg.window:
            raise LongsideError(f"memory segments of {W} tokens: must be 1..{cfg.window} (the model's window)")
        # with backbone memory a segment's keys depend on what its row already holds, so each
        # row encodes it reading its own memory, as `LongSideModel.forward` would
        groups = [targets] if bm is None else [[r] for r in targets]
        # a carried window (config.window_carry): each segment after the first starts with the
        # last `carry` tokens of the one before, read again and not written again, as
        # `LocalWindow` reads text; a shorter window carries its share (config.carry_for)
        carry = cfg.carry_for(W)
        if isinstance(carried, bool) or not isinstance(carried, int) or \
                not 0 <= carried < max(min(len(ids), W), 1):
            raise LongsideError(f"carried {carried!r}: must be an int from 0 to {max(min(len(ids), W) - 1, 0)} "
                                "(fewer than the tokens given and than a segment)")
        n = 0
        for a in segment_starts(len(ids), W, carry):
            seg = torch.tensor([list(ids[a:a + W])], dtype=torch.long)
            skip = carry if a else carried
            for group in groups:
                if bm is None:
                    key = tuple(seg[0].tolist()) if encoded is not None else None
                    if key is not None and key in encoded:
                        k, v, h = encoded[key]
                    else:
                        k, v, h = encode_memory(bb, seg, layer, self.token_layer)
                        if key is not None:
                            encoded[key] = (k, v, h)
                else:
                    part = bm.segment(group)  # its own: an open window's segment is untouched
                    with bm.attach(part, read=True):
                        k, v, h = encode_memory(bb, seg, layer, self.token_layer, max(bm.layers))
                    bm.write(part, skip)
                sinks = self._sinks_after(skip)
                for r in group:
                    if h is None:
                        self.banks[r].add(k[0, skip:], v[0, skip:], sinks=sinks)
                    else:
                        self.banks[r].add(k[0, skip:], v[0, skip:], token_keys=h[0, skip:], token_ids=seg[0, skip:],
                                          sinks=sinks)
            n += 1
            if bar is not None:
                bar.update(seg.shape[1] - skip)
        return n

    # -- files -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, row: int = 0) -> None:
        """Write the memory of `row` to `path`, atomically: one checksummed bank file (see
        memory_bank), or, with backbone memory, a directory holding that file, one bank per
        backbone block and a manifest of their checksums (`memory.json`)."""
        (row,) = self.check_rows([row])
        path = Path(path)
        if self.blocks is None:
            if path.is_dir():
                raise LongsideError(f"{path} is a directory (a memory saved with backbone memory?); save to "
                                    "another path, or delete it first")
            self.banks[row].save(path)
            return
        with atomic_dir(path, marker=_MANIFEST) as tmp:
            files = self.write_files(tmp, row)
            body = {"format": _FORMAT, "version": _VERSION, "backbone_memory_layers": self.blocks.layers,
                    "sha256": files}
            if maps := self.blocks.maps_digest():  # absent otherwise, so memories saved before maps still load
                body["query_maps"] = maps
            (tmp / _MANIFEST).write_text(json.dumps(body, indent=1))

    def write_files(self, directory: Path, row: int) -> dict[str, str]:
        """Write row `row`'s banks into `directory` (`MAIN_FILE` and one `block_file(L)` per
        backbone block) -> {file name: sha256}."""
        self.banks[row].save(directory / MAIN_FILE)
        files = {MAIN_FILE: sha256_file(directory / MAIN_FILE)}
        for L in (self.blocks.layers if self.blocks is not None else ()):
            self.blocks.banks[L].banks[row].save(directory / block_file(L))
            files[block_file(L)] = sha256_file(directory / block_file(L))
        return files

    def load(self, path: str | os.PathLike, row: int = 0) -> None:
        """Replace the memory of `row` by one saved with `save`.

        Refuses (MemoryBankError) memory written by another backbone or memory layer, whose
        keys would be meaningless to this model, memory saved with other backbone-memory
        blocks (or with versus without them), and corrupt, truncated or mixed-up files; the
        current memory is kept then."""
        (row,) = self.check_rows([row])
        path = Path(path)
        recover(path)
        layers = sorted(set(self.config.backbone_memory_layers))
        if not path.exists():
            raise MemoryBankError(f"no saved memory at {path}; check the path (save one with save_memory)")
        saved = _read_manifest(path) if path.is_dir() else None
        saved_layers = saved["backbone_memory_layers"] if saved is not None else []
        if sorted(set(saved_layers)) != layers:
            raise MemoryBankError(
                f"{path} was saved with backbone memory in blocks {saved_layers or 'none'}, but this model reads "
                f"{layers or 'none'}; load it into a model with the same blocks (model.use_backbone_memory(...) "
                "or backbone_memory_layers in side_config.json), or memorize the text again")
        want = self.blocks.maps_digest() if self.blocks is not None else None
        if saved is not None and saved["query_maps"] != want:
            have = f"query maps {saved['query_maps']}" if saved["query_maps"] else \
                "no query maps recorded (none, or saved before session 46 recorded them)"
            raise MemoryBankError(
                f"{path} was written reading backbone memory with {have}, but this model reads with "
                f"{'query maps ' + want if want else 'none'}; load it into the model that saved it "
                "(model.use_query_maps), or memorize the text again")
        main = path / MAIN_FILE if saved is not None else path
        bank, blocks = self.read_files(main, path if saved is not None else None, saved_layers)
        self.put_row(row, bank, blocks)

    def read_files(self, main: Path, directory: Path | None, layers) -> tuple[MemoryBank, dict[int, MemoryBank]]:
        """Read and check a row's banks: the memory layer's from `main`, block L's from
        `directory / block_file(L)` for each of `layers`. Nothing is installed."""
        bb, dev = self._backbone, self._backbone.device
        bank = MemoryBank.load(main, expect_owner=bb.owner_id(self.config.memory_layer), device=dev)
        if bank.chunk_size != self.config.chunk_size:
            raise MemoryBankError(f"{main} stores chunks of {bank.chunk_size} tokens but this model reads chunks "
                                  f"of {self.config.chunk_size}; memorize the text again with this model")
        self.check_token_memory(bank, main)
        blocks = {int(L): MemoryBank.load(directory / block_file(int(L)), expect_owner=bb.owner_id(int(L)), device=dev)
                  for L in layers}
        return bank, blocks

    def put_row(self, row: int, bank: MemoryBank, blocks: dict[int, MemoryBank]) -> None:
        """Install checked banks (`read_files`) as row `row`."""
        if sorted(blocks) != sorted(self.blocks.layers if self.blocks is not None else []):
            raise MemoryBankError(f"banks for blocks {sorted(blocks)} do not fit this memory's backbone blocks")
        self.banks[row] = bank
        for L, b in blocks.items():
            self.blocks.banks[L].banks[row] = b

    def check_token_memory(self, bank: MemoryBank, path) -> None:
        """Refuse a bank whose token memory does not fit this memory's token cache."""
        want = self.token_layer
        have = bank.token_layer if bank.tokens is not None else None
        if have != want or (bank.tokens is not None and bank.tokens.dim != self._backbone.spec.hidden_size):
            raise MemoryBankError(
                f"{path} keeps a token memory at hidden state {have}, but this model's token cache reads "
                f"{want} (None = no token memory); memorize the text again with this model")


def _read_manifest(path: Path) -> dict:
    """The checked manifest of a memory directory (every file's checksum verified)."""
    try:
        body = json.loads((path / _MANIFEST).read_text())
        if body["format"] != _FORMAT:
            raise MemoryBankError(f"{path} is not a longside memory directory (format {body['format']!r})")
        if body["version"] != _VERSION:
            raise MemoryBankError(f"{path} is memory format version {body['version']}; this longside reads "
                                  f"version {_VERSION}: use the longside that saved it")
        files, layers = dict(body["sha256"]), [int(L) for L in body["backbone_memory_layers"]]
        maps = body.get("query_maps")
        if maps is not None and not isinstance(maps, str):
            raise TypeError(f"query_maps is {maps!r}")
    except MemoryBankError:
        raise
    except FileNotFoundError:
        raise MemoryBankError(f"{path} is a directory without {_MANIFEST}: not a memory saved by "
                              "save_memory") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise MemoryBankError(f"{path / _MANIFEST} is corrupt or unreadable ({type(e).__name__}: {e}); memorize the "
                              "text again") from None
    if set(files) != {MAIN_FILE, *(block_file(L) for L in layers)}:
        raise MemoryBankError(f"{path / _MANIFEST} does not list the files of its blocks {layers}; it is corrupt")
    for name, digest in files.items():
        try:
            ok = sha256_file(path / name) == digest
        except FileNotFoundError:
            raise MemoryBankError(f"{path / name} is missing: the memory directory is incomplete") from None
        if not ok:
            raise MemoryBankError(f"{path / name} does not match its checksum in {_MANIFEST} (corrupt, or a "
                                  "file from another save); memorize the text again")
    return {"backbone_memory_layers": layers, "query_maps": maps}


# one word with a path separator, or one word ending in a text file's extension
_LOOKS_LIKE_PATH = re.compile(r"^(\S*[/\\]\S*|\S+\.(txt|md|rst|json|jsonl|csv|tsv|html?|xml|log|text))$", re.I)


def read_texts(source, *, as_text: bool = False) -> Iterator[tuple[str, str]]:
    """(name, text) for each text of `source`: a string of text, a path (a `Path`, or a
    string naming an existing file with no newline in it), or an iterable of those.

    A string that looks like a path (one word with a `/`, or ending in `.txt` and the
    like) but names no file is refused rather than memorized as text: a mistyped path
    would otherwise fill memory with its own name. `as_text=True` takes every string as
    text."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    for i, item in enumerate(source):
        if isinstance(item, str) and as_text:
            yield f"text {i + 1}", item
            continue
        if isinstance(item, str) and not _names_a_file(item) and _LOOKS_LIKE_PATH.match(item.strip()):
            raise LongsideError(f"no file {item.strip()!r} to memorize; check the path, or pass "
                                "memorize(..., as_text=True) to store this string as text")
        if isinstance(item, os.PathLike) or (isinstance(item, str) and _names_a_file(item)):
            path = Path(item)
            try:
                yield str(path), path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise LongsideError(f"no file {path} to memorize; check the path") from None
            except UnicodeDecodeError as e:
                raise LongsideError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8 first") from None
            except OSError as e:
                raise LongsideError(f"cannot read {path}: {e}") from None
        elif isinstance(item, str):
            yield f"text {i + 1}", item
        else:
            raise LongsideError(f"memorize takes text, a path or an iterable of those, not {type(item).__name__}")


def _names_a_file(text: str) -> bool:
    """True if `text` is the path of an existing file (one line, not too long for a name)."""
    if "\n" in text or len(text) > 4096:
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # e.g. a component longer than the file system allows
        return False

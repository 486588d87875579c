"""Reading text into memory, and the memory helpers a user expects on the model.

Memory holds the memory layer's pre-rotary keys/values and the token cache's hidden
states, which only the frozen backbone computes: memorizing needs neither the side
network nor the blocks above the deeper of the two layers, so `encode_memory` stops the
backbone there (block 25 of SmolLM2's 30 with the token cache, block 15 without). Text is cut into segments of
`config.window` tokens, each encoded from position 0, exactly as training writes memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from tqdm.auto import tqdm

from longside.errors import LongsideError, MemoryBankError

if TYPE_CHECKING:
    from longside.backbone import Backbone
    from longside.model import LongSideModel


class _Enough(Exception):
    """Raised from a hook once the memory layer has run: nothing above it is needed."""


@torch.no_grad()
def encode_memory(backbone: "Backbone", ids: torch.Tensor, layer: int, token_layer: int | None = None,
                  through: int = 0):
    """Pre-rotary keys and values of block `layer` for one segment `ids [B, T]` (from
    position 0), running the backbone only as far as needed (at least through block
    `through`) -> two `[B, T, G, D]` float32, plus, with `token_layer`,
    `hidden_states[token_layer]` `[B, T, d]` (else None).

    Equal to `backbone.encode(ids, layer)`'s `memory_keys`, `memory_values`, `hidden_states[token_layer]`."""
    parts = backbone._parts
    kv: dict[str, torch.Tensor] = {}
    handles = parts.hook_kv(parts.layers[layer], kv, backbone.spec)
    last = max(through, layer if token_layer is None else max(layer, token_layer - 1))

    def grab(_m, _args, out):
        kv["h"] = out[0] if isinstance(out, tuple) else out

    def stop(*_):
        raise _Enough

    if token_layer is not None:  # hidden_states[i] is the output of block i - 1
        handles.append(parts.layers[token_layer - 1].register_forward_hook(grab))
    handles.append(parts.layers[last].register_forward_hook(stop))
    try:
        parts.base(input_ids=ids.to(backbone.device), use_cache=False)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return kv["k"], kv["v"], kv.get("h")


def read_texts(source) -> Iterator[tuple[str, str]]:
    """(name, text) for each text of `source`: a string of text, a path (a `Path`, or a
    string naming an existing file with no newline in it), or an iterable of those."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    for i, item in enumerate(source):
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


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of a (possibly book-long) text, without special tokens or length warnings."""
    from longside.backbone import _quiet

    with _quiet():
        return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def memorize(model: "LongSideModel", source, *, row: int | None = None, progress: bool = True) -> int:
    """Read `source` (text, a file path, or an iterable of those) into memory.

    Each text is cut into segments of `model.config.window` tokens whose memory-layer
    keys/values are appended to the memory bank of `row` (every row when None). Returns
    the number of tokens written. The local window of an ongoing generation or chat is
    not touched: memorized text sits in memory, before whatever the window holds.
    """
    targets = _target_rows(model, None if row is None else [row])
    texts = [(name, tokenize(model.backbone.tokenizer, text)) for name, text in read_texts(source)]
    total = sum(len(ids) for _, ids in texts)
    if total == 0:
        raise LongsideError("nothing to memorize: the text is empty")
    with tqdm(total=total, unit="tok", desc="memorize", disable=not progress, leave=False) as bar:
        for name, ids in texts:
            bar.set_postfix_str(name[-40:], refresh=False)
            memorize_ids(model, ids, rows=targets, bar=bar)
    return total


def memorize_ids(model: "LongSideModel", ids, *, window: int | None = None, rows: list[int] | None = None,
                 bar=None, encoded: dict | None = None) -> int:
    """Write token ids `ids` (a sequence of ints) into the memory of `rows` (every row
    when None) in segments of `window` tokens (default `model.config.window`), oldest
    first; returns the number of segments. What is written equals what
    `LongSideModel.forward` writes for the same segments, at the cost of the backbone up
    to the memory's deepest layer only. `bar`: a tqdm bar advanced by tokens written.

    `encoded`: a dict the caller keeps to reuse encodings of identical segments across
    calls (a segment's keys depend on its tokens alone; not used with backbone memory,
    whose keys also depend on what the row already holds)."""
    targets = _target_rows(model, rows)
    banks = model.memory.banks
    W, layer = window or model.config.window, model.config.memory_layer
    if not 1 <= W <= model.config.window:
        raise LongsideError(f"memory segments of {W} tokens: must be 1..{model.config.window} (the model's window)")
    bm = model.backbone_memory
    # with backbone memory a segment's keys depend on what its row already holds, so each
    # row encodes it reading its own memory, as `LongSideModel.forward` would
    groups = [targets] if bm is None else [[r] for r in targets]
    n = 0
    for a in range(0, len(ids), W):
        seg = torch.tensor([list(ids[a:a + W])], dtype=torch.long)
        for group in groups:
            if bm is None:
                key = tuple(seg[0].tolist()) if encoded is not None else None
                if key is not None and key in encoded:
                    k, v, h = encoded[key]
                else:
                    k, v, h = encode_memory(model.backbone, seg, layer, model.token_layer)
                    if key is not None:
                        encoded[key] = (k, v, h)
            else:
                part = bm.segment(group)  # its own: an open window's segment is untouched
                with bm.attach(part, read=True):
                    k, v, h = encode_memory(model.backbone, seg, layer, model.token_layer, max(bm.layers))
                bm.write(part)
            for r in group:
                if h is None:
                    banks[r].add(k[0], v[0])
                else:
                    banks[r].add(k[0], v[0], token_keys=h[0], token_ids=seg[0])
        n += 1
        if bar is not None:
            bar.update(seg.shape[1])
    return n


def _target_rows(model: "LongSideModel", rows: list[int] | None) -> list[int]:
    """The memory rows to write (every row when None), memory made first if missing."""
    from longside.window import prepare_memory

    if model._memory is None:
        prepare_memory(model, 1)
    n = len(model.memory.banks)
    targets = list(range(n)) if rows is None else list(rows)
    bad = [r for r in targets if not 0 <= r < n]
    if bad:
        raise LongsideError(f"row {bad[0]} out of range: memory has {n} row(s); "
                            f"call model.init_memory(batch_size) first")
    return targets


def init_memory(model: "LongSideModel", batch_size: int = 1) -> None:
    """A fresh, empty memory with one bank per sequence of a `batch_size` batch."""
    if batch_size < 1:
        raise LongsideError(f"batch_size must be >= 1, got {batch_size}")
    model._make_memory(batch_size)


_MEMORY_FORMAT, _MEMORY_VERSION = "longside-memory", 1
_MANIFEST, _MAIN = "memory.json", "memory.lsmb"


def block_file(layer: int) -> str:
    """File name of backbone block `layer`'s bank inside a memory or session directory."""
    return f"backbone_block{layer}.lsmb"


def save_memory(model: "LongSideModel", path: str | os.PathLike, row: int = 0) -> None:
    """Write the memory of `row` to `path`, atomically: one checksummed bank file (see
    memory_bank), or, with backbone memory, a directory holding that file, one bank per
    backbone block and a manifest of their checksums (`memory.json`)."""
    import json

    from longside.paths import atomic_dir, sha256_file

    banks = model.memory.banks
    if not 0 <= row < len(banks):
        raise LongsideError(f"row {row} out of range: memory has {len(banks)} row(s)")
    path = Path(path)
    layers = model.config.backbone_memory_layers
    if not layers:
        if path.is_dir():
            raise LongsideError(f"{path} is a directory (a memory saved with backbone memory?); save to another "
                                "path, or delete it first")
        banks[row].save(path)
        return
    bm = model.backbone_memory
    with atomic_dir(path, marker=_MANIFEST) as tmp:
        banks[row].save(tmp / _MAIN)
        files = {_MAIN: sha256_file(tmp / _MAIN)}
        for L in bm.layers:
            bm.banks[L].banks[row].save(tmp / block_file(L))
            files[block_file(L)] = sha256_file(tmp / block_file(L))
        body = {"format": _MEMORY_FORMAT, "version": _MEMORY_VERSION, "backbone_memory_layers": bm.layers,
                "sha256": files}
        (tmp / _MANIFEST).write_text(json.dumps(body, indent=1))


def load_memory(model: "LongSideModel", path: str | os.PathLike, row: int = 0) -> None:
    """Replace the memory of `row` by one saved with `save_memory`.

    Refuses (MemoryBankError) memory written by another backbone or memory layer, whose
    keys would be meaningless to this model, memory saved with other backbone-memory
    blocks (or with versus without them), and corrupt, truncated or mixed-up files; the
    current memory is kept then."""
    from longside.memory_bank import MemoryBank

    path = Path(path)
    banks = model.memory.banks
    if not 0 <= row < len(banks):
        raise LongsideError(f"row {row} out of range: memory has {len(banks)} row(s)")
    layers = sorted(set(model.config.backbone_memory_layers))
    if not path.exists():
        raise MemoryBankError(f"no saved memory at {path}; check the path (save one with save_memory)")
    saved = _read_memory_manifest(path) if path.is_dir() else None
    saved_layers = saved["backbone_memory_layers"] if saved is not None else []
    if sorted(set(saved_layers)) != layers:
        raise MemoryBankError(
            f"{path} was saved with backbone memory in blocks {saved_layers or 'none'}, but this model reads "
            f"{layers or 'none'}; load it into a model with the same blocks (model.use_backbone_memory(...) "
            "or backbone_memory_layers in side_config.json), or memorize the text again")
    main = path / _MAIN if saved is not None else path
    owner = model.backbone.owner_id(model.config.memory_layer)
    bank = MemoryBank.load(main, expect_owner=owner, device=model.backbone.device)
    if bank.chunk_size != model.config.chunk_size:
        raise MemoryBankError(f"{path} stores chunks of {bank.chunk_size} tokens but this model reads chunks "
                              f"of {model.config.chunk_size}; memorize the text again with this model")
    check_token_memory(model, bank, path)
    blocks = {L: MemoryBank.load(path / block_file(L), expect_owner=model.backbone.owner_id(L),
                                 device=model.backbone.device) for L in saved_layers}
    bm = model.backbone_memory if layers else None
    if bm is not None and len(bm.banks[bm.layers[0]].banks) != len(banks):
        raise LongsideError(f"backbone memory holds {len(bm.banks[bm.layers[0]].banks)} row(s), memory "
                            f"{len(banks)}; call model.init_memory(batch_size) first")
    banks[row] = bank  # only now, every file having been read and checked
    for L, b in blocks.items():
        bm.banks[L].banks[row] = b


def _read_memory_manifest(path: Path) -> dict:
    """The checked manifest of a memory directory (every file's checksum verified)."""
    import json

    from longside.paths import sha256_file

    try:
        body = json.loads((path / _MANIFEST).read_text())
        if body["format"] != _MEMORY_FORMAT:
            raise MemoryBankError(f"{path} is not a longside memory directory (format {body['format']!r})")
        if body["version"] != _MEMORY_VERSION:
            raise MemoryBankError(f"{path} is memory format version {body['version']}; this longside reads "
                                  f"version {_MEMORY_VERSION}: use the longside that saved it")
        files, layers = dict(body["sha256"]), [int(L) for L in body["backbone_memory_layers"]]
    except MemoryBankError:
        raise
    except FileNotFoundError:
        raise MemoryBankError(f"{path} is a directory without {_MANIFEST}: not a memory saved by "
                              "save_memory") from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise MemoryBankError(f"{path / _MANIFEST} is corrupt or unreadable ({type(e).__name__}: {e}); memorize the "
                              "text again") from None
    if set(files) != {_MAIN, *(block_file(L) for L in layers)}:
        raise MemoryBankError(f"{path / _MANIFEST} does not list the files of its blocks {layers}; it is corrupt")
    for name, digest in files.items():
        try:
            ok = sha256_file(path / name) == digest
        except FileNotFoundError:
            raise MemoryBankError(f"{path / name} is missing: the memory directory is incomplete") from None
        if not ok:
            raise MemoryBankError(f"{path / name} does not match its checksum in {_MANIFEST} (corrupt, or a "
                                  "file from another save); memorize the text again")
    return {"backbone_memory_layers": layers}


def check_token_memory(model: "LongSideModel", bank, path) -> None:
    """Refuse a bank whose token memory does not fit the model's token cache."""
    want = model.token_layer
    have = bank.token_layer if bank.tokens is not None else None
    if have != want or (bank.tokens is not None and bank.tokens.dim != model.backbone.spec.hidden_size):
        raise MemoryBankError(
            f"{path} keeps a token memory at hidden state {have}, but this model's token cache reads "
            f"{want} (None = no token memory); memorize the text again with this model")

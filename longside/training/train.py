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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from longside.backbone import Backbone, feature_quantization, load_backbone
from longside.config import SideNetConfig
from longside.errors import CheckpointError, LongsideError
from longside.model import SHIPPED_CHECKPOINT, LongSideModel
from longside.paths import atomic_dir, cache_dir
from longside.training.config import TrainConfig
from longside.training.data import DocumentStream, RowCursor, tokenized_books
from longside.training.feature_cache import FeatureCache
from longside.training.teacher import DocumentTargets, TeacherTargets, distill_terms, stack_targets


_PROVENANCE = ("backbone", "backbone_fingerprint", "extra")
# where memory is read and how it is written and scored, not the side network's weights: a run
# from a checkpoint may change them (the checkpoint it writes keeps the new settings)
_MEMORY_USE = ("memory_layer", "memory_sink_tokens", "memory_distance")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine decay to `min_lr_ratio`, as a multiplier of `cfg.lr`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def validate(model: LongSideModel, books: list[np.ndarray], segment: int, n_segments: int) -> dict:
    """Perplexity of segments 2..n of each validation book: memory on, memory attention
    alone (token cache left out of the read), memory off.

    Uses a scratch memory (`model.scoped_memory`): the training rows' memory is untouched."""
    modes = {"memory": (True, True), "memory_no_token_cache": (True, False), "no_memory": (False, False)}
    if not model.config.token_cache:
        del modes["memory_no_token_cache"]
    losses = {m: [0.0, 0] for m in modes}
    with model.scoped_memory(1):
        for book in books:
            segs = [torch.from_numpy(book[i * segment:(i + 1) * segment].astype(np.int64))[None]
                    for i in range(min(n_segments, len(book) // segment))]
            for mode, (use, tc) in modes.items():
                model.reset_memory()
                for i, s in enumerate(segs):
                    out = model(s, labels=s if i else None, use_memory=use, write_memory=use, return_logits=False,
                                token_cache=tc)
                    if i:
                        losses[mode][0] += out.loss.item() * out.n_tokens
                        losses[mode][1] += out.n_tokens
    return {f"ppl_{k}": math.exp(v[0] / max(v[1], 1)) for k, v in losses.items()}


def attach_feature_cache(model: LongSideModel, cfg: TrainConfig) -> None:
    """Give `model` the feature cache `cfg` names (none when `cfg.feature_cache` is unset)."""
    if not cfg.feature_cache:
        return
    if cfg.side.backbone_memory_layers:
        raise LongsideError("a feature cache cannot replay a backbone that reads memory (backbone_memory_layers "
                            f"{cfg.side.backbone_memory_layers}): its features depend on what memory holds")
    fc, out_dir = Path(cfg.feature_cache).resolve(), Path(cfg.out).resolve()
    if fc == out_dir or out_dir in fc.parents:
        raise LongsideError(f"the feature cache {fc} must not lie inside the checkpoint directory {cfg.out}, "
                            "which every save replaces; choose a directory outside it")
    model.feature_cache = FeatureCache(fc, model.backbone, model.feature_layers(), cfg.side.memory_layer,
                                       cfg.feature_cache_dtype, cfg.feature_cache_gb)


def teacher_targets(model: LongSideModel, cfg: TrainConfig) -> TeacherTargets:
    """The teacher-target store `cfg` names (default: one per backbone/window/segment/k
    under the cache directory); the student's features come through the feature cache
    when there is one, so it fills at the same time."""
    bb = model.backbone
    path = None if not cfg.teacher_store else cfg.teacher_cache or cache_dir() / "teacher" / (
        f"{bb.name}-{bb.fingerprint}-w{cfg.teacher_window}-s{cfg.segment}-k{cfg.teacher_top_k}"
        f"-m{cfg.side.memory_layer}{'-' + kind if (kind := feature_quantization(bb)) else ''}-v2")
    fc = model.feature_cache
    return TeacherTargets(path, bb, cfg.teacher_window, cfg.segment, cfg.teacher_top_k, cfg.side.memory_layer,
                          student_encode=fc.encode if fc is not None else None)


def build_model(cfg: TrainConfig, backbone: Backbone) -> LongSideModel:
    """A new side network for `cfg`, or, with `cfg.init_from`, that checkpoint's. Its side
    config is the checkpoint's: a `cfg.side` that sets something else is refused rather
    than silently dropped."""
    if not cfg.init_from:
        return LongSideModel(backbone, cfg.side)
    src = SHIPPED_CHECKPOINT if cfg.init_from == "shipped" else Path(cfg.init_from)
    model = LongSideModel.from_pretrained(src, backbone=backbone)
    mine, theirs, default = (dataclasses.asdict(c) for c in (cfg.side, model.config, SideNetConfig()))
    # a setting counts as asked for when the config names it (`TrainConfig.from_dict`: a
    # preset's or a JSON file's "side"); built in Python, when it is not SideNetConfig's default
    given = getattr(cfg, "side_given", None)
    changed = {k: v for k, v in mine.items() if k not in _PROVENANCE and v != theirs[k]
               and (k in given if given is not None else v != default[k])}
    clash = {k: v for k, v in changed.items() if k not in _MEMORY_USE}
    if clash:
        raise LongsideError(f"init_from {src} brings its own side network; the side settings {clash} differ from "
                            "its side_config.json; drop them (or train a new side network without init_from)")
    if "memory_layer" in changed:  # zeroes the query correction: it was learned for the other block
        model.use_memory_layer(changed["memory_layer"])
    if "memory_sink_tokens" in changed:
        model.use_memory_sink_tokens(changed["memory_sink_tokens"])
    if "memory_distance" in changed:
        model.use_memory_distance(changed["memory_distance"])
    if cfg.reset_memory_query:
        model.reset_memory_query()
    return model


def segment_loss(model: LongSideModel, ids: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                 targets: DocumentTargets | None) -> tuple[torch.Tensor, dict]:
    """Read one batch of segments `ids [B, T]` from memory, score it, write it.

    Without `targets`: the next-token loss. With them: lm_weight * next-token +
    distill_mse * mse + distill_kl * kl + distill_attn * attn (`teacher.distill_terms`;
    attn only where memory attention read something). Returns (loss, parts)."""
    model.memory_for(ids.shape[0])
    read: list[torch.Tensor] = []  # what memory attention adds at the memory layer, [B, T, d]
    hook = model.side.reader.into_side.register_forward_pre_hook(lambda _m, args: read.append(args[0])) \
        if targets is not None else None
    try:
        out, h, tok_keys, hits = model.read_segment(ids, use_memory=True, token_cache=cfg.token_cache_in_loss)
    finally:
        if hook is not None:
            hook.remove()
    with torch.set_grad_enabled(torch.is_grad_enabled() and (targets is None or cfg.lm_weight > 0)):
        lm, n = model.lm_loss(h, labels, hits)
    parts = {"lm": lm.item(), "scored": n}
    loss = lm * (cfg.lm_weight if targets is not None else 1.0)
    if targets is not None:
        local = model.backbone.attn_output(cfg.side.memory_layer, out.memory_attn.flatten(2)) if read else None
        terms = distill_terms(model.backbone, h, out.hidden_states[-1], targets, read[0] if read else None, local)
        loss = loss + cfg.distill_mse * terms["mse"] + cfg.distill_kl * terms["kl"]
        if "attn" in terms:
            loss = loss + cfg.distill_attn * terms["attn"]
        parts.update({k: v.item() for k, v in terms.items()})
    model.write_segment(out, ids, tok_keys)
    return loss, parts


def _check_side(cfg: TrainConfig) -> None:
    if cfg.segment > cfg.side.window:
        raise LongsideError(f"segment {cfg.segment} exceeds the side network's window {cfg.side.window}")
    if cfg.side.backbone_memory_layers:
        raise LongsideError(
            f"training with backbone memory (backbone_memory_layers {cfg.side.backbone_memory_layers}) is not "
            "supported: its banks are not part of the resumable state, and a feature cache cannot replay a "
            "backbone whose features depend on memory. Train with backbone_memory_layers [] and switch it "
            "on in the trained checkpoint's side_config.json (it needs no training)")


def train(cfg: TrainConfig, resume: str | Path | None = None, max_minutes: float | None = None,
          backbone: Backbone | None = None, progress: bool = True) -> dict:
    """Run (or resume) training; returns the final metrics. Checkpoints go to `cfg.out`.
    With a GPU the backbone trains there; a `backbone` passed in is moved back afterwards."""
    _check_side(cfg)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    given = backbone
    backbone = backbone or load_backbone(cfg.backbone, quantize=cfg.quantize)
    home = backbone.device
    model = build_model(cfg, backbone)
    backbone.to(acc.device)  # on a GPU, all of it: backbone, memory banks, teacher, side network
    model.init_memory(cfg.batch_size)  # made after the move: memory lives on the backbone's device
    try:
        return _train(cfg, acc, model, backbone, resume, max_minutes, progress)
    finally:
        if given is not None:  # the caller's backbone goes back where it was
            given.to(home)


def _train(cfg: TrainConfig, acc: Accelerator, model: LongSideModel, backbone: Backbone, resume, max_minutes,
           progress: bool) -> dict:
    out_dir = Path(cfg.out)
    cfg = dataclasses.replace(cfg, side=model.config)  # init_from: the checkpoint's side network
    _check_side(cfg)
    attach_feature_cache(model, cfg)
    # no teacher where no teacher term is weighted (an ablation's next-token-only row)
    teacher = teacher_targets(model, cfg) if cfg.distill and (cfg.distill_mse or cfg.distill_kl or cfg.distill_attn) \
        else None
    doc_targets: dict[int, DocumentTargets] = {}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    stream = DocumentStream(tokenized_books(backbone, "train"), cfg, backbone.tokenizer,
                            acc.process_index, acc.num_processes)
    val_books = tokenized_books(backbone, "validation")
    step, cursor_state, history = 0, None, []
    if resume:
        step, cursor_state, history = _load_state(Path(resume), model, opt, sched)
    side, opt = acc.prepare(model.side, opt)
    model.side_runner = side  # gradients all-reduce through the wrapper when data-parallel
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
        targets = None
        if teacher is not None:  # every token has a teacher target: filler is trained on too
            rows = []
            for r in range(ids.shape[0]):
                doc, seg = cursor.position(r)
                if r in fresh or r not in doc_targets:
                    doc_targets[r] = teacher.document(doc)
                rows.append(doc_targets[r].segment(seg, cfg.segment))
            targets = stack_targets(rows, backbone.device)
        elif (labels != -100).sum() == 0:  # filler of synthetic documents: only write memory
            with torch.no_grad():
                model(ids, use_memory=False, write_memory=True, return_logits=False)
            tokens += ids.numel()
            continue
        loss, parts = segment_loss(model, ids, labels, cfg, targets)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(side.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += ids.numel()
        scored += parts["scored"]
        elapsed = time.time() - t_start
        metrics = {"step": step, "loss": loss.item(), **{k: v for k, v in parts.items() if k != "scored"},
                   "grad_norm": float(grad_norm),
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
    if teacher is not None:
        metrics["teacher"] = teacher.stats()
    return {"step": step, "wall_s": time.time() - t_start, "tokens": tokens, "scored_tokens": scored, **metrics}


_STATE_FORMAT = "longside-train-state-v2"


def _save_state(out: Path, model: LongSideModel, opt, sched, step: int, cursor: dict, history: list,
                cfg: TrainConfig) -> None:
    """A resumable checkpoint, data only: side weights and optimizer tensors in
    safetensors, everything else in JSON (never a pickle: a resume directory may come
    from someone else, and loading it must not run code)."""
    opt_state = opt.state_dict()
    tensors = {"torch_rng": torch.get_rng_state()}
    scalars: dict[str, dict] = {}
    for pid, entry in opt_state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    meta = {"format": _STATE_FORMAT, "step": step, "cursor": cursor, "param_groups": opt_state["param_groups"],
            "optimizer_scalars": scalars, "scheduler": sched.state_dict()}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "model", dtype=torch.float32)
        save_file(tensors, str(tmp / "train_state.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps(meta, indent=1))
        for r, bank in enumerate(model.memory.banks if model.has_memory else ()):
            bank.save(tmp / f"memory_row{r}.bank")
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (tmp / "history.json").write_text(json.dumps(history, indent=1))


def _load_state(path: Path, model: LongSideModel, opt, sched):
    """Read what `_save_state` wrote; refuses anything else (an old pickled
    `train_state.pt` is never loaded)."""
    if not (path / "train_state.json").exists():
        old = " (it holds an old pickled train_state.pt, which longside no longer loads: a pickle can run " \
              "code; start the training anew)" if (path / "train_state.pt").exists() else ""
        raise CheckpointError(f"{path} holds no training state to resume (train_state.json missing){old}")
    try:
        meta = json.loads((path / "train_state.json").read_text())
        saved = json.loads((path / "model" / "side_config.json").read_text())
        moved = {k: (saved[k], getattr(model.config, k)) for k in _MEMORY_USE if k in saved
                 and saved[k] != getattr(model.config, k)}
        if moved:  # weights trained reading memory one way must not go on reading it another
            raise CheckpointError(f"{path} was trained with {', '.join(f'{k}={a!r}' for k, (a, _) in moved.items())}, "
                                  f"but this run's config gives {', '.join(f'{k}={b!r}' for k, (_, b) in moved.items())}; "
                                  "resume with the run's own train_config.json, or start anew")
        if meta.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"{path / 'train_state.json'} is format {meta.get('format')!r}, not {_STATE_FORMAT}")
        tensors = load_file(str(path / "train_state.safetensors"))
        side = load_file(str(path / "model" / "side_model.safetensors"))
        state: dict[int, dict] = {int(pid): dict(v) for pid, v in meta["optimizer_scalars"].items()}
        for name, t in tensors.items():
            if name.startswith("optimizer."):
                _, pid, key = name.split(".", 2)
                state.setdefault(int(pid), {})[key] = t
        model.side.load_state_dict(side)
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["torch_rng"])
        step, cursor = int(meta["step"]), meta["cursor"]
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{path} is not a readable training state ({type(e).__name__}: {e}); "
                              "start the training anew or point --resume at another directory") from None
    history = json.loads((path / "history.json").read_text()) if (path / "history.json").exists() else []
    return step, cursor, history


def _load_memory(path: Path, model: LongSideModel, rows: int) -> None:
    memory = model.init_memory(rows)
    for r in range(rows):
        f = path / f"memory_row{r}.bank"
        if f.exists():  # the same checks as load_memory: owner, chunk size, token memory
            memory.put_row(r, *memory.read_files(f, None, []))

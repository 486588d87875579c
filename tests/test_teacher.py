import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longside.errors import LongsideError
from longside.inference.window import LocalWindow
from longside.model import LongSideModel
from longside.training.config import preset
from longside.training.data import tokenized_books
from longside.training.teacher import TeacherTargets, distill_terms, stack_targets
from longside.training.train import build_model, segment_loss, teacher_targets, train


@pytest.fixture(scope="module")
def book(smollm2):
    return tokenized_books(smollm2, "validation")[0]


def _doc(book, n, start=1000):
    return book[start:start + n].astype(np.int64)


def test_targets_are_cached_and_refused_for_another_backbone_or_window(tmp_path, smollm2, book):
    store = TeacherTargets(tmp_path / "t", smollm2, window=256, segment=64, top_k=8)
    doc = _doc(book, 192)
    first = store.document(doc)
    assert first.delta.shape == (192, smollm2.spec.hidden_size) and first.delta.dtype == torch.float16
    assert first.top_ids.shape == first.top_logp.shape == (192, 8)
    assert torch.all(first.top_logp[:, :-1] >= first.top_logp[:, 1:])  # best first
    again = TeacherTargets(tmp_path / "t", smollm2, window=256, segment=64, top_k=8).document(doc)
    assert torch.equal(first.delta, again.delta) and torch.equal(first.top_ids, again.top_ids)
    # the first segment's teacher sees exactly what the student sees: no change to learn
    assert first.delta[:64].abs().max() < 1e-3 and first.delta[64:].abs().max() > 0.1
    assert first.attn_delta.shape == first.delta.shape and first.attn_delta.dtype == torch.float16
    assert first.attn_delta[:64].abs().max() < 1e-3 and first.attn_delta[64:].abs().max() > 1e-2
    for kwargs in ({"window": 512, "segment": 64}, {"window": 256, "segment": 128}):
        with pytest.raises(LongsideError, match="made for"):
            TeacherTargets(tmp_path / "t", smollm2, top_k=8, **kwargs)
    other = copy.copy(smollm2)
    other.fingerprint = "0" * 16
    with pytest.raises(LongsideError, match="made for"):
        TeacherTargets(tmp_path / "t", other, window=256, segment=64, top_k=8)
    with pytest.raises(LongsideError, match="whole segments"):
        store.document(_doc(book, 100))
    with pytest.raises(LongsideError, match="at most the teacher window"):
        store.document(_doc(book, 320))
    # a damaged file is computed again, not trusted
    f = next((tmp_path / "t").glob("*/*.safetensors"))
    f.write_bytes(b"not a safetensors file")
    fresh = TeacherTargets(tmp_path / "t", smollm2, window=256, segment=64, top_k=8)
    assert torch.equal(fresh.document(doc).top_ids, first.top_ids) and fresh.stats()["repaired"] == 1


def test_targets_without_a_store_are_computed_each_time_and_leave_no_file(tmp_path, smollm2, book):
    doc = _doc(book, 128)
    stored = TeacherTargets(tmp_path / "t", smollm2, window=128, segment=64, top_k=8).document(doc)
    bare = TeacherTargets(None, smollm2, window=128, segment=64, top_k=8)
    for _ in range(2):
        got = bare.document(doc)
        assert torch.equal(got.delta, stored.delta) and torch.equal(got.top_ids, stored.top_ids)
    assert bare.path is None and bare.stats() == {"hits": 0, "misses": 2, "repaired": 0}
    with pytest.raises(LongsideError, match="whole segments"):
        bare.document(_doc(book, 100))


def test_distillation_loss_is_zero_when_the_student_is_the_teacher(tmp_path, smollm2, book):
    # one segment: the teacher's window holds what the student's does, and a new side
    # network's output is the backbone's (its `up` starts at zero)
    store = TeacherTargets(tmp_path / "t", smollm2, window=64, segment=64, top_k=8)
    ids = torch.from_numpy(_doc(book, 64))[None]
    model = LongSideModel(smollm2, preset("tiny").side)
    out, h, _, _ = model.read_segment(ids, use_memory=False)
    terms = distill_terms(smollm2, h, out.hidden_states[-1], stack_targets([store.document(ids[0])]))
    assert terms["mse"].item() == 0.0
    assert abs(terms["kl"].item()) < 1e-4
    # and it is not zero for a student that differs
    with torch.no_grad():
        model.side.up.weight.normal_(0, 0.05)
    out, h, _, _ = model.read_segment(ids, use_memory=False)
    moved = distill_terms(smollm2, h, out.hidden_states[-1], stack_targets([store.document(ids[0])]))
    assert moved["mse"].item() > 1e-3 and moved["kl"].item() > 1e-4


def test_distillation_loss_is_zero_for_the_teachers_own_states(tmp_path, smollm2, book):
    # the second segment, whose teacher saw the first: a student that outputs the teacher's
    # final states (and adds the teacher's change at the memory layer) scores ~0; the
    # student's own states score the whole change (mse 1)
    store = TeacherTargets(tmp_path / "t", smollm2, window=128, segment=64, top_k=8)
    doc = torch.from_numpy(_doc(book, 128))
    targets = stack_targets([store.document(doc).segment(1, 64)])
    teacher = smollm2.encode(doc[None]).hidden_states[-1][:, 64:]
    student = smollm2.encode(doc[None, 64:], memory_layer=15)
    base = student.hidden_states[-1]
    local = smollm2.attn_output(15, student.memory_attn.flatten(2))
    same = distill_terms(smollm2, teacher, base, targets, targets.attn_delta, local)
    assert same["mse"].item() < 1e-4 and abs(same["kl"].item()) < 1e-3 and same["attn"].item() < 1e-4
    own = distill_terms(smollm2, base, base, targets, torch.zeros_like(local), local)
    assert abs(own["mse"].item() - 1) < 1e-6 and own["kl"].item() > 10 * max(same["kl"].item(), 1e-4)
    assert abs(own["attn"].item() - 1) < 1e-6


def test_one_training_step_lowers_the_distillation_loss(tmp_path, smollm2, book):
    cfg = preset("tiny", distill=True, teacher_window=128, max_book_segments=2, synthetic_max_segments=2,
                 lm_weight=0.0, lr=3e-3)
    store = TeacherTargets(tmp_path / "t", smollm2, window=128, segment=64, top_k=8)
    doc = _doc(book, 128)
    targets = store.document(doc).segment(1, 64)
    ids = torch.from_numpy(doc)[None]
    model = LongSideModel(smollm2, cfg.side)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr)

    def loss_of_second_segment(train_step: bool) -> float:
        model.init_memory(1)
        with torch.no_grad():
            model(ids[:, :64], return_logits=False)  # the first segment goes to memory
        loss, parts = segment_loss(model, ids[:, 64:], ids[:, 64:], cfg, stack_targets([targets]))
        if train_step:
            loss.backward()
            opt.step()
            opt.zero_grad()
        return parts["mse"] + parts["kl"]

    before = loss_of_second_segment(True)
    after = loss_of_second_segment(False)
    assert after < before


def test_distill_training_runs_and_checks_document_length(tmp_path, smollm2):
    with pytest.raises(LongsideError, match="fit the teacher window"):
        preset("tiny", distill=True, teacher_window=128)  # 4-segment books of 64 tokens need 256
    cfg = preset("tiny", distill=True, teacher_window=256, max_steps=3, eval_every=3, out=str(tmp_path / "run"),
                 teacher_cache=str(tmp_path / "teacher"))
    result = train(cfg, backbone=smollm2, progress=False)
    assert result["step"] == 3 and result["teacher"]["misses"] >= 1
    assert {"mse", "kl", "ppl_memory_no_token_cache"} <= set(result)
    with pytest.raises(LongsideError, match="only apply with distill"):
        preset("tiny", distill_attn=1.0)
    with pytest.raises(LongsideError, match="teacher_store is False"):
        preset("tiny", distill=True, teacher_window=256, teacher_cache=str(tmp_path / "t"), teacher_store=False)


def test_training_without_a_teacher_store_writes_no_targets(tmp_path, smollm2, monkeypatch):
    monkeypatch.setattr("longside.training.train.cache_dir", lambda: tmp_path / "cache")  # where a store would go
    cfg = preset("tiny", distill=True, teacher_window=256, max_steps=2, eval_every=2, out=str(tmp_path / "run"),
                 teacher_store=False)
    model = build_model(cfg, smollm2)
    assert teacher_targets(model, cfg).path is None
    result = train(cfg, backbone=smollm2, progress=False)
    assert result["step"] == 2 and result["teacher"]["misses"] >= 1 and result["teacher"]["hits"] == 0
    assert not (tmp_path / "cache" / "teacher").exists()
    stored = preset("tiny", distill=True, teacher_window=256, out=str(tmp_path / "run"))
    assert teacher_targets(model, stored).path.parent == tmp_path / "cache" / "teacher"  # where it would have gone


def test_init_from_takes_the_checkpoints_side_network_and_refuses_other_settings(tmp_path, smollm2):
    src = LongSideModel(smollm2, preset("tiny").side)
    with torch.no_grad():
        src.side.up.weight.normal_(0, 0.01)
    src.save_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    model = build_model(preset("tiny", init_from=str(tmp_path / "ckpt")), smollm2)
    assert torch.equal(model.side.up.weight, src.side.up.weight) and model.config.window == 64
    with pytest.raises(LongsideError, match="brings its own side network"):
        build_model(preset("tiny", init_from=str(tmp_path / "ckpt"), side={"reduction": 2}), smollm2)
    # how memory is written and scored may change: the weights stay the checkpoint's
    again = build_model(preset("tiny", init_from=str(tmp_path / "ckpt"),
                               side={"memory_sink_tokens": 4, "memory_distance": 48}), smollm2)
    assert (again.config.memory_sink_tokens, again.config.memory_distance, again.side.reader.distance) == (4, 48, 48)
    assert torch.equal(again.side.up.weight, src.side.up.weight)


def test_init_from_moves_memory_back_to_a_default_it_names(tmp_path, smollm2):
    """A setting the config names applies even where it equals SideNetConfig's default."""
    import dataclasses

    src = LongSideModel(smollm2, dataclasses.replace(preset("tiny").side, memory_layer=20, memory_distance=48))
    src.save_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    kept = build_model(preset("tiny", init_from=str(tmp_path / "ckpt")), smollm2)
    assert (kept.config.memory_layer, kept.config.memory_distance) == (20, 48)
    back = build_model(preset("tiny", init_from=str(tmp_path / "ckpt"), side={"memory_layer": 15, "memory_distance": 0}),
                       smollm2)
    assert (back.config.memory_layer, back.config.memory_distance, back.side.reader.distance) == (15, 0, 0)
    assert back.side.memory_index == LongSideModel(smollm2, preset("tiny").side).side.memory_index


def test_reset_memory_query_zeroes_only_the_readers_query_correction(tmp_path, smollm2):
    src = LongSideModel(smollm2, preset("tiny").side)
    with torch.no_grad():
        src.side.reader.q_delta.weight.normal_(0, 0.01)
        src.side.up.weight.normal_(0, 0.01)
    src.save_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    kept = build_model(preset("tiny", init_from=str(tmp_path / "ckpt")), smollm2)
    assert torch.equal(kept.side.reader.q_delta.weight, src.side.reader.q_delta.weight)
    reset = build_model(preset("tiny", init_from=str(tmp_path / "ckpt"), reset_memory_query=True,
                               side={"memory_distance": 48}), smollm2)
    assert not reset.side.reader.q_delta.weight.any()
    assert torch.equal(reset.side.up.weight, src.side.up.weight) and reset.side.reader.distance == 48
    with pytest.raises(LongsideError, match="init_from"):
        preset("tiny", reset_memory_query=True)  # a new side network has no correction to reset


def test_a_resumed_run_keeps_its_trained_query_after_a_reset(tmp_path, smollm2):
    """The reset applies to the init_from checkpoint once; resuming reloads the run's own query."""
    src = LongSideModel(smollm2, preset("tiny").side)
    with torch.no_grad():
        src.side.reader.q_delta.weight.normal_(0, 0.01)
    src.save_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    common = {"init_from": str(tmp_path / "ckpt"), "reset_memory_query": True, "save_every": 2, "eval_every": 100}
    train(preset("tiny", max_steps=4, out=str(tmp_path / "full"), **common), backbone=smollm2, progress=False)
    train(preset("tiny", max_steps=2, out=str(tmp_path / "half"), **common), backbone=smollm2, progress=False)
    trained = load_file(str(tmp_path / "half" / "model" / "side_model.safetensors"))["reader.q_delta.weight"]
    assert trained.any()  # two steps moved it off zero: a second reset on resume would show
    train(preset("tiny", max_steps=4, out=str(tmp_path / "half"), **common), resume=tmp_path / "half",
          backbone=smollm2, progress=False)
    a, b = (load_file(str(tmp_path / run / "model" / "side_model.safetensors")) for run in ("full", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_that_would_read_memory_another_way_is_refused(tmp_path, smollm2):
    """A run trained with the checkpoint's memory distance must not resume at another one."""
    import dataclasses

    from longside.errors import CheckpointError

    src = LongSideModel(smollm2, dataclasses.replace(preset("tiny").side, memory_distance=48))
    src.save_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    common = {"init_from": str(tmp_path / "ckpt"), "save_every": 2, "eval_every": 100, "out": str(tmp_path / "run")}
    train(preset("tiny", max_steps=2, **common), backbone=smollm2, progress=False)
    with pytest.raises(CheckpointError, match="trained with memory_distance=48.*memory_distance=0"):
        train(preset("tiny", max_steps=4, side={"memory_distance": 0}, **common), resume=tmp_path / "run",
              backbone=smollm2, progress=False)
    result = train(preset("tiny", max_steps=4, **common), resume=tmp_path / "run", backbone=smollm2, progress=False)
    assert result["step"] == 4


def test_the_rotary_distillation_preset_reads_memory_with_the_backbones_query(smollm2):
    model = build_model(preset("smollm2-135m-distill-rotary"), smollm2)
    assert (model.config.memory_sink_tokens, model.config.memory_distance, model.side.reader.distance) == (4, 768, 768)
    assert not model.side.reader.q_delta.weight.any()
    shipped = build_model(preset("smollm2-135m-distill"), smollm2)
    assert shipped.side.reader.q_delta.weight.any() and shipped.config.memory_distance == 0
    assert torch.equal(model.side.up.weight, shipped.side.up.weight)


def test_a_checkpoint_moved_to_another_memory_block_keeps_its_weights_and_reads_there(tmp_path, smollm2, book):
    src = LongSideModel(smollm2, preset("tiny").side)
    with torch.no_grad():
        src.side.reader.q_delta.weight.normal_(0, 0.01)
        src.side.up.weight.normal_(0, 0.01)
    src.save_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert src.side.memory_index == 5  # side layers read blocks 3, 6, ..., 30: block 15's read before h[18]
    moved = build_model(preset("tiny", init_from=str(tmp_path / "ckpt"), side={"memory_layer": 20}), smollm2)
    assert (moved.config.memory_layer, moved.side.memory_index) == (20, 6)  # before h[21]
    assert not moved.side.reader.q_delta.weight.any()  # learned for block 15's queries
    assert torch.equal(moved.side.up.weight, src.side.up.weight)
    # memory now holds block 20's keys: a bank of block 15 is refused, and the read changes the output
    text, ids = smollm2.tokenizer.decode(_doc(book, 400).tolist()), torch.from_numpy(_doc(book, 64, 3000))[None]
    src.memorize(text, progress=False)
    src.save_memory(tmp_path / "m15.bank")
    with pytest.raises(LongsideError, match="block|owner|layer"):
        moved.load_memory(tmp_path / "m15.bank")
    moved.memorize(text, progress=False)
    with torch.no_grad():
        on = moved(ids, use_memory=True, write_memory=False).logits
        off = moved(ids, use_memory=False, write_memory=False).logits
    assert not torch.allclose(on, off)
    saved = tmp_path / "moved"
    moved.save_pretrained(saved, dtype=torch.float32)
    again = LongSideModel.from_pretrained(saved, backbone=smollm2)
    assert (again.config.memory_layer, again.side.memory_index) == (20, 6)
    with pytest.raises(LongsideError, match="memory already holds text"):
        moved.use_memory_layer(15)
    moved.reset_memory()
    with pytest.raises(LongsideError, match="block 0..29"):
        moved.use_memory_layer(30)  # refused before anything changes
    assert (moved.config.memory_layer, moved.side.memory_index) == (20, 6)


def test_the_block20_preset_reads_memory_at_block_20_with_the_backbones_query(smollm2):
    model = build_model(preset("smollm2-135m-distill-block20"), smollm2)
    assert (model.config.memory_layer, model.config.memory_distance, model.config.memory_sink_tokens) == (20, 768, 4)
    assert not model.side.reader.q_delta.weight.any() and model.side.memory_index == 6


def test_a_window_made_before_the_memory_block_moved_is_refused(smollm2):
    model = LongSideModel(smollm2, preset("tiny").side)
    ids = torch.arange(100, 116)[None]
    early, fed = LocalWindow(model), LocalWindow(model)
    fed.feed(ids)  # block 15's keys in its window, not yet in memory
    model.use_memory_layer(20)
    with pytest.raises(LongsideError, match=r"settings changed \(memory_layer\).*make a new window"):
        early.feed(ids)
    with pytest.raises(LongsideError, match="settings changed"):
        fed.flush()  # they must not enter a memory of block 20's keys
    assert model.memory.is_empty()
    assert LocalWindow(model).feed(ids).shape == (1, smollm2.spec.vocab_size)

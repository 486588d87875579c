"""The server's `Engine` in-process: chat turns admitted together read their prompts
together (one `RaggedWindows.feed`) and say what each would have said alone. The shipped
checkpoint on the real SmolLM2 (fp32 decode activations: the two orders differ only by
float rounding)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from longside import load_model
from longside.errors import LongsideError
from longside.inference.chat import ChatSession
from longside.inference.sampling import GenerationConfig
from longside.memory import Memory
from longside.model import LongSideModel
from longside.server.engine import Engine, Job
from longside.server.store import UserStore

NOTES = {"ann": "Ann's boat is called the Kittiwake. It is moored at pier nine, beside the ferry.",
         "ben": "Ben repairs clocks in a narrow shop on Tanner Street; the oldest dates from 1790.",
         "cy": "Cy keeps bees on the roof of the town library and sells the honey on Saturdays."}
QUESTIONS = {"ann": "Where is my boat?", "ben": "What do I repair, and on which street is my shop?",
             "cy": "What do I keep on the roof, and what do I sell?"}


@pytest.fixture(scope="module")
def model(smollm2):
    return load_model(backbone=smollm2)[0]


@pytest.fixture(scope="module")
def carrying(model):
    """The shipped side network in a 32-token window that carries its last 8: every prompt
    and document crosses segment boundaries."""
    config = dataclasses.replace(model.config, window=32, window_carry=8)
    return LongSideModel(model.backbone, config, side=model.side).eval()


def _serve(model, root, arrive: str, warm: bool = False, config: GenerationConfig | None = None,
           **engine_options) -> tuple[dict, dict, list]:
    """arrive: "waiting" (all queued before the engine starts), "while reading" (the others
    sent while an idle engine reads the first one's user from disk), "one by one" (each
    after the previous answer), "apart" (users in RAM, sent 0.1 s apart to an idle engine).
    warm: `Engine.warm_up` first, as `longside serve` does. config: each turn's (default 8
    tokens, greedy)."""
    store = UserStore(model, root)
    for user, text in NOTES.items():
        store.session(user).memorize(text, progress=False)
        store.save(user)
        if arrive != "apart":
            store.unload(user)  # read back from disk at the turn, as after a restart
    engine = Engine(model, store, **engine_options)
    if warm:
        before = sorted(p.name for p in root.iterdir())
        assert engine.warm_up() > 0
        assert sorted(p.name for p in root.iterdir()) == before and store.resident() == []
    replies, ends = {u: [] for u in NOTES}, []
    jobs = []
    for user in NOTES:
        done = threading.Event()

        def emit(e, user=user, done=done):
            if e["type"] == "text":
                replies[user].append(e["text"])
            elif e["type"] in ("done", "error"):
                ends.append(e)
                done.set()
        jobs.append((Job("chat", user, emit=emit, messages=[{"role": "user", "content": QUESTIONS[user]}],
                         config=config or GenerationConfig(max_new_tokens=8), ignore_eos=True), done))
    if arrive == "waiting":  # all waiting before the engine starts: its first pass admits them all
        for job, _ in jobs:
            engine.submit(job)
        engine.start()
    elif arrive == "while reading":
        reading, read_on = threading.Event(), threading.Event()
        read = store.read

        def slow_read(user):
            if user == jobs[0][0].user:
                reading.set()
                assert read_on.wait(60)
            return read(user)
        store.read = slow_read
        engine.start()
        try:
            engine.submit(jobs[0][0])
            assert reading.wait(60)
            for job, _ in jobs[1:]:
                engine.submit(job)
        finally:
            read_on.set()
    elif arrive == "apart":
        engine.start()
        for job, _ in jobs:
            engine.submit(job)
            time.sleep(0.1)
    else:
        engine.start()
        for job, done in jobs:
            engine.submit(job)
            assert done.wait(300)
    for _, done in jobs:
        assert done.wait(300)
    engine.stop()
    return {u: "".join(r) for u, r in replies.items()}, engine.stats(), ends


def _ask(engine: Engine, user: str, tokens: int) -> dict:
    """The user's question as one chat turn of `tokens` tokens -> its last event."""
    done, events = threading.Event(), []

    def emit(e):
        events.append(e)
        if e["type"] in ("done", "error"):
            done.set()
    engine.submit(Job("chat", user, emit=emit, messages=[{"role": "user", "content": QUESTIONS[user]}],
                      config=GenerationConfig(max_new_tokens=tokens), ignore_eos=True))
    assert done.wait(120)
    return events[-1]


def test_prompts_read_together_answer_as_alone(model, tmp_path):
    alone, alone_stats, alone_ends = _serve(model, tmp_path / "alone", "one by one")
    together, stats, ends = _serve(model, tmp_path / "together", "waiting")
    assert alone_stats["prompts_together"] == 0 and stats["prompts_together"] == len(NOTES)
    for st in (alone_stats, stats):  # every user came from disk: read ahead, then prompts and steps timed
        assert st["users_read_ahead"] == len(NOTES)
        assert st["read_ahead_s"] > 0 and st["prefill_s"] > 0 and st["step_s"] > 0
    assert [e["type"] for e in ends + alone_ends] == ["done"] * 2 * len(NOTES)
    assert all(e["usage"]["completion_tokens"] == 8 for e in ends)
    assert together == alone
    assert len(set(together.values())) == len(NOTES)  # three users, three different replies


@pytest.fixture
def int8_model(model, int8_activations):
    """The shipped model with the server's own products: int8 activations, as loaded."""
    return model


def test_on_int8_products_a_sampled_reply_is_the_same_alone_or_with_others(int8_model, tmp_path):
    # a lone user's prompt is read by the batch's path too (not by its own window's exact
    # products, whose first token can differ): a user's reply does not depend on whether
    # other users' prompts came in the same pass
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.0, seed=7)
    alone, alone_stats, _ = _serve(int8_model, tmp_path / "alone", "one by one", config=config)
    together, stats, ends = _serve(int8_model, tmp_path / "together", "waiting", config=config)
    assert alone_stats["prompts_together"] == 0 and stats["prompts_together"] == len(NOTES)
    assert [e["type"] for e in ends] == ["done"] * len(NOTES)
    assert together == alone


def test_on_int8_products_a_chat_session_gives_the_reply_the_server_gives(int8_model, tmp_path):
    # a ChatSession (`longside chat`) reads a prompt as the server does: the same memory,
    # question and seed give the same sampled reply (the server's goes on past an end of
    # text, `ignore_eos`; the session's stops there)
    config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.0, seed=7)
    served, _, ends = _serve(int8_model, tmp_path / "served", "one by one", config=config)
    assert [e["type"] for e in ends] == ["done"] * len(NOTES)
    for user, text in NOTES.items():
        session = ChatSession(int8_model, config=config, memory=Memory(int8_model.backbone, int8_model.config, 1))
        session.memorize(text, progress=False)
        reply = session.send(QUESTIONS[user])
        assert reply and served[user].startswith(reply)


def test_warming_up_stores_nothing_and_changes_no_reply(model, tmp_path):
    warmed, _, ends = _serve(model, tmp_path / "warmed", "waiting", warm=True)
    cold, _, _ = _serve(model, tmp_path / "cold", "waiting")
    assert [e["type"] for e in ends] == ["done"] * len(NOTES)
    assert warmed == cold


def test_requests_arriving_while_the_first_user_is_read_start_with_it(model, tmp_path):
    # without it the first request's prompt is read alone and the others' after it
    replies, stats, ends = _serve(model, tmp_path / "while", "while reading")
    alone, _, _ = _serve(model, tmp_path / "alone", "one by one")
    assert stats["prompts_together"] == len(NOTES)
    assert [e["type"] for e in ends] == ["done"] * len(NOTES)
    assert replies == alone


def test_a_failed_admission_answers_its_requests_and_the_engine_goes_on(model, tmp_path):
    store = UserStore(model, tmp_path)
    store.session("ann").memorize(NOTES["ann"], progress=False)
    store.save("ann")
    store.unload("ann")
    engine = Engine(model, store)
    read = engine._read_ahead

    def broken(_admit):
        raise OSError("disk unplugged")
    engine._read_ahead = broken
    engine.start()
    try:
        for expect in ("error", "done"):
            end = _ask(engine, "ann", 2)
            assert end["type"] == expect
            if expect == "error":
                assert end["status"] == 500 and "disk unplugged" in end["message"]
            engine._read_ahead = read
    finally:
        engine.stop()


def test_a_lone_prompt_that_fails_to_read_fails_its_turn_alone_and_keeps_the_saved_memory(model, tmp_path,
                                                                                          monkeypatch):
    # a lone short prompt is read by the batch's path (a group of one): its failure is that
    # turn's error (500, or 400 with the reason for a LongsideError, as a turn's own failure
    # is answered), the user comes back as last saved, and the next turn is served
    from longside.inference.ragged import RaggedWindows

    store = UserStore(model, tmp_path)
    store.session("ann").memorize(NOTES["ann"], progress=False)
    store.save("ann")
    saved = {f.name: f.read_bytes() for f in store.path("ann").iterdir()}
    feed, calls = RaggedWindows.feed, []
    failures = [RuntimeError("out of scratch space"), LongsideError("that prompt cannot be read")]

    def failing_twice(self, ids):
        calls.append(len(ids))
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return feed(self, ids)
    monkeypatch.setattr(RaggedWindows, "feed", failing_twice)
    engine = Engine(model, store).start()
    try:
        ends = []
        for _ in range(3):
            ends.append(_ask(engine, "ann", 3))
            if len(ends) <= len(failures):
                # nothing of the failed turn was stored (the files, read here: the store is the engine's)
                assert {f.name: f.read_bytes() for f in store.path("ann").iterdir()} == saved
    finally:
        engine.stop()
    assert calls == [1, 1, 1]  # each lone prompt went to the batch's path, as a group of one
    assert ends[0]["type"] == "error" and ends[0]["status"] == 500
    assert "reading the prompt failed" in ends[0]["message"] and "out of scratch space" in ends[0]["message"]
    assert ends[1]["type"] == "error" and ends[1]["status"] == 400
    assert ends[1]["message"] == "that prompt cannot be read"
    assert ends[2]["type"] == "done" and ends[2]["usage"]["completion_tokens"] == 3


def test_requests_a_few_ms_apart_wait_for_each_other(model, tmp_path):
    # an idle engine waits `batch_wait_s` for another request after each: 0.1 s apart, the
    # three prompts are read together; without the wait the first is read alone
    replies, stats, ends = _serve(model, tmp_path / "gathered", "apart", batch_wait_s=0.5, max_batch_wait_s=2.0)
    assert stats["prompts_together"] == len(NOTES)
    assert stats["users_read_ahead"] == 0 and stats["read_ahead_s"] == 0  # users in RAM: nothing read
    assert [e["type"] for e in ends] == ["done"] * len(NOTES)
    _, stats, _ = _serve(model, tmp_path / "at once", "apart", batch_wait_s=0)
    assert stats["prompts_together"] < len(NOTES)
    alone, _, _ = _serve(model, tmp_path / "alone", "one by one")
    assert replies == alone


def test_batch_wait_is_checked(model, tmp_path):
    with pytest.raises(LongsideError, match="batch_wait_s"):
        Engine(model, UserStore(model, tmp_path), batch_wait_s=0.1, max_batch_wait_s=0.05)


def test_a_carried_window_is_served_as_alone_and_documents_stored_as_memorize_stores_them(carrying, tmp_path):
    alone, _, _ = _serve(carrying, tmp_path / "alone", "one by one")
    together, stats, ends = _serve(carrying, tmp_path / "together", "waiting")
    assert stats["prompts_together"] == len(NOTES) and [e["type"] for e in ends] == ["done"] * len(NOTES)
    assert together == alone and len(set(together.values())) == len(NOTES)
    # a document memorized a segment at a time, as the whole of it at once
    store, text = UserStore(carrying, tmp_path / "docs"), " ".join(NOTES.values())
    engine, done, events = Engine(carrying, store).start(), threading.Event(), []

    def emit(e):
        events.append(e)
        if e["type"] in ("result", "error"):
            done.set()
    try:
        engine.submit(Job("memorize", "ann", emit=emit, name="notes.txt", text=text))
        assert done.wait(120) and events[-1]["type"] == "result", events[-1]
    finally:
        engine.stop()
    progress = [e["tokens_done"] for e in events if e["type"] == "progress"]
    whole = Memory(carrying.backbone, carrying.config, 1)
    whole.memorize(text, progress=False, as_text=True)
    assert len(progress) == len(range(0, progress[-1] - 8, 24)) >= 3  # segments start every 32 - 8
    assert progress[-1] == len(whole.banks[0]) == len(store.session("ann").memory.banks[0])
    whole.save(tmp_path / "whole.bank")
    store.session("ann").memory.save(tmp_path / "served.bank")
    assert (tmp_path / "whole.bank").read_bytes() == (tmp_path / "served.bank").read_bytes()

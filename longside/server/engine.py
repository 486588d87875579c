"""`Engine`: the one thread that runs the model for every user, decoding their turns together.

Requests arrive as `Job`s from any thread (`submit`); the engine thread alone touches the
model and the `UserStore`. Each pass of its loop:

    admits waiting jobs of users not already busy (an idle engine also takes those that
        arrive while it reads the first ones' users from disk, and, with `batch_wait_s`, those
        that keep arriving a few milliseconds apart): the chat turns admitted
        together read their new text together (prefill: `RaggedWindows.feed`, each user's
        window and memory its own, prompts of any lengths), choose their first tokens and
        join the running batch (one row per user, each row its own length and its own
        memory); a document, a forget or a look at memory starts or is answered;
    writes one segment of every document being memorized (so long documents do not
        stall the others' decoding), with a progress event;
    steps the batch once: one new token per row; a row that ends leaves the batch at
        once, its user is saved, and a waiting turn can join at the next pass
        (continuous batching).

A job reports through `emit(event)`, called on the engine thread with dicts:
`{"type": "text", "text"}`, `{"type": "progress", "tokens_done", "tokens_total"}`,
`{"type": "done", "finish_reason", "usage"}` (chat), `{"type": "result", "data"}`
(other jobs), `{"type": "error", "status", "message"}`. A job whose `cancelled` is set
(its client went away) ends at the next step, what was said so far kept.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from longside.backbone import tokenize
from longside.errors import LongsideError
from longside.inference.chat import ChatSession
from longside.inference.generate import eos_ids
from longside.inference.ragged import PROMPT_TOKENS, RaggedWindows
from longside.inference.sampling import GenerationConfig, TextPieces, make_generator, next_token
from longside.server.store import UserStore, now

if TYPE_CHECKING:
    from longside.inference.chat import SavedSession
    from longside.model import LongSideModel

log = logging.getLogger("longside.server")

MAX_WAITING = 16  # requests of one user queued at once


class TooBusy(LongsideError):
    """One user has too many requests waiting."""


@dataclass
class Job:
    """One request. kind: "chat" (messages, config), "memorize" (name, text), "forget", "info"."""

    kind: str
    user: str
    emit: Callable[[dict], None] = lambda _event: None  # set by whoever waits for the events
    messages: list | None = None
    config: GenerationConfig | None = None
    name: str = ""
    text: str = ""
    ignore_eos: bool = False  # decode max_tokens whatever (benchmarks; vLLM's extension)
    cancelled: bool = False


@dataclass
class _Turn:
    """A chat turn being decoded."""

    job: Job
    session: "ChatSession"
    pieces: TextPieces
    generator: torch.Generator
    seen: torch.Tensor  # [1, S] ids of the turn so far, for the repetition penalty
    prompt_tokens: int
    segments_before: int
    chosen: list[int] = field(default_factory=list)
    finish: str | None = None


@dataclass
class _Document:
    job: Job
    session: "ChatSession"
    ids: list[int]
    done: int = 0


class Engine:
    """Runs `model` for every user of `store`, at most `max_batch` chat turns at once."""

    def __init__(self, model: "LongSideModel", store: UserStore, max_batch: int = 8,
                 batch_wait_s: float = 0.0, max_batch_wait_s: float = 0.05):
        """`batch_wait_s`: an idle engine that admits a chat turn waits this long for another
        request before reading its prompt, and again after each one that comes, up to
        `max_batch_wait_s` in all (or until `max_batch` turns), so that turns sent together
        read their prompts together; a lone turn waits it too. 0 (default): no wait. (Over
        loopback on 2 cores, 8 requests sent at once arrived 20-50 ms apart: without the wait
        the first prompt is read alone and the other 7 after it.)"""
        if max_batch < 1:
            raise LongsideError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 <= batch_wait_s <= max_batch_wait_s:
            raise LongsideError(f"need 0 <= batch_wait_s <= max_batch_wait_s, got {batch_wait_s}, {max_batch_wait_s}")
        self.model, self.store, self.max_batch = model, store, max_batch
        self.batch_wait_s, self.max_batch_wait_s = batch_wait_s, max_batch_wait_s
        self.batch = RaggedWindows(model)
        self._turns: list[_Turn] = []  # row i of the batch is _turns[i]
        self._documents: list[_Document] = []
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._eos = eos_ids(model, None)
        # reads users from disk beside the engine thread while the model waits for them (one
        # torch thread: no OpenMP team of its own to contend with the model's afterwards)
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="longside-read",
                                                             initializer=torch.set_num_threads, initargs=(1,))
        self._read: dict[str, "SavedSession | Exception"] = {}  # users read ahead in this pass
        self.steps = 0  # batch steps taken (and rows stepped): for the bench
        self.rows_stepped = 0
        self.prompts_together = 0  # chat prompts read together with others
        # seconds the engine thread spent in each phase (for the bench: where a burst's time goes)
        self.users_read_ahead, self.read_ahead_s, self.prefill_s, self.step_s = 0, 0.0, 0.0, 0.0

    def warm_up(self) -> float:
        """Run what a first request would otherwise pay for once (kernel tables, fused
        weights, thread pools, the chat template, a memory's search structures) on two
        throwaway sessions sharing a small throwaway memory; nothing is stored. Call it on the
        thread that will run the engine (OpenMP keeps its worker pool per calling thread).
        Returns the seconds it took."""
        t = time.perf_counter()
        model = self.model
        tok = model.backbone.tokenizer
        memory = model.new_memory(1)
        memory.write_ids(tokenize(tok, "The keeper of the lighthouse wrote down every ship that passed the rock. " * 8))
        sessions = [ChatSession(model, memory=memory) for _ in range(2)]
        prompts = [s.begin([{"role": "user", "content": f"Which ship passed {n}?"}]) for n, s in enumerate(sessions)]
        logits = sessions[0].window.feed(prompts[0])  # one prompt by its own window, as a long prompt's
        batch = RaggedWindows(model)
        batch.join(sessions[1].window)
        batch.feed([prompts[1][0]])  # a prompt on the batch path (short prompts'), then two rows step
        batch.join(sessions[0].window)
        cfg, generator = GenerationConfig(), make_generator(0)
        ids = torch.cat([logits.argmax(-1)] * 2)
        for _ in range(3):
            ids = next_token(batch.step(ids), None, cfg, generator)
        TextPieces(tok, cfg.stops()).push(int(ids[0]))
        return time.perf_counter() - t

    # -- control, from any thread ------------------------------------------------------
    def start(self) -> "Engine":
        """Run the engine on a thread of its own (in-process use, tests). `longside serve`
        runs it on the main thread instead (`run`): OpenMP kernels called from another
        thread ran 2.7x slower here (libgomp keeps no worker pool for it)."""
        self._thread = threading.Thread(target=self._run, name="longside-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the engine on the calling thread until `stop` (or KeyboardInterrupt)."""
        self._thread = threading.current_thread()
        try:
            self._run()
        finally:
            with self._wake:
                self._stopping = True

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def submit(self, job: Job) -> Job:
        """Queue `job`. Raises LongsideError when the engine is stopping, and `TooBusy`
        when the user already has `MAX_WAITING` jobs waiting."""
        with self._wake:
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):
                raise LongsideError("the server is shutting down (or its engine stopped); try again later")
            if sum(j.user == job.user for j in self._waiting) >= MAX_WAITING:
                raise TooBusy(f"{MAX_WAITING} of your requests are already waiting; wait for them to finish")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def stats(self) -> dict:
        """Counters for a bench or a health check (read without locking: a snapshot)."""
        return {"steps": self.steps, "rows_stepped": self.rows_stepped, "decoding": len(self._turns),
                "memorizing": len(self._documents), "waiting": len(self._waiting),
                "prompts_together": self.prompts_together, "users_read_ahead": self.users_read_ahead,
                "read_ahead_s": round(self.read_ahead_s, 4), "prefill_s": round(self.prefill_s, 4),
                "step_s": round(self.step_s, 4),
                "resident_users": len(self.store.resident()), "max_batch": self.max_batch,
                "batched": self.batch.batched}

    def wake(self) -> None:
        """Look at the jobs again (e.g. one was cancelled)."""
        with self._wake:
            self._wake.notify()

    # -- the engine thread -------------------------------------------------------------
    def _busy(self) -> set[str]:
        return {t.job.user for t in self._turns} | {d.job.user for d in self._documents}

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._waiting or self._turns or self._documents or self._stopping):
                        self._wake.wait(0.5)  # with a timeout: the main thread then sees Ctrl-C
                    if self._stopping:
                        break
                    admit = self._admissible()
                try:
                    self._pass(admit)
                except Exception:  # never let the engine thread die: every request would hang
                    log.exception("engine pass failed")
                finally:
                    self._read.clear()  # what a cancelled job left unread is read again when asked for
        finally:
            self._reader.shutdown(wait=False)

    def _admissible(self, taken: list[Job] = ()) -> list[Job]:
        """Take the waiting jobs that can start now besides `taken`, those taken in this pass
        already (under the lock)."""
        busy = self._busy() | {j.user for j in taken}
        admit, room = [], self.max_batch - len(self._turns) - sum(j.kind == "chat" for j in taken)
        for job in list(self._waiting):
            if job.user in busy or (job.kind == "chat" and room <= 0):
                busy.add(job.user)  # the user's later jobs wait too: each user's run in order
                continue
            self._waiting.remove(job)
            admit.append(job)
            busy.add(job.user)
            room -= job.kind == "chat"
        return admit

    def _pass(self, admit: list[Job]) -> None:
        busy_before = self._busy()
        try:
            self._take_and_read(admit, idle=not busy_before)
        except Exception as e:  # none of them has begun: each is answered, none left hanging
            log.exception("admitting %d requests failed", len(admit))
            for job in admit:
                self._fail(job, 500, f"the request could not be admitted ({type(e).__name__}: {e})")
            admit = []
        starting: list[tuple[_Turn, torch.Tensor]] = []  # chat turns begun, their prompts not yet read
        for job in admit:
            self._guard(job, lambda j: self._admit(j, starting))
        if starting:
            t = time.perf_counter()
            self._prefill(starting)
            self.prefill_s += time.perf_counter() - t
        for doc in list(self._documents):
            self._guard(doc.job, lambda _j, d=doc: self._memorize_segment(d))
        if self._turns:
            try:
                self._step()
            except Exception as e:  # a failed batch step fails its turns, never the server
                log.exception("batch step failed")
                for turn in self._turns:  # their windows were in the failed batch: reload from disk
                    self.store.unload(turn.job.user)
                    turn.job.emit({"type": "error", "status": 500, "message": f"decoding failed: {e}"})
                self._turns, self.batch = [], RaggedWindows(self.model)
        if admit or self._busy() != busy_before:  # users came or went: not at every decode step
            self.store.evict(self._busy())

    def _take_and_read(self, admit: list[Job], idle: bool) -> None:
        """Read the users of `admit` that are on disk only. An idle engine then takes into
        `admit` (in place) the requests that came while they were read, and reads those,
        again while the newcomers' reads took time and a chat turn has room: chat turns sent
        together then read their prompts together."""
        read = self._read_ahead(admit)
        if not idle or not any(j.kind == "chat" for j in admit):
            return
        read += self._read_ahead(self._gather(admit))
        while read and sum(j.kind == "chat" for j in admit) < self.max_batch:
            with self._wake:
                more = self._admissible(admit)
                admit.extend(more)  # taken from the queue: in `admit` at once, whatever happens next
            read = self._read_ahead(more)

    def _gather(self, admit: list[Job]) -> list[Job]:
        """Take into `admit` (in place) the requests that arrive while they keep coming less
        than `batch_wait_s` apart, for at most `max_batch_wait_s`, while chat turns have
        room -> those taken."""
        taken: list[Job] = []
        if self.batch_wait_s <= 0:
            return taken
        deadline = time.monotonic() + self.max_batch_wait_s
        with self._wake:
            while sum(j.kind == "chat" for j in admit) < self.max_batch and not self._stopping:
                more = self._admissible(admit)
                if not more:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(min(self.batch_wait_s, left))
                    more = self._admissible(admit)
                    if not more:
                        break
                admit.extend(more)  # taken from the queue: in `admit` at once, whatever happens next
                taken.extend(more)
        return taken

    def _read_ahead(self, admit: list[Job]) -> int:
        """Read the users of `admit` whose sessions are on disk only, two at a time (one on
        this thread, one on the reader thread): file reads, checksums and copies, no model
        work, while the model waits for them anyway. (A reader thread that read *beside*
        decoding was slower: it contended with the model's OpenMP team for the two cores.)
        A user read here is read before any turn starts: requests arriving meanwhile can
        still join them (`_take_and_read`). Returns how many users were read."""
        users = []
        for job in admit:
            try:
                if job.kind in ("chat", "memorize") and not job.cancelled and job.user not in users \
                        and self.store.on_disk_only(job.user):
                    users.append(job.user)
            except Exception:
                pass  # an invalid name, an unreadable directory: its job fails with the reason when admitted
        if not users:
            return 0

        def read(user: str) -> "SavedSession | Exception":
            try:
                return self.store.read(user)
            except Exception as e:  # raised when the user's job asks for the session
                return e

        t = time.perf_counter()
        try:
            theirs = {u: self._reader.submit(read, u) for u in users[1::2]}
        except RuntimeError:  # the pool is shut down or broken: each is read when admitted
            return 0
        for u in users[0::2]:
            self._read[u] = read(u)
        for u, future in theirs.items():
            self._read[u] = future.result()
        self.users_read_ahead += len(users)
        self.read_ahead_s += time.perf_counter() - t
        return len(users)

    def _session(self, user: str) -> "ChatSession":
        return self.store.session(user, self._read.pop(user, None))

    def _guard(self, job: Job, work: Callable[[Job], None]) -> None:
        """Run `work(job)`; a failure answers the job and puts its user back as last saved."""
        try:
            work(job)
        except Exception as e:
            if not isinstance(e, LongsideError):
                log.exception("%s job of %s failed", job.kind, job.user)
            self._fail(job, 400 if isinstance(e, LongsideError) else 500,
                       str(e) if isinstance(e, LongsideError) else f"{type(e).__name__}: {e}")

    def _fail(self, job: Job, status: int, message: str) -> None:
        self._documents = [d for d in self._documents if d.job is not job]
        if job.kind in ("chat", "memorize"):  # half a turn or half a document stays out of memory
            self.store.unload(job.user)
        job.emit({"type": "error", "status": status, "message": message})

    def _admit(self, job: Job, starting: list) -> None:
        # a user whose memory is on disk only was normally read before (`_read_ahead`; ~0.03-
        # 0.07 s for 19k tokens, two users at a time), else `_session` reads it here
        if job.cancelled:
            return
        store = self.store
        if job.kind == "info":
            job.emit({"type": "result", "data": store.info(job.user)})
        elif job.kind == "forget":
            store.forget(job.user)
            job.emit({"type": "result", "data": store.info(job.user)})
        elif job.kind == "memorize":
            session = self._session(job.user)
            ids = tokenize(self.model.backbone.tokenizer, job.text)
            if not ids:
                raise LongsideError("empty document: there is no text to memorize")
            self._documents.append(_Document(job, session, ids))
        elif job.kind == "chat":
            starting.append(self._begin_turn(job))
        else:
            raise LongsideError(f"unknown job {job.kind!r}")

    def _memorize_segment(self, doc: _Document) -> None:
        # one segment of what `Memory.write_ids` would write for the whole document: with a
        # carried window each after the first reads the end of the one before again
        W, c = self.model.config.window, self.model.config.window_carry  # config: c < W
        start = max(doc.done - c, 0)
        doc.session.memory.write_ids(doc.ids[start:start + W], rows=[0], carried=doc.done - start)
        doc.done = min(start + W, len(doc.ids))
        doc.job.emit({"type": "progress", "tokens_done": doc.done, "tokens_total": len(doc.ids)})
        if doc.done < len(doc.ids) and not doc.job.cancelled:
            return
        self._documents.remove(doc)
        if doc.done < len(doc.ids):  # the client went away: what was written stays, unlisted
            doc.session.meta.setdefault("documents", []).append(
                {"name": doc.job.name, "tokens": doc.done, "added": now(), "partial": True})
        else:
            doc.session.meta.setdefault("documents", []).append(
                {"name": doc.job.name, "tokens": doc.done, "added": now()})
        self.store.save(doc.job.user)
        doc.job.emit({"type": "result", "data": {"document": doc.session.meta["documents"][-1],
                                                 "memory": self.store.info(doc.job.user)}})

    # -- chat turns --------------------------------------------------------------------
    def _begin_turn(self, job: Job) -> tuple[_Turn, torch.Tensor]:
        """The turn of a chat job, and the prompt ids `[1, T]` its window has still to read."""
        session = self._session(job.user)
        before = session.window.segments_written
        ids = session.begin(job.messages)
        cfg = job.config
        turn = _Turn(job, session, TextPieces(self.model.backbone.tokenizer, cfg.stops()),
                     make_generator(cfg.seed), ids, ids.shape[1], before)
        return turn, ids

    def _prefill(self, starting: list[tuple[_Turn, torch.Tensor]]) -> None:
        """Read the begun turns' prompts into their users' windows, choose each first token,
        and let the turns that go on join the batch. Short prompts are read by the batch's
        own path (`RaggedWindows.feed`, the products the decode steps use), together when
        several begin (one forward for all: ~2x faster than one by one for 8 chat prompts)
        and alone too: a reply then does not depend on whether another user's prompt came
        in the same pass (a row's logits are the same alone or among others, to float
        rounding; `LocalWindow.feed` reads with exact activations, and its first token can
        differ), and a lone user's prompt is read 2-4x sooner (`python
        experiments/serve_profile.py prefill`). A failure there fails those turns (their users
        reload from disk), as a failed batch step does."""
        together = [(t, ids) for t, ids in starting if ids.shape[1] <= PROMPT_TOKENS]
        if not self.batch.batched:
            together = []
        for turn, ids in starting:
            if not any(turn is t for t, _ in together):
                self._guard(turn.job, lambda _j, t=turn, i=ids: self._first(t, t.session.window.feed(i)))
        if not together:
            return
        try:
            group = RaggedWindows(self.model)
            for turn, _ in together:
                group.join(turn.session.window)
            logits = group.feed([ids[0] for _, ids in together])
            windows = [group.leave(0) for _ in together]
            self.prompts_together += len(together) if len(together) > 1 else 0
        except Exception as e:  # answered as `_guard` answers a turn's own failure
            if isinstance(e, LongsideError):
                status, message = 400, str(e)
            else:
                log.exception("reading %d prompt(s) on the batch's path failed", len(together))
                status, message = 500, f"reading the prompt failed: {type(e).__name__}: {e}"
            for turn, _ in together:
                self._fail(turn.job, status, message)
            return
        for b, (turn, _) in enumerate(together):
            turn.session.window = windows[b]
            self._guard(turn.job, lambda _j, t=turn, x=logits[b:b + 1]: self._first(t, x))

    def _first(self, turn: _Turn, logits: torch.Tensor) -> None:
        """The turn's prompt is read (`logits [1, V]` after it): its first token, then the batch."""
        self._choose(turn, logits)
        if turn.finish is not None:
            self._end_turn(turn)
        else:
            self.batch.join(turn.session.window)
            self._turns.append(turn)

    def _choose(self, turn: _Turn, logits: torch.Tensor) -> None:
        """Choose the turn's next token from `logits [1, V]`, emit its text, decide the end."""
        cfg = turn.job.config
        t = int(next_token(logits, turn.seen, cfg, turn.generator)[0])
        turn.chosen.append(t)
        turn.seen = torch.cat([turn.seen, torch.tensor([[t]])], 1)
        if t in self._eos and not turn.job.ignore_eos:
            turn.finish = "stop"
        else:
            text = turn.pieces.push(t)
            if text:
                turn.job.emit({"type": "text", "text": text})
            if turn.pieces.stopped:
                turn.finish = "stop"
        if turn.finish is None and (len(turn.chosen) >= cfg.max_new_tokens or turn.job.cancelled):
            turn.finish = "length" if not turn.job.cancelled else "cancelled"

    def _step(self) -> None:
        t = time.perf_counter()
        logits = self.batch.step(torch.tensor([turn.chosen[-1] for turn in self._turns]))
        self.step_s += time.perf_counter() - t
        self.steps += 1
        self.rows_stepped += len(self._turns)
        failed = {}
        for b, turn in enumerate(self._turns):
            try:
                self._choose(turn, logits[b:b + 1])
            except Exception as e:  # one turn's failure is its own
                log.exception("choosing a token for %s failed", turn.job.user)
                turn.finish, failed[id(turn)] = "error", f"{type(e).__name__}: {e}"
        for b in reversed(range(len(self._turns))):
            turn = self._turns[b]
            if turn.finish is None:
                continue
            window = self.batch.leave(b)
            self._turns.pop(b)
            if id(turn) in failed:
                self._fail(turn.job, 500, failed[id(turn)])
                continue
            turn.session.window = window
            try:
                self._end_turn(turn)
            except Exception as e:
                log.exception("ending the turn of %s failed", turn.job.user)
                self._fail(turn.job, 500, f"the reply could not be saved ({type(e).__name__}: {e})")

    def _end_turn(self, turn: _Turn) -> None:
        tail = turn.pieces.finish()
        if tail:
            turn.job.emit({"type": "text", "text": tail})
        session = turn.session
        session.end(turn.chosen, turn.pieces.text)
        self.store.save(turn.job.user, memory_unchanged=session.window.segments_written == turn.segments_before)
        usage = {"prompt_tokens": turn.prompt_tokens, "completion_tokens": len(turn.chosen),
                 "total_tokens": turn.prompt_tokens + len(turn.chosen)}
        turn.job.emit({"type": "done", "finish_reason": turn.finish, "usage": usage})

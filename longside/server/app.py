"""The HTTP API: OpenAI's chat shapes plus memory endpoints, every request as one user.

    POST   /v1/chat/completions    messages -> reply (JSON, or server-sent events with "stream")
    GET    /v1/models              the one model served
    POST   /v1/memories/documents  {"name", "text", "stream"?} memorize into the caller's memory
    GET    /v1/memories            what the caller's memory holds
    DELETE /v1/memories            forget it
    GET    /v1/stats               the engine's counters (batching; no user's data)
    GET    /                       a chat page

The user is who the API key says (`Authorization: Bearer KEY`, see keys.py); without a
key file there is one local user. No endpoint takes a user name: a request can only ever
reach its own caller's memory. Errors use OpenAI's shape `{"error": {"message", "type",
"code"}}`. Bodies are read by hand, not by a schema library, so every refusal says
exactly what to change.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from importlib import resources
from typing import AsyncIterator
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from longside.errors import LongsideError
from longside.inference.sampling import GenerationConfig
from longside.server.engine import Engine, Job, TooBusy
from longside.server.keys import KeyFile

LOCAL_USER = "local"


class _Refusal(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    @classmethod
    def of(cls, event: dict) -> "_Refusal":
        """The refusal for an engine's error event."""
        server = event["status"] >= 500
        return cls(event["status"], event["message"], "server_error" if server else "invalid_request",
                   "server_error" if server else "invalid_request_error")


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def make_app(engine: Engine, model_id: str, keys: KeyFile | None = None, max_body_bytes: int = 8 << 20,
             default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app serving `engine` as `model_id` (also answers to "longside")."""
    app = FastAPI(title="longside", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("longside.server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(_Refusal)
    async def refused(_request: Request, e: _Refusal):
        return _error(e.status, e.message, e.code, e.kind)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(_request: Request, e: StarletteHTTPException):
        return _error(e.status_code, f"{e.detail}: see GET /v1/models, /v1/chat/completions, /v1/memories",
                      "not_found" if e.status_code == 404 else "invalid_request")

    def user_of(request: Request) -> str:
        """The caller's user (where their memory is kept), after refusing requests that
        another web site makes through the caller's browser."""
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            raise _Refusal(403, f"requests from the web page at {origin} are refused: only this server's own "
                                "page may call it from a browser", "foreign_origin", "permission_error")
        if keys is None:
            # one local user, no key: refuse a Host that is not loopback (DNS rebinding)
            host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise _Refusal(403, f"this server has no keys and answers loopback only, not Host {host!r}",
                               "foreign_host", "permission_error")
            return LOCAL_USER
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        user = keys.user_for(key)
        if user is None:
            raise _Refusal(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with a key from "
                                "`longside keys add NAME`", "invalid_api_key", "authentication_error")
        return keys.store_name(user)

    async def body_of(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            # a plain form or text post is what a foreign page can send without asking first
            raise _Refusal(415, f"send the body as JSON with 'Content-Type: application/json' (got {kind or 'none'!r})",
                           "unsupported_media_type")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _Refusal(413, f"request body of {int(declared)} bytes exceeds the server's limit of "
                                f"{max_body_bytes} (--max-body-mb); send a shorter text, or split a document",
                           "body_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise _Refusal(413, f"request body exceeds the server's limit of {max_body_bytes} bytes "
                                    "(--max-body-mb)", "body_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _Refusal(400, f"the body is not valid JSON ({e})", "invalid_json") from None
        if not isinstance(body, dict):
            raise _Refusal(400, "the body must be a JSON object", "invalid_json")
        return body

    def run(job: Job) -> AsyncIterator[dict]:
        """Submit `job` to the engine now (a refusal comes before any response is sent) ->
        an iterator of its events until the last."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job.emit = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
        try:
            engine.submit(job)
        except TooBusy as e:
            raise _Refusal(429, str(e), "rate_limit_exceeded", "rate_limit_error") from None
        except LongsideError as e:
            raise _Refusal(503, str(e), "unavailable", "server_error") from None

        async def events() -> AsyncIterator[dict]:
            try:
                while True:
                    event = await queue.get()
                    yield event
                    if event["type"] in ("done", "result", "error"):
                        return
            finally:  # the client went away (or we are done): the engine lets the job go
                job.cancelled = True
                engine.wake()
        return events()

    async def answer(job: Job) -> dict:
        """The job's single result (non-streaming), or its error as a refusal."""
        async for event in run(job):
            if event["type"] == "error":
                raise _Refusal.of(event)
            if event["type"] == "result":
                return event["data"]
        raise _Refusal(500, "the job ended without a result", "server_error", "server_error")

    def sse(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models(request: Request):
        user_of(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "longside"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        user = user_of(request)
        body = await body_of(request)
        job = Job("chat", user, messages=_messages(body),
                  config=_config(body, model_id, default_max_tokens), ignore_eos=body.get("ignore_eos") is True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": model_id}
        if body.get("stream") is True:
            job_events = run(job)

            async def events() -> AsyncIterator[str]:
                first = {**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                yield f"data: {json.dumps(first)}\n\n"
                async for ev in job_events:
                    if ev["type"] == "text":
                        chunk = {**base, "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": {"content": ev["text"]}, "finish_reason": None}]}
                    elif ev["type"] == "done":
                        chunk = {**base, "object": "chat.completion.chunk", "usage": ev["usage"],
                                 "choices": [{"index": 0, "delta": {}, "finish_reason": ev["finish_reason"]}]}
                    else:  # an error after the stream started: said in the stream, as OpenAI does
                        chunk = {"error": {"message": ev["message"], "type": _Refusal.of(ev).kind,
                                           "code": ev["status"]}}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return sse(events())
        text, done = [], None
        async for ev in run(job):
            if ev["type"] == "text":
                text.append(ev["text"])
            elif ev["type"] == "done":
                done = ev
            elif ev["type"] == "error":
                raise _Refusal.of(ev)
        return {**base, "object": "chat.completion", "usage": done["usage"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "finish_reason": done["finish_reason"]}]}

    @app.get("/v1/stats")
    async def stats(request: Request):
        """The engine's counters (no user's data): batch steps, rows stepped, waiting jobs."""
        user_of(request)
        return engine.stats()

    @app.get("/v1/memories")
    async def memories(request: Request):
        return await answer(Job("info", user_of(request)))

    @app.delete("/v1/memories")
    async def forget(request: Request):
        data = await answer(Job("forget", user_of(request)))
        return {"deleted": True, "memory": data}

    @app.post("/v1/memories/documents")
    async def add_document(request: Request):
        user = user_of(request)
        body = await body_of(request)
        text, name = body.get("text"), body.get("name", "document")
        if not isinstance(text, str) or not text.strip():
            raise _Refusal(400, "'text' must be a non-empty string: the document to memorize", "invalid_text")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise _Refusal(400, "'name' must be a string of 1 to 200 characters", "invalid_name")
        job = Job("memorize", user, name=name, text=text)
        if body.get("stream") is True:
            job_events = run(job)

            async def events() -> AsyncIterator[str]:
                async for ev in job_events:
                    data = ev["data"] if ev["type"] == "result" else (
                        {"error": {"message": ev["message"], "code": ev["status"]}} if ev["type"] == "error"
                        else {"tokens_done": ev["tokens_done"], "tokens_total": ev["tokens_total"]})
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            return sse(events())
        return await answer(job)

    return app


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Refusal(400, "'messages' must be a non-empty list of {role, content}", "invalid_messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _Refusal(400, f"messages[{i}] must have a role of system, user or assistant", "invalid_messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's list of parts: the text parts
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise _Refusal(400, f"messages[{i}]: only text content is supported", "invalid_messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise _Refusal(400, f"messages[{i}].content must be text", "invalid_messages")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise _Refusal(400, "the last message must be the user's: it is what the model answers", "invalid_messages")
    return out


MAX_TOKENS_LIMIT = 4096  # a reply longer than this is refused: one row must not hold the batch for ever


def _config(body: dict, model_id: str, default_max_tokens: int = 256) -> GenerationConfig:
    model = body.get("model")
    if model not in (model_id, "longside"):
        raise _Refusal(404, f"model {model!r} is not served here; use {model_id!r} (GET /v1/models)",
                       "model_not_found")
    if body.get("n", 1) != 1:
        raise _Refusal(400, "n must be 1: one reply per request", "invalid_n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise _Refusal(400, f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {max_tokens!r}",
                       "invalid_max_tokens")
    temperature = body.get("temperature")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4
                                                            and all(isinstance(s, str) for s in stop))):
        raise _Refusal(400, "stop must be a string or a list of at most 4 strings", "invalid_stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _Refusal(400, f"seed must be an integer, got {seed!r}", "invalid_seed")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise _Refusal(400, f"temperature must be a number in [0, 2], got {temperature!r}", "invalid_temperature")
    top_p = body.get("top_p", 1.0)
    try:
        # greedy unless a temperature asks for sampling (OpenAI's 0 means near-greedy; below
        # 0.01 the division would overflow the logits)
        sample = temperature is not None and temperature >= 0.01
        return GenerationConfig(max_new_tokens=max_tokens, do_sample=sample,
                                temperature=float(temperature) if sample else 1.0,
                                top_p=top_p, stop=stop, seed=seed)
    except LongsideError as e:
        raise _Refusal(400, str(e), "invalid_parameter") from None

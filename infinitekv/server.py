"""`ikv serve`: an OpenAI-compatible chat server whose conversations are InfiniteKV archives.

    ikv serve --archives ./conversations            # http://127.0.0.1:8000/v1, model "smollm2-135m"

One model, one worker thread, a first-come first-served queue of turns (a turn runs to its end before the next one
starts, so every client waits at most for the turns queued before it). The event loop never runs model code, so
`GET /health` answers during the longest prefill.

A conversation id (header `X-Conversation-Id`, or body field `conversation_id`) names one archive directory under
--archives. A request repeats the conversation so far, as every OpenAI client does, and adds new messages ending
with a user message: the archive's stored messages must be a prefix of the request's (409 otherwise), and only the
new messages are prefilled; everything before is resumed from the archive. A turn is committed when its answer is
complete, so a client that goes away mid-turn, or a server killed mid-turn, leaves the conversation at its previous
turn. A request without an id gets an in-RAM archive that lives for that one request.

Usage reports `prompt_tokens` (the whole context), `prompt_tokens_details.cached_tokens` (resumed from the archive,
not re-read) and `prefill_tokens` (read for this request); headers `X-IKV-Prefill-Tokens` and `X-IKV-Resumed-Tokens`
say the same. Every error is one line of JSON in OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from infinitekv.attention import RetrievalConfig
from infinitekv.cache import chunk_bounds
from infinitekv.errors import IKVError
from infinitekv.models import DEFAULT_MODEL

CONVERSATION_HEADER = "X-Conversation-Id"
CONVERSATION_FIELD = "conversation_id"
# Letters, digits, '.', '_', '-', starting with a letter or digit: no '/', no '..' component, no hidden files.
CONVERSATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4
MAX_MESSAGES = 10_000
DEFAULT_MAX_TOKENS = 256

log = logging.getLogger("uvicorn.error")  # configured by uvicorn, so server lines share its format and stream


@dataclass(frozen=True)
class ServeOptions:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # models.resolve_device
    dtype: str = "auto"  # models.resolve_dtype
    archives: Path = Path("conversations")
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 4 << 20  # ~1M tokens of text: far more than one turn should carry
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    max_queue: int = 64  # turns waiting or running; more get 503
    config: RetrievalConfig = field(default_factory=RetrievalConfig)


# ---- errors --------------------------------------------------------------------------------------------------------

class APIError(Exception):
    """An HTTP error: status, one-line message naming the problem and the fix, and OpenAI's machine-readable code."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error"}.get(self.status)
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": None}}


def archive_failure(err: IKVError, conversation: str | None) -> APIError:
    """An IKVError from opening, resuming or committing an archive -> the HTTP status that fits it."""
    text = str(err)
    message = f"conversation '{conversation}': {text}" if conversation else text
    if "disk full" in text:
        return APIError(507, message, "disk_full")
    if "in use by another process" in text or "already open" in text:
        return APIError(409, message, "conversation_busy")
    if "another model" in text:
        return APIError(409, message, "model_mismatch")
    if "corrupted" in text:
        return APIError(500, message, "archive_corrupt")
    return APIError(500, message, "archive_error")


# ---- requests ------------------------------------------------------------------------------------------------------

@dataclass
class ChatRequest:
    messages: list[dict]  # {"role": system|user|assistant, "content": str}, the last one a user message
    conversation: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def conversation_dir(archives: Path, conversation: str) -> Path:
    """The archive directory of a conversation id; refuses anything that could name a path outside `archives`."""
    if not isinstance(conversation, str) or not CONVERSATION_ID.fullmatch(conversation):
        shown = repr(conversation)[:80]
        raise APIError(400, f"conversation id {shown} is not allowed; use 1-128 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit", "invalid_conversation_id")
    path = archives / conversation
    if path.resolve().parent != archives.resolve():  # a symlink planted in the archives directory
        raise APIError(400, f"conversation id '{conversation}' leads outside the archives directory; "
                            "use another id", "invalid_conversation_id")
    return path


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _number(obj: dict, name: str, default: float, low: float, high: float, *, integer: bool = False,
            low_open: bool = False):
    value = obj.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    bad_range = value <= low if low_open else value < low
    if isinstance(value, bool) or not isinstance(value, kind) or bad_range or value > high:
        what = "a whole number" if integer else "a number"
        bounds = f"{'above' if low_open else 'from'} {low} to {high}"
        raise APIError(400, f"'{name}' must be {what} {bounds}, got {json.dumps(value)[:40]}", "invalid_value")
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts: only text parts are understood
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{index}].content has a part that is not text; this server reads "
                                    "text only", "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts", "invalid_messages")


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "invalid_messages")
    if len(raw) > MAX_MESSAGES:
        raise APIError(400, f"'messages' has {len(raw):,} entries, more than {MAX_MESSAGES:,}", "invalid_messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{index}] needs a role of {', '.join(ROLES)}", "invalid_messages")
        messages.append({"role": ROLES[message["role"]], "content": _content(message, index)})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message (the turn to answer)", "invalid_messages")
    return messages


def parse_chat_request(body: bytes, header_conversation: str | None, served_model: str,
                       max_tokens_limit: int) -> ChatRequest:
    """A POST /v1/chat/completions body (untrusted bytes) -> ChatRequest, or APIError naming the first problem."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise APIError(400, f"request body is not valid JSON ({err}); send one JSON object", "invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    model = obj.get("model")
    if not isinstance(model, str):
        raise APIError(400, f"'model' is required; this server serves '{served_model}'", "invalid_model")
    if model != served_model:
        raise APIError(404, f"model '{model[:100]}' is not served here; use '{served_model}' (GET /v1/models)",
                       "model_not_found")
    for name in ("tools", "functions"):
        if obj.get(name):
            raise APIError(400, f"'{name}' is not supported by this server; send plain chat messages",
                           "unsupported_parameter")
    if obj.get("logprobs"):
        raise APIError(400, "'logprobs' is not supported by this server; leave it out", "unsupported_parameter")
    if obj.get("n", 1) != 1:
        raise APIError(400, "'n' must be 1: this server answers once per request", "unsupported_parameter")
    stop = obj.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else () if stop is None else None
    if stops is None or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them",
                       "invalid_value")
    stream = obj.get("stream", False)
    options = obj.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "'stream' must be true or false and 'stream_options' an object", "invalid_value")
    conversation = obj.get(CONVERSATION_FIELD)
    if conversation is not None and header_conversation is not None and conversation != header_conversation:
        raise APIError(400, f"header {CONVERSATION_HEADER} and field '{CONVERSATION_FIELD}' name different "
                            "conversations; send one of them", "invalid_conversation_id")
    conversation = conversation if conversation is not None else header_conversation
    limit = max_tokens_limit
    seed = _number(obj, "seed", None, 0, 2**63 - 1, integer=True)
    if seed is None:  # like OpenAI: sampling without a seed differs from request to request
        seed = random.SystemRandom().randrange(2**63)
    max_tokens = obj.get("max_completion_tokens", obj.get("max_tokens"))
    return ChatRequest(
        messages=_messages(obj.get("messages")),
        conversation=conversation,
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", min(DEFAULT_MAX_TOKENS, limit), 1, limit,
                           integer=True),
        temperature=float(_number(obj, "temperature", 0.0, 0.0, 2.0)),
        top_p=float(_number(obj, "top_p", 1.0, 0.0, 1.0, low_open=True)),
        seed=seed,
        stop=stops,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _same_message(stored: dict, sent: dict) -> bool:
    # an assistant message is matched against what the server returned (stop strings cut it short of what the cache
    # holds); surrounding whitespace is not significant, clients strip it
    candidates = {stored["content"].strip(), str(stored.get("returned", stored["content"])).strip()}
    return stored["role"] == sent["role"] and sent["content"].strip() in candidates


def plan_turn(stored: list[dict], sent: list[dict], conversation: str | None) -> tuple[list[dict], str]:
    """What the archive lacks: the new messages before the last one, and the last one's (user) text.

    The stored conversation must be a prefix of the request's messages; anything else is a 409 naming where they part.
    """
    name = f"conversation '{conversation}'"
    for index, (old, new) in enumerate(zip(stored, sent)):
        if not _same_message(old, new):
            raise APIError(409, f"messages[{index}] ({new['role']}) differs from message {index} stored in {name}; "
                                "send the stored conversation followed by new messages, or use a new conversation id",
                           "conversation_mismatch")
    if len(sent) <= len(stored):
        raise APIError(409, f"{name} already holds {len(stored)} messages and the request has {len(sent)}; repeat "
                            "them and add a new user message", "conversation_mismatch")
    fresh = sent[len(stored):]
    return fresh[:-1], fresh[-1]["content"]


# ---- text out ------------------------------------------------------------------------------------------------------

def decode(tokenizer, ids: list[int], *, special: bool = False) -> str:
    # no clean-up of spaces: the text of a prefix must be a prefix of the text, or streamed deltas would not add up
    return tokenizer.decode(ids, skip_special_tokens=not special, clean_up_tokenization_spaces=False)


class TextStream:
    """Detokenizes a growing answer; releases only text that cannot turn out to be the start of a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""  # the answer as returned: cut before the first stop string
        self.sent = 0  # characters of it released so far
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = decode(self.tokenizer, self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its other bytes
            return ""
        hits = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if hits:
            self.stopped, self.text = True, text[: min(hits)]
            return self._release(len(self.text))
        self.text = text
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return self._release(len(text) - hold)

    def finish(self) -> str:
        if not self.stopped:
            self.text = decode(self.tokenizer, self.ids)
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


# ---- turns ---------------------------------------------------------------------------------------------------------

@dataclass(eq=False)  # hashed by identity: the worker keeps a set of live turns
class Turn:
    """One request's turn; the worker thread reports to the request's coroutine through `events`."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, data=None) -> None:
        """From the worker thread: ("started" | "progress" | "delta" | "done" | "error" | "cancelled", data)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


class Worker:
    """The model and the one thread that runs it; turns run one after another in arrival order."""

    def __init__(self, loaded, options: ServeOptions, model_id: str):
        self.loaded, self.options, self.model_id = loaded, options, model_id
        self.archives = Path(options.archives)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ikv-turn")
        self.queued = 0  # turns submitted and not finished; touched only on the event loop
        self.turns: set[Turn] = set()

    def submit(self, turn: Turn) -> asyncio.Future:
        if self.queued >= self.options.max_queue:
            raise APIError(503, f"{self.queued} turns are queued; retry later, or start the server with a larger "
                                "--max-queue", "server_busy")
        self.queued += 1
        self.turns.add(turn)
        future = turn.loop.run_in_executor(self.executor, self.run, turn)

        def finished(_):
            self.queued -= 1
            self.turns.discard(turn)

        future.add_done_callback(finished)
        return future

    def shutdown(self) -> None:
        for turn in list(self.turns):
            turn.cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)

    # -- in the worker thread --
    def run(self, turn: Turn) -> None:
        conversation = turn.request.conversation
        try:
            if turn.cancel.is_set():
                turn.emit("cancelled")
                return
            with self._session(conversation) as session:
                self._answer(session, turn)
        except APIError as err:
            turn.emit("error", err)
        except IKVError as err:
            turn.emit("error", archive_failure(err, conversation))
        except Exception:
            log.exception("turn of conversation %s failed", conversation)
            turn.emit("error", APIError(500, "internal error while answering; the conversation is at its last "
                                             "committed turn; see the server log", "internal_error"))

    @contextlib.contextmanager
    def _session(self, conversation: str | None):
        from infinitekv.archive import MANIFEST_NAME, Archive
        from infinitekv.engine import new_archive, open_session

        loaded, config = self.loaded, self.options.config
        common = dict(tokenizer=loaded.tokenizer, config=config, fingerprint=loaded.weights_sha256)
        if conversation is None:
            with open_session(loaded.model, archive=None, mode="ram", **common) as session:
                yield session
            return
        path = conversation_dir(self.archives, conversation)
        if (path / MANIFEST_NAME).exists():
            store = Archive.open(path, model_fingerprint=loaded.weights_sha256, writable=True)
        else:
            store = new_archive(path, loaded.model, loaded.weights_sha256, config.rotation_seed)
        try:
            # an archive is created before its first turn commits; with no commit yet there is nothing to resume
            with open_session(loaded.model, archive=store, resume=store.generation > 0, **common) as session:
                yield session
        finally:
            store.close()  # uncommitted records of a turn that did not finish are dropped when it is next opened

    def _answer(self, session, turn: Turn) -> None:
        request, tokenizer = turn.request, self.loaded.tokenizer
        clock = time.perf_counter()
        earlier, user_text = plan_turn(session.messages, request.messages, request.conversation)
        session.messages = session.messages + earlier
        ids = session.turn_ids(user_text)
        resumed = len(session.token_ids)
        turn.emit("started", {"resumed_tokens": resumed, "prefill_tokens": len(ids)})
        # every chunk but the last is fed here, to report progress and notice a client that left; the last goes to
        # generate
        bounds = chunk_bounds(session.cache, resumed, len(ids))
        for index, (begin, end) in enumerate(bounds[:-1]):
            if turn.cancel.is_set():
                turn.emit("cancelled")
                return
            session.feed(ids[begin:end])
            turn.emit("progress", (index + 1, len(bounds)))
        text = TextStream(tokenizer, request.stop)

        def on_token(token: int) -> bool:
            delta = text.push(token)
            if delta:
                turn.emit("delta", delta)
            return text.stopped or turn.cancel.is_set()

        generated = session.generate(ids[bounds[-1][0]:], max_new_tokens=request.max_tokens, temperature=request.temperature,
                                     top_p=request.top_p, seed=request.seed, on_token=on_token)
        if turn.cancel.is_set():  # the client left: the conversation stays at its last committed turn
            turn.emit("cancelled")
            return
        tail = text.finish()
        if tail:
            turn.emit("delta", tail)
        ended = bool(generated) and generated[-1] in session.stop_ids()
        # the cache holds every generated token, so the stored message is their whole text (the chat template renders
        # it back to exactly the transcript); what the client got, cut at a stop string, is kept beside it
        content = decode(tokenizer, generated)
        message = {"role": "assistant", "content": content}
        if text.text != content:
            message["returned"] = text.text
        session.messages.append(message)
        session.transcript += decode(tokenizer, generated, special=True)
        if request.conversation is not None:
            session.commit()
        seconds = time.perf_counter() - clock
        log.info("conversation %s: resumed %d tokens, read %d, wrote %d in %.2f s", request.conversation or "(ram)",
                 resumed, len(ids), len(generated), seconds)
        turn.emit("done", {
            "text": text.text,
            "finish_reason": "stop" if ended or text.stopped else "length",
            "usage": {
                "prompt_tokens": resumed + len(ids),
                "completion_tokens": len(generated),
                "total_tokens": resumed + len(ids) + len(generated),
                "prompt_tokens_details": {"cached_tokens": resumed},
                "prefill_tokens": len(ids),
            },
        })


# ---- HTTP ----------------------------------------------------------------------------------------------------------

def _json_line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error_response(err: APIError):
    from starlette.responses import Response

    # OpenAI's clients retry 409 and 5xx unless told not to; only a busy server or conversation is worth a retry
    retry = "true" if err.code in ("server_busy", "conversation_busy") else "false"
    return Response(_json_line(err.body()) + "\n", status_code=err.status, media_type="application/json",
                    headers={"x-should-retry": retry})


async def read_body(request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes whatever Content-Length claims."""
    too_big = APIError(413, f"request body is larger than {limit:,} bytes; send less, or start the server with a "
                            "larger --max-body-bytes", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


async def _watch_disconnect(request, turn: Turn) -> None:
    """Until cancelled: a client that goes away before its answer starts cancels its turn."""
    while True:
        if await request.is_disconnected():
            turn.cancel.set()
            return
        await asyncio.sleep(0.25)


def _chunk(base: dict, delta: dict, finish_reason: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return f"data: {_json_line({**base, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"


async def _stream(turn: Turn, base: dict):
    """Server-sent events: a role chunk, content deltas, prefill progress as SSE comments, a finish, [DONE]."""
    try:
        yield _chunk(base, {"role": "assistant", "content": ""})
        while True:
            kind, data = await turn.events.get()
            if kind == "progress":
                yield f": prefill {data[0]}/{data[1]} chunks\n\n"
            elif kind == "delta":
                yield _chunk(base, {"content": data})
            elif kind == "done":
                yield _chunk(base, {}, data["finish_reason"])
                if turn.request.include_usage:
                    yield f"data: {_json_line({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': data['usage']})}\n\n"
                yield "data: [DONE]\n\n"
                return
            elif kind == "error":
                yield f"data: {_json_line(data.body())}\n\n"
                return
            elif kind == "cancelled":
                return
    finally:
        turn.cancel.set()  # after "done" this changes nothing; before it, the client left and the turn must stop


def build_app(worker: Worker):
    """The Starlette application: /health, /v1/models, /v1/chat/completions."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    options = worker.options
    key = options.api_key.encode() if options.api_key else None

    def authorize(request) -> None:
        if key is None:
            return
        sent = request.headers.get("authorization", "")
        token = sent[7:].encode() if sent.lower().startswith("bearer ") else b""
        if not hmac.compare_digest(token, key):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>' with the key the "
                                "server was started with", "invalid_api_key")

    def model_card() -> dict:
        return {"id": worker.model_id, "object": "model", "created": 0, "owned_by": "infinitekv"}

    async def health(request):
        return JSONResponse({"status": "ok", "model": worker.model_id, "weights_sha256":
                             worker.loaded.weights_sha256, "queued": worker.queued})

    async def models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request):
        authorize(request)
        if request.path_params["model"] != worker.model_id:
            raise APIError(404, f"model '{request.path_params['model'][:100]}' is not served here; use "
                                f"'{worker.model_id}'", "model_not_found")
        return JSONResponse(model_card())

    async def chat_completions(request):
        authorize(request)
        body = await read_body(request, options.max_body_bytes)
        chat = parse_chat_request(body, request.headers.get(CONVERSATION_HEADER), worker.model_id,
                                  options.max_tokens_limit)
        if chat.conversation is not None:
            conversation_dir(worker.archives, chat.conversation)  # refuse a bad id before it waits in the queue
        turn = Turn(chat, asyncio.get_running_loop())
        worker.submit(turn)
        watcher = asyncio.create_task(_watch_disconnect(request, turn))
        try:
            kind, data = await turn.events.get()
            started = data if kind == "started" else None
            while kind in ("started", "progress", "delta") and not chat.stream:
                kind, data = await turn.events.get()
        finally:
            watcher.cancel()
        if kind == "error":
            return error_response(data)
        if kind == "cancelled":
            return error_response(APIError(499, "the client closed the request", "client_closed_request"))
        headers = {"X-IKV-Prefill-Tokens": str(started["prefill_tokens"]),
                   "X-IKV-Resumed-Tokens": str(started["resumed_tokens"])}
        if chat.conversation is not None:
            headers[CONVERSATION_HEADER] = chat.conversation
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": worker.model_id}
        if chat.stream:
            return StreamingResponse(_stream(turn, base), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        choice = {"index": 0, "message": {"role": "assistant", "content": data["text"]},
                  "finish_reason": data["finish_reason"]}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": data["usage"]},
                            headers=headers)

    async def api_error(request, err: APIError):
        return error_response(err)

    async def http_error(request, err: HTTPException):
        codes = {404: ("no such endpoint; this server has /health, /v1/models and /v1/chat/completions", "not_found"),
                 405: (f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed")}
        message, code = codes.get(err.status_code, (str(err.detail), "http_error"))
        return error_response(APIError(err.status_code, message, code))

    async def internal_error(request, err: Exception):
        return error_response(APIError(500, "internal error; see the server log", "internal_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )


# ---- the server process --------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_options(options: ServeOptions) -> None:
    if not is_loopback(options.host) and not options.api_key:
        raise IKVError(f"--host {options.host} is reachable from other machines; pass --api-key (or set IKV_API_KEY), "
                       "or bind to 127.0.0.1")
    if not 0 <= options.port <= 65535:
        raise IKVError(f"--port must be 0-65535, got {options.port}")
    for name in ("max_body_bytes", "max_tokens_limit", "max_queue"):
        if getattr(options, name) < 1:
            raise IKVError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads, so a taken port is reported at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise IKVError(f"--host {host} does not resolve ({err.strerror}); use an IP address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise IKVError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or stop what "
                       "uses it") from None
    return sock


def served_model_id(model: str) -> str:
    """The id clients send: the --model value, or a local path's last component."""
    return Path(model).name if os.path.exists(model) else model


def serve(options: ServeOptions) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    from infinitekv.engine import check_budget
    from infinitekv.models import load_model

    check_options(options)
    try:
        Path(options.archives).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise IKVError(f"cannot create --archives {options.archives} ({err.strerror}); choose a writable "
                       "directory") from None
    sock = bind(options.host, options.port)
    loaded = load_model(options.model, options.dtype, options.device)
    if not getattr(loaded.tokenizer, "chat_template", None):
        raise IKVError(f"model {options.model} has no chat template; ikv serve needs an instruct (chat) model")
    options = dataclasses.replace(options, config=RetrievalConfig.for_model(loaded.model.config,
                                                                          **asdict(options.config)))
    check_budget(loaded.model, options.config)
    worker = Worker(loaded, options, served_model_id(options.model))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"ikv: serving {worker.model_id} on http://{shown}:{port}/v1 (conversations in {options.archives})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(build_app(worker), log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


# ---- a client: start a server, load-test it --------------------------------------------------------------------------

READY = re.compile(r"ikv: serving (\S+) on (http://\S+)/v1")


@dataclass
class Spawned:
    process: subprocess.Popen
    url: str  # http://host:port
    model_id: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn_server(args: list[str], log: Path, timeout_s: float = 300.0) -> Spawned:
    """Start `ikv serve ARGS` (with this Python), wait until /health answers; stderr goes to `log`."""
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "infinitekv", "serve", *args], stdout=out, stderr=out,
                                   stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    match = None
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise IKVError(f"ikv serve exited with code {process.returncode}: "
                               f"{log.read_text(errors='replace').strip()[-500:]}")
            match = match or READY.search(log.read_text(errors="replace"))
            if match:
                status, _, _ = request_json(match.group(2), "GET", "/health", timeout=5)
                if status == 200:
                    return Spawned(process, match.group(2), match.group(1), log)
            time.sleep(0.2)
        raise IKVError(f"ikv serve did not answer /health within {timeout_s:.0f} s; see {log}")
    except BaseException:
        process.kill()
        process.wait()
        raise


def request_json(url: str, method: str, path: str, body: dict | None = None, headers: dict | None = None,
                 timeout: float = 600.0) -> tuple[int, dict, dict | None]:
    """One HTTP request with the standard library: (status, lower-cased headers, JSON body or None)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    except OSError:
        return 0, {}, None
    finally:
        connection.close()


def secret_number(client: int, turn: int) -> int:
    """A distinct 5-digit number per (client, turn), so an answer delivered to the wrong client is caught."""
    return 10000 + (7919 * (client * 1000 + turn + 1)) % 90000


def load_test(url: str, model_id: str, *, clients: int, requests: int, max_tokens: int,
              api_key: str | None = None) -> dict:
    """`clients` threads, each a conversation of `requests` turns asking back a number it just gave.

    Every answer must contain its own number; every follow-up must be resumed from the archive (cached tokens > 0)
    and read only its new turn. Returns per-request rows and the wall time.
    """
    run = uuid.uuid4().hex[:8]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rows: list[dict] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        messages: list[dict] = []
        for turn in range(requests):
            number = secret_number(index, turn)
            messages.append({"role": "user", "content": f"The secret number is {number}. What is the secret "
                                                        "number? Answer with the number only."})
            started = time.perf_counter()
            status, _, data = request_json(url, "POST", "/v1/chat/completions", {
                "model": model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                CONVERSATION_FIELD: f"load-{run}-{index}"}, headers)
            latency = time.perf_counter() - started
            answer = data["choices"][0]["message"]["content"] if status == 200 else ""
            usage = data["usage"] if status == 200 else {}
            with lock:
                rows.append({"client": index, "turn": turn, "status": status, "latency_s": latency,
                             "answer": answer, "correct": status == 200 and str(number) in answer,
                             "prefill_tokens": usage.get("prefill_tokens", 0),
                             "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                             "completion_tokens": usage.get("completion_tokens", 0)})
            if status != 200:
                return
            messages.append({"role": "assistant", "content": answer})

    clock = time.perf_counter()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows.sort(key=lambda row: (row["client"], row["turn"]))
    return {"rows": rows, "wall_s": time.perf_counter() - clock}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    at = (len(ordered) - 1) * q
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def load_receipt_parts(result: dict, *, clients: int, requests: int) -> dict:
    """Metrics, gates and outputs of a load test, for a receipt."""
    from infinitekv import receipts

    rows = result["rows"]
    latencies = [row["latency_s"] for row in rows]
    followups = [row for row in rows if row["turn"] > 0]
    correct = sum(row["correct"] for row in rows)
    expected = clients * requests
    resumed = [row for row in followups if row["cached_tokens"] > 0 and row["prefill_tokens"] < 64]
    answers = json.dumps([[row["client"], row["turn"], row["answer"]] for row in rows], ensure_ascii=False)
    return {
        "outputs": {"answers_sha256": hashlib.sha256(answers.encode()).hexdigest(),
                    "first_answer": rows[0]["answer"] if rows else ""},
        "metrics": {
            "requests": receipts.metric(len(rows), "requests"),
            "correct_answers": receipts.metric(correct, "requests"),
            "latency_p50_s": receipts.metric(round(percentile(latencies, 0.5), 3), "s"),
            "latency_p95_s": receipts.metric(round(percentile(latencies, 0.95), 3), "s"),
            "latency_max_s": receipts.metric(round(max(latencies), 3), "s"),
            "requests_per_s": receipts.metric(round(len(rows) / result["wall_s"], 3), "requests/s"),
            "completion_tokens_per_s": receipts.metric(
                round(sum(row["completion_tokens"] for row in rows) / result["wall_s"], 2), "tokens/s"),
            "followup_prefill_tokens_max": receipts.metric(max((r["prefill_tokens"] for r in followups), default=0),
                                                           "tokens"),
        },
        "gates": {
            "every_answer_correct": receipts.gate(len(rows) == expected and correct == expected,
                                                  detail=f"{correct}/{expected} answers contain their number"),
            "followups_resumed": receipts.gate(len(resumed) == len(followups) == clients * (requests - 1),
                                               detail=f"{len(resumed)}/{len(followups)} follow-ups resumed from the "
                                                      "archive with fewer than 64 tokens read"),
        },
        "extra": {"rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                           for row in rows]},
    }

"""`loreft serve`: an OpenAI-compatible HTTP server for a base model and its ReFT adapters.

    GET  /v1/models             the base model and every loaded adapter, by name
    POST /v1/chat/completions   messages, formatted as the chosen adapter was trained (as `loreft generate`)
    POST /v1/completions        a raw prompt (as `loreft generate --raw`)
    POST /v1/adapters           load another adapter folder onto the base model: {"path": ..., "name": ...}

The request's `model` picks the base model or an adapter. Every request joins one continuous batch
(generate.ContinuousBatcher), whatever its adapter: the edit happens in its prefill, and decode steps
run the plain model for all rows together. Starlette and uvicorn come with the `serve` extra.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .config import ConfigError
from .data import encode_prompt
from .generate import ContinuousBatcher, Request, format_prompt

DEFAULT_MAX_TOKENS = 512
FALLBACK_CONTEXT = 4096  # for models whose config names no context length
ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, and the parameter it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ---------------------------------------------------------------------------------------------------
# What is served: one base model, its adapters by name


@dataclass
class Adapter:
    name: str
    path: str
    reft: object
    formatting: dict | None


class Served:
    """The base model, its tokenizer, the adapters loaded onto it, and the batcher generating for all."""

    def __init__(self, model, tokenizer, base_name: str, max_batch: int = 32, context_length: int | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, default_temperature: float = 0.0):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.context_length = context_length or model_context_length(model)
        self.vocab_size = getattr(getattr(model, "args", None), "vocab_size", None) or len(tokenizer)
        self.default_max_tokens, self.default_temperature = default_max_tokens, default_temperature
        self.adapters: dict[str, Adapter] = {}
        self.batcher = ContinuousBatcher(model, tokenizer, max_batch=max_batch)
        self.created = int(time.time())

    def add_adapter(self, name: str, path: str) -> Adapter:
        """Attach an adapter folder (call on the batcher's thread once it runs); errors say why it does not fit."""
        from .adapter import load_adapter, read_adapter_config

        if name == self.base_name or name in self.adapters:
            raise ConfigError("adapter", name, "this name is already served; pick another (NAME=PATH)")
        meta = read_adapter_config(path)
        adapter = Adapter(name, str(path), load_adapter(self.model, path), meta.get("formatting"))
        self.adapters[name] = adapter
        return adapter

    def pick(self, name) -> Adapter | None:
        """The adapter a request's `model` names (None: the base model)."""
        if name is None:
            raise ApiError(400, "you must provide a model parameter", "model", "missing_required_parameter")
        if not isinstance(name, str):
            raise ApiError(400, f"model must be a string, got {type(name).__name__}", "model", "invalid_type")
        if name == self.base_name:
            return None
        if name not in self.adapters:
            names = ", ".join([self.base_name, *self.adapters])
            raise ApiError(404, f"The model '{name}' does not exist; this server has: {names}", "model",
                           "model_not_found")
        return self.adapters[name]

    def model_cards(self) -> list[dict]:
        cards = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "loreft"}]
        for a in self.adapters.values():
            cards.append({"id": a.name, "object": "model", "created": self.created, "owned_by": "loreft",
                          "parent": self.base_name, "root": a.path})
        return cards


def model_context_length(model) -> int:
    """The longest sequence the model's config allows (FALLBACK_CONTEXT when it names none)."""
    args = getattr(model, "args", None)
    for source in (args, getattr(args, "text_config", None)):
        for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
            value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return FALLBACK_CONTEXT


def adapter_name(spec: str) -> tuple[str, str]:
    """'NAME=PATH' or 'PATH' (named after its folder) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/")).name
    if not name or not path:
        raise ConfigError("adapter", spec, "expected PATH or NAME=PATH")
    return name, path


# ---------------------------------------------------------------------------------------------------
# Request fields: checked one by one, each error naming its field


def _number(body: dict, key: str, default, low: float, high: float, low_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key} must be a number, got {type(value).__name__}", key, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ApiError(400, f"{key} must be in {bounds}, got {value}", key, "invalid_value")
    return float(value)


def _integer(body: dict, key: str):
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"{key} must be an integer, got {type(value).__name__}", key, "invalid_type")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, got {type(value).__name__}", key, "invalid_type")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop", "invalid_value")
    return [s for s in stops if s]


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts", where, "invalid_type")


def chat_messages(body: dict) -> list[dict]:
    """The request's messages as [{'role', 'content': str}], checked."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "you must provide a messages parameter", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", where, "invalid_type")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                           f"{where}.role", "invalid_value")
        out.append({"role": m["role"], "content": _text_of(m.get("content"), f"{where}.content")})
    return out


def chat_prompt(tokenizer, messages: list[dict], formatting: dict | None) -> str:
    """The conversation as the model saw prompts in training.

    One user message is formatted exactly as `loreft generate` formats a prompt. Longer conversations need
    a chat template: the adapter's (trained with chat=True) or, for the base model, the tokenizer's.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return format_prompt(tokenizer, messages[0]["content"], formatting)
    if formatting and formatting.get("chat") and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise ApiError(400, "this model was trained on single prompts (no chat template): send one user message, "
                        "or use /v1/completions with the full text", "messages", "invalid_value")


def base_formatting(tokenizer) -> dict | None:
    """The base model's chat formatting: the tokenizer's chat template when it has one, else raw text."""
    return {"prompt_template": None, "chat": True} if getattr(tokenizer, "chat_template", None) else None


def completion_prompt(body: dict) -> str | list[int]:
    """/v1/completions' prompt: a string, a list of one string, or token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "you must provide a prompt parameter", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "prompt must be a string, a list of one string, or a list of token ids", "prompt", "invalid_type")


@dataclass
class Job:
    """One validated generation: prompt ids, adapter, budget, sampling, stop strings."""

    ids: list[int]
    adapter: Adapter | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stream: bool
    include_usage: bool


def parse_job(served: Served, body: dict, ids_of) -> Job:
    """Check every field of a completion request; ids_of(adapter) formats and tokenizes its prompt."""
    adapter = served.pick(body.get("model"))
    if _integer(body, "n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n", "invalid_value")
    temperature = _number(body, "temperature", served.default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _integer(body, "seed")
    stops = _stops(body)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_type")
    include_usage = _flag(options, "include_usage")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"{key} must be at least 1, got {max_tokens}", key, "invalid_value")

    ids = ids_of(adapter)
    context = served.context_length
    if not ids:
        raise ApiError(400, "the prompt is empty", "messages" if "messages" in body else "prompt", "invalid_value")
    room = context - len(ids)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has {len(ids)}",
                       "messages" if "messages" in body else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(served.default_max_tokens, room)
    elif max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; you requested "
                            f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the completion)",
                       key, "context_length_exceeded")
    return Job(ids, adapter, max_tokens, temperature, top_p, seed, stops, stream, include_usage)


# ---------------------------------------------------------------------------------------------------
# Generation: tokens from the batcher's thread, text to the client


class StopText:
    """Text to send so far: cut at the first stop string, holding back what could begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def next(self, text: str, final: bool) -> tuple[str, bool]:
        """(new text to send, whether a stop string was reached)."""
        start = max(0, self.sent - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = max(min(hits), self.sent), True
        else:
            end, stopped = (len(text) if final else max(self.sent, len(text) - self.hold)), False
        piece, self.sent = text[self.sent:end], end
        return piece, stopped


async def generate_text(served: Served, job: Job):
    """Yield (text piece, finish_reason or None, completion tokens so far); frees the slot if abandoned."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()

    def emit(token, finish_reason):  # on the batcher's thread
        loop.call_soon_threadsafe(tokens.put_nowait, (token, finish_reason))

    reft = job.adapter.reft if job.adapter is not None else None
    uid = served.batcher.submit(Request(job.ids, reft, job.max_tokens, emit, job.temperature, job.top_p, job.seed))
    detokenizer = served.tokenizer.detokenizer  # a fresh one per request
    stop_text = StopText(job.stops)
    count, done, released = 0, False, False
    try:
        while not done:
            token, finish_reason = await tokens.get()
            released = finish_reason is not None  # the batcher has let this request go
            if token is not None:
                detokenizer.add_token(token)
                count += 1
            if finish_reason is not None:
                detokenizer.finalize()
            if finish_reason == "error":
                raise ApiError(500, "generation failed on the server (see its log)", None, "generation_failed", "server_error")
            piece, stopped = stop_text.next(detokenizer.text, final=finish_reason is not None)
            if stopped:
                finish_reason = "stop"
            done = finish_reason is not None
            if piece or done:
                yield piece, finish_reason, count
    finally:
        if not released:
            served.batcher.cancel(uid)  # a stop string, or a client that went away: free the slot


def _usage(job: Job, count: int) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": count, "total_tokens": len(job.ids) + count}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def complete(served: Served, job: Job, chat: bool, name: str, request: HttpRequest):
    """The response to a validated job: one JSON object, or server-sent events ending in [DONE]."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": name}

    def choice(piece: str, finish_reason, first: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": piece} if first else {"content": piece}) if piece or first else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish_reason}

    if job.stream:
        async def events():
            count = 0
            if chat:
                yield _sse({**head, "choices": [choice("", None, first=True)]})
            try:
                async for piece, finish_reason, count in generate_text(served, job):
                    if piece:
                        yield _sse({**head, "choices": [choice(piece, None)]})
                    if finish_reason is not None:
                        yield _sse({**head, "choices": [choice("", finish_reason)]})
            except ApiError as e:  # the status line is sent already: say it in the stream
                yield _sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
            if job.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(job, count)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect():
        pieces, finish_reason, count = [], None, 0
        async for piece, finish_reason, count in generate_text(served, job):
            pieces.append(piece)
        return "".join(pieces), finish_reason, count

    collecting = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collecting, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        collecting.cancel()  # a no-op once done; else the client left: the generator's cleanup frees the slot
    await asyncio.gather(collecting, return_exceptions=True)
    if collecting.cancelled():
        return JSONResponse({}, status_code=499)  # nobody is listening
    text, finish_reason, count = collecting.result()  # raises ApiError if generation failed
    head["object"] = "chat.completion" if chat else "text_completion"
    if chat:
        body = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    else:
        body = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return JSONResponse({**head, "choices": [body], "usage": _usage(job, count)})


async def _wait_for_disconnect(request: HttpRequest) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


# ---------------------------------------------------------------------------------------------------
# The web app


def build_app(served: Served, api_key: str | None = None) -> Starlette:
    """The Starlette app serving `served`; api_key: require `Authorization: Bearer <api_key>` on /v1."""

    def check_key(request: HttpRequest) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", None, "invalid_api_key")

    async def json_body(request: HttpRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def endpoint(handler):
        async def wrapped(request: HttpRequest):
            try:
                check_key(request)
                return await handler(request)
            except ApiError as e:
                return e.response()
            except ConfigError as e:
                return ApiError(400, str(e), e.field, "invalid_value").response()
        return wrapped

    async def models(request):
        return JSONResponse({"object": "list", "data": served.model_cards()})

    async def chat_completions(request):
        body = await json_body(request)

        def ids_of(adapter):
            messages = chat_messages(body)
            formatting = adapter.formatting if adapter is not None else base_formatting(served.tokenizer)
            return encode_prompt(served.tokenizer, chat_prompt(served.tokenizer, messages, formatting))

        job = parse_job(served, body, ids_of)
        return await complete(served, job, True, body["model"], request)

    async def completions(request):
        body = await json_body(request)

        def ids_of(adapter):
            prompt = completion_prompt(body)
            if isinstance(prompt, str):
                return encode_prompt(served.tokenizer, prompt)
            if not all(0 <= t < served.vocab_size for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {served.vocab_size})", "prompt", "invalid_value")
            return prompt

        job = parse_job(served, body, ids_of)
        return await complete(served, job, False, body["model"], request)

    async def load_adapter(request):
        body = await json_body(request)
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "path must be the adapter folder (a string)", "path", "invalid_type")
        name = body.get("name") or Path(path.rstrip("/")).name
        if not isinstance(name, str):
            raise ApiError(400, "name must be a string", "name", "invalid_type")
        try:
            future = served.batcher.call(lambda: served.add_adapter(name, path))
            adapter = await asyncio.wrap_future(future)
        except (ConfigError, ValueError, FileNotFoundError, KeyError) as e:
            raise ApiError(400, f"cannot load adapter {path}: {e}", "path", "invalid_adapter") from None
        return JSONResponse({"id": adapter.name, "object": "model", "parent": served.base_name, "root": adapter.path})

    async def health(request):
        running, waiting = served.batcher.active()
        return JSONResponse({"status": "ok", "running": running, "waiting": waiting, "peak_running": served.batcher.peak,
                             "steps": served.batcher.steps})

    async def http_error(request, exc: HTTPException):
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                        "not_found" if exc.status_code == 404 else None).response()

    routes = [
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/adapters", endpoint(load_adapter), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def serve(served: Served, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn); the batcher thread runs alongside."""
    import uvicorn

    served.batcher.start()
    try:
        uvicorn.run(build_app(served, api_key), host=host, port=port, log_level=log_level)
    finally:
        served.batcher.close()

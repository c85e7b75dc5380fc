"""The HTTP side of `mamba2 serve`: OpenAI's endpoints on FastAPI, over the scheduler.

    GET  /v1/models             the one model served
    POST /v1/completions        text (or token ids) in, text out; `stream: true` for SSE
    POST /v1/chat/completions   messages in, rendered with the model's chat template
    GET  /health                running and queued sequences, the prefix cache

Every error is an OpenAI error object ({"error": {"message", "type", "param", "code"}})
with the status OpenAI gives it. Tokenizing and template rendering run in worker threads;
the model runs only in the scheduler's thread.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
import json
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Mamba2Error
from ..generation.sampling import SamplingParams
from ..generation.types import GenerationEvent, Request
from .scheduler import Job, NotReady, QueueFull, Scheduler, finish_reason
from .schemas import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                      ChunkChoice, Completion, CompletionChoice, CompletionRequest, Delta, ErrorBody, ErrorResponse,
                      ModelCard, ModelList, PromptTokensDetails, SamplingFields, Usage)

# The largest request body read: a prompt of a million tokens of code is about 4 MB of text.
MAX_BODY_BYTES = 8 * 1024 * 1024
# max_tokens when a request gives none: OpenAI's for completions; chat replies run to their end.
DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_CHAT_TOKENS = 4096
_TEXT_MARKER = "@text@"

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    body = ErrorBody(message=message, type=_ERROR_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorResponse(error=body).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


class Guard:
    """ASGI middleware before everything else: the body cap (413) and the API key (401).

    The body is read here, whole, up to MAX_BODY_BYTES, and handed on in one piece; later
    receives go to the server (a client's disconnect is seen through them).
    """

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "Incorrect API key provided" if given else "Missing API key: send Authorization: Bearer KEY"
                return await error_response(401, what, code="invalid_api_key")(scope, receive, send)
        too_large = error_response(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                                   code="request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return await too_large(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        given = False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None  # the field, not the union member pydantic tried last
    if e.get("type") == "missing":
        return f"missing required parameter: {param}", param
    if param is None and e.get("type") in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object", None
    return f"invalid value for {param}: {e.get('msg')}", param


def create_app(scheduler: Scheduler, model_name: str, *, api_key: str | None = None,
               max_prompt_tokens: int = 32768, sampling_defaults: dict | None = None) -> FastAPI:
    """The application serving `scheduler`'s model under the id `model_name`."""
    defaults = dict(sampling_defaults or {"temperature": 1.0, "top_p": 1.0})
    created = int(time.time())
    template = None

    app = FastAPI(title="mamba2", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        h = {"model": model_name, **scheduler.health()}
        return JSONResponse(h, status_code=200 if h["status"] == "ready" else 503)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    def check(body: SamplingFields, default_tokens: int, max_tokens: int | None) -> dict:
        if body.model != model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`",
                           "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if max_tokens is not None and max_tokens < 0:
            raise APIError(400, f"max_tokens must be >= 0, got {max_tokens}", "max_tokens")
        if scheduler.status != "ready":
            raise APIError(503, scheduler.error or "the model is loading; try again shortly",
                           code="model_loading" if scheduler.status == "loading" else "model_failed")
        settings = {k: v for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                    if (v := getattr(body, k)) is not None or (v := defaults.get(k)) is not None}
        try:
            SamplingParams(**settings).check()
        except Mamba2Error as e:
            raise APIError(400, str(e)) from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
        return dict(max_tokens=default_tokens if max_tokens is None else max_tokens, seed=body.seed, stop=stop,
                    ignore_eos=body.ignore_eos, **settings)

    async def start(request: Request, keep_reply: bool) -> Job:
        try:
            request.prompt = await run_in_threadpool(scheduler.prompt_ids, request)
        except NotReady as e:
            raise APIError(503, str(e)) from None
        except Mamba2Error as e:
            raise APIError(400, str(e)) from None
        n = len(request.prompt)
        if n > max_prompt_tokens:
            raise APIError(400, f"This server's maximum prompt length is {max_prompt_tokens} tokens; the prompt has "
                           f"{n} tokens", "prompt" if not keep_reply else "messages", "context_length_exceeded")
        job = Job(request, keep_reply, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), code="rate_limit_exceeded") from None
        return job

    async def events(job: Job, http: HTTPRequest | None = None) -> AsyncIterator[list[GenerationEvent]]:
        """The job's events to its last, in lists of those that have arrived (a stream
        writes each list at once); the job is cancelled if the consumer stops early."""
        done = False
        try:
            while not done:
                if http is None:
                    items = [await job.queue.get()]
                else:  # no response is being written: look for a disconnect every second
                    try:
                        items = [await asyncio.wait_for(job.queue.get(), 1.0)]
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            return
                        continue
                while not job.queue.empty():
                    items.append(job.queue.get_nowait())
                for item in items:
                    if isinstance(item, Mamba2Error):
                        raise APIError(400, str(item))
                    if isinstance(item, Exception):
                        raise APIError(500, f"generation failed: {type(item).__name__}: {item}")
                done = items[-1].result is not None
                yield items
        finally:
            if not done:
                job.cancelled = True

    async def last_event(job: Job, http: HTTPRequest) -> GenerationEvent | None:
        last = None
        async for items in events(job, http):
            last = items[-1]
        return last if last is not None and last.result is not None else None

    def usage(job: Job, event: GenerationEvent) -> Usage:
        r = event.result
        return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=len(r.token_ids),
                     total_tokens=r.prompt_tokens + len(r.token_ids),
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=job.cached_tokens))

    def sse(obj) -> str:
        return f"data: {obj.model_dump_json()}\n\n"

    def text_sse(make) -> Callable[[str], str]:
        """text -> the SSE line of the chunk make(text). The chunk is dumped once, with a
        marker for its text, and each token's line is that dump with the text put in: a
        stream writes one line per token, and its cost is a share of every step's time."""
        marker = json.dumps(_TEXT_MARKER)
        head, tail = sse(make(_TEXT_MARKER)).split(marker)
        return lambda text: head + json.dumps(text, ensure_ascii=False) + tail

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        settings = check(body, DEFAULT_COMPLETION_TOKENS, body.max_tokens)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (n=1)", "prompt")
            prompt = prompt[0]
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        job = await start(Request(prompt, **settings), keep_reply=False)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, reason: str | None = None, use: Usage | None = None, choices=True) -> Completion:
            got = [CompletionChoice(text=text, finish_reason=reason)] if choices else []
            return Completion(id=rid, created=now, model=model_name, choices=got, usage=use)

        if not body.stream:
            last = await last_event(job, http)
            return None if last is None else chunk(last.result.text, finish_reason(last), usage(job, last))

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        line = text_sse(chunk)

        async def stream():
            async for items in events(job):
                out = [line(e.text) for e in items if e.result is None]  # a line per token, "" while text is held back
                last = items[-1]
                if last.result is not None:
                    out.append(sse(chunk(last.text, finish_reason(last))))
                    if include_usage:
                        out.append(sse(chunk("", use=usage(job, last), choices=False)))
                    out.append("data: [DONE]\n\n")
                if out:
                    yield "".join(out)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        nonlocal template
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        settings = check(body, DEFAULT_CHAT_TOKENS, max_tokens)
        if template is None:
            from ..chat import ChatTemplate

            template = ChatTemplate(scheduler.tokenizer)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = await run_in_threadpool(template.prompt_ids, messages)
        except Mamba2Error as e:
            raise APIError(400, str(e), "messages") from None
        settings["stop"] = settings["stop"] + list(template.stop)
        job = await start(Request(ids, **settings), keep_reply=True)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: Delta | None, reason: str | None = None, use: Usage | None = None) -> ChatCompletionChunk:
            got = [ChunkChoice(delta=delta, finish_reason=reason)] if delta is not None else []
            return ChatCompletionChunk(id=rid, created=now, model=model_name, choices=got, usage=use)

        if not body.stream:
            last = await last_event(job, http)
            if last is None:
                return None
            choice = ChatChoice(message=AssistantMessage(content=last.result.text), finish_reason=finish_reason(last))
            return ChatCompletion(id=rid, created=now, model=model_name, choices=[choice], usage=usage(job, last))

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        line = text_sse(lambda text: chunk(Delta(content=text)))

        async def stream():
            yield sse(chunk(Delta(role="assistant", content="")))
            async for items in events(job):
                out = [line(e.text) for e in items if e.result is None or e.text]
                last = items[-1]
                if last.result is not None:
                    out.append(sse(chunk(Delta(), finish_reason(last))))
                    if include_usage:
                        out.append(sse(chunk(None, use=usage(job, last))))
                    out.append("data: [DONE]\n\n")
                if out:
                    yield "".join(out)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


"""Mini LLM's OpenAI-compatible HTTP API (`minillm serve`), on FastAPI: the routes, the key check, OpenAI's
JSON shapes and server-sent events, and its errors.

    GET  /health                  the server is up; which models are loaded
    GET  /v1/models               the runs it serves, each named by its folder
    POST /v1/completions          text in, text out (a prompt, or a list of them)
    POST /v1/chat/completions     messages in, the assistant's turn out (runs trained on conversations)

Every failure is OpenAI's error object with its status (400 a bad parameter or prompt, 401 a missing or
wrong key, 404 an unknown model, 413 a body too large, 429 the run's queue is full, 503 the run is still
loading, 500 a bug, in one line: the traceback goes to the server's log, never to the client). A client
that goes away mid-generation has its rows leave the batch at the next step.

The generation itself is the serving core's (minillm.serve.api_jobs, batching, run_cache); this module
only speaks HTTP. FastAPI and uvicorn are the `serve` extra: only `minillm serve` imports this module.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from minillm.errors import MiniLLMError, describe_error
from minillm.run_folder import RunFolder
from minillm.serve.address import api_network_warning, check_can_serve
from minillm.serve.api_jobs import Choice, Job
from minillm.serve.api_requests import APIError, parse_chat, parse_completion
from minillm.serve.batching import BatchSettings
from minillm.serve.catalog import LOAD_WAIT_S, ServedModels
from minillm.serve.limits import ServerLimits
from minillm.serve.run_cache import RunCache, ServedRun
from minillm.serve.text import Piece, token_string
from minillm.tokenizers import Tokenizer

MAX_CONNECTIONS = 256  # open connections at once; uvicorn answers more with 503
GRACEFUL_SHUTDOWN_S = 5  # at Ctrl+C, how long open streams may go on before they are cut
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
RETRY_AFTER_S = 2  # what a 429 or 503 asks the client to wait
OWNER = "minillm"
DONE_EVENT = "data: [DONE]\n\n"  # the last event of a stream, as OpenAI ends one


@dataclass(frozen=True)
class APIOptions:
    """What `minillm serve` serves and how: the runs, the key, the limits, the batch, CORS."""

    path: Path
    api_key: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    batch: BatchSettings = field(default_factory=BatchSettings)
    cors_origins: tuple[str, ...] = ()
    load_wait_s: float = LOAD_WAIT_S


def build_app(options: APIOptions) -> FastAPI:
    """The API's app over the runs under options.path (its ServedModels is app.state.models)."""
    models = ServedModels(options.path, RunCache(options.limits.max_loaded_runs), options.batch,
                          options.load_wait_s)
    limits = options.limits
    # No interactive docs: their page loads scripts from a CDN, and the API is OpenAI's, documented there.
    app = FastAPI(title="Mini LLM", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = models
    add_error_handlers(app)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def authorize(request: Request) -> None:
        if options.api_key is not None:
            check_key(request.headers.get("authorization"), options.api_key)

    keyed = [Depends(authorize)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The server is up; each model, whether it is loaded, and its batch's load when it is."""
        return {"status": "ok", "models": [{"id": name, **model_status(models.loaded(name))}
                                           for name in models.folders()]}

    @app.get("/v1/models", dependencies=keyed)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name, folder) for name, folder in models.folders().items()]}

    @app.get("/v1/models/{name}", dependencies=keyed)
    async def get_model(name: str) -> dict[str, Any]:
        folder = models.folders().get(name)
        if folder is None:
            raise APIError(404, f"the model {name!r} does not exist on this server", "model", "model_not_found")
        return model_card(name, folder)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request) -> Response:
        parsed = parse_completion(await read_json(request, limits.max_body_bytes), limits)
        job = Job.completion(await models.get(parsed.model), parsed, limits)
        return await respond(job, request, CompletionShape())

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request) -> Response:
        parsed = parse_chat(await read_json(request, limits.max_body_bytes), limits)
        job = Job.chat(await models.get(parsed.model), parsed, limits)
        return await respond(job, request, ChatShape())

    return app


def model_status(served: ServedRun | None) -> dict[str, Any]:
    if served is None:
        return {"loaded": False}
    scheduler = served.scheduler()
    running, waiting = scheduler.load()
    return {"loaded": True, "running": running, "waiting": waiting, "steps": scheduler.steps,
            "compiled": scheduler.engine.compiled}


def check_key(header: str | None, api_key: str) -> None:
    """Refuse (APIError 401) a request without `Authorization: Bearer <api_key>`; compared in constant time."""
    if not header:
        raise APIError(401, "missing API key: send the header Authorization: Bearer YOUR_KEY", None,
                       "missing_api_key")
    scheme, _, key = header.partition(" ")
    matches = hmac.compare_digest(key.strip().encode(), api_key.encode())
    if scheme.lower() != "bearer" or not matches:
        raise APIError(401, "incorrect API key", None, "invalid_api_key")


def model_card(name: str, folder: Path) -> dict[str, Any]:
    created = int(RunFolder(folder).best_model.stat().st_mtime)
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body; APIError 413 past `limit` bytes (read no further), 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit:,} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


def add_error_handlers(app: FastAPI) -> None:
    def error(status: int, message: str, code: str | None = None) -> JSONResponse:
        return reply(APIError(status, message, None, code))

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return reply(e)

    @app.exception_handler(MiniLLMError)
    async def user_error(request: Request, e: MiniLLMError) -> JSONResponse:
        return error(400, describe_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(400, f"invalid request: {e.errors()[0].get('msg', e)}")

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:  # logged by describe_error
        return error(500, describe_error(e), "internal_error")


def reply(e: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def respond(job: Job, request: Request, shape: Shape) -> Response:
    """The job's answer: one JSON body, or server-sent events as the tokens come (stream: true)."""
    job.submit()
    if job.request.stream:
        return StreamingResponse(stream_events(job, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collecting = asyncio.ensure_future(collect(job, shape))
    try:
        while True:
            done, _ = await asyncio.wait({collecting}, timeout=DISCONNECT_POLL_S)
            if done:
                return JSONResponse(collecting.result())
            if await request.is_disconnected():  # nobody to answer: the rows leave the batch
                return Response(status_code=499)
    finally:
        collecting.cancel()
        job.cancel()


async def collect(job: Job, shape: Shape) -> dict[str, Any]:
    whole: dict[int, Piece] = {choice.index: Piece() for choice in job.choices}
    async for choice, piece in job.pieces():
        so_far = whole[choice.index]
        whole[choice.index] = Piece(so_far.text + piece.text, so_far.tokens + piece.tokens,
                                    so_far.offsets + piece.offsets)
    tokenizer = job.served.run.tokenizer
    return {**shape.head(job, chunk=False),
            "choices": [shape.whole(choice, whole[choice.index], tokenizer) for choice in job.choices],
            "usage": usage(job)}


async def stream_events(job: Job, shape: Shape) -> AsyncIterator[str]:
    chunk, tokenizer = shape.head(job, chunk=True), job.served.run.tokenizer
    if job.request.include_usage:
        chunk["usage"] = None
    try:
        for opening in shape.openings(job):
            yield event({**chunk, "choices": [opening]})
        async for choice, piece in job.pieces():
            yield event({**chunk, "choices": [shape.delta(choice, piece, tokenizer)]})
        if job.request.include_usage:
            yield event({**chunk, "choices": [], "usage": usage(job)})
        yield DONE_EVENT
    except APIError as e:  # the status is sent already: the error is the stream's last event
        yield event(e.body())
        yield DONE_EVENT
    finally:
        job.cancel()  # also when the client went away (the server cancels this generator)


def event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(job: Job) -> dict[str, int]:
    completion = job.completion_tokens
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion}


class Shape:
    """How an endpoint's answer looks: its objects' names, and a choice whole or as a chunk's delta."""

    object = chunk_object = id_prefix = ""

    def head(self, job: Job, chunk: bool) -> dict[str, Any]:
        return {"id": f"{self.id_prefix}-{uuid.uuid4().hex}", "object": self.chunk_object if chunk else self.object,
                "created": int(time.time()), "model": job.request.model}

    def openings(self, job: Job) -> list[dict[str, Any]]:
        return []

    def whole(self, choice: Choice, piece: Piece, tokenizer: Tokenizer) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, choice: Choice, piece: Piece, tokenizer: Tokenizer) -> dict[str, Any]:
        raise NotImplementedError


class CompletionShape(Shape):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def whole(self, choice: Choice, piece: Piece, tokenizer: Tokenizer) -> dict[str, Any]:
        logprobs = None
        if choice.scored_tokens:
            logprobs = {"tokens": [token_string(tokenizer, t.id) for t in piece.tokens],
                        "token_logprobs": [t.logprob for t in piece.tokens],
                        "top_logprobs": [None if t.logprob is None else
                                         {token_string(tokenizer, i): p for i, p in t.top} for t in piece.tokens],
                        "text_offset": piece.offsets}
        return {"index": choice.index, "text": piece.text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason}

    delta = whole  # a chunk's choice is a whole choice's shape, with the new text only


class ChatShape(Shape):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def openings(self, job: Job) -> list[dict[str, Any]]:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in job.choices]

    def whole(self, choice: Choice, piece: Piece, tokenizer: Tokenizer) -> dict[str, Any]:
        return {"index": choice.index, "message": {"role": "assistant", "content": piece.text},
                "logprobs": self._logprobs(choice, piece, tokenizer), "finish_reason": choice.finish_reason}

    def delta(self, choice: Choice, piece: Piece, tokenizer: Tokenizer) -> dict[str, Any]:
        return {"index": choice.index, "delta": {"content": piece.text} if piece.text else {},
                "logprobs": self._logprobs(choice, piece, tokenizer), "finish_reason": choice.finish_reason}

    @staticmethod
    def _logprobs(choice: Choice, piece: Piece, tokenizer: Tokenizer) -> dict[str, Any] | None:
        if not choice.scored_tokens:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = token_string(tokenizer, token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, p) for i, p in t.top]}
                            for t in piece.tokens]}


def serve(options: APIOptions, host: str, port: int) -> None:
    """Serve the API on host:port until Ctrl+C (a lone run folder starts loading at once)."""
    check_can_serve(host, port)  # a busy or bad address is one error line, before anything starts
    warning = api_network_warning(host, options.api_key is not None)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = build_app(options)
    models: ServedModels = app.state.models
    names = list(models.folders())
    if len(names) == 1 and RunFolder(options.path).has_best_model():
        models.start_loading(names[0])
    listed = ", ".join(names) if names else f"none yet (runs trained into {options.path} appear as they are made)"
    print(f"Mini LLM API on http://{host}:{port}/v1 (models: {listed}); Ctrl+C to stop", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                    limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    finally:
        models.close()

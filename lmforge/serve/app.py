"""The HTTP API: a FastAPI app around one Engine (model + adapters), a Batcher (one worker thread)
and Metrics. Requests are validated and tokenized before they are queued, so a bad input is
answered with a 4xx naming the field and never reaches a batch."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import lmforge
from lmforge.errors import ConfigError
from lmforge.serve import schemas as S
from lmforge.serve.batcher import Batcher, QueueFull, ShuttingDown
from lmforge.serve.engine import Engine, GenJob, InputError, Seq
from lmforge.serve.metrics import Metrics
from lmforge.serve.registry import Registry, check_name

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model: str = "minilm"
    adapters: list[tuple[str, str]] = field(default_factory=list)   # (name, directory) loaded at start
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_input_tokens: int | None = None
    api_key: str | None = None
    adapter_root: str | None = None
    quantize: str | None = None
    device: str = "cpu"           # auto | cpu | cuda (kernels.precision.resolve_device)
    # auto | fp32 | bf16; fp32 by default here as in the library's Classifier and Embedder
    # (`lmforge serve` passes its --precision, auto by default)
    precision: str = "fp32"


ERRORS = {code: {"model": S.ErrorResponse, "description": text} for code, text in {
    400: "the model or adapter cannot do this (e.g. generation on an encoder)",
    401: "missing or wrong API key (when the server has one)",
    403: "adapter path or one of its files leading outside --adapter-root (symlinks resolved), or a path-like adapter name",
    404: "unknown adapter (the message lists the loaded ones)",
    413: "an input is longer than --max-input-tokens, or a request has more inputs than --max-queue",
    422: "malformed JSON or a field of the wrong type (the message names it)",
    429: "the queue is full: retry after the Retry-After header's seconds",
}.items()}

KNOWN_PATHS = {"/", "/healthz", "/metrics", "/openapi.json", "/docs", "/v1/classify", "/v1/embed",
               "/v1/generate", "/v1/adapters"}


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None, **extra):
    body = {"status": status, "message": message}
    if field is not None:
        body["field"] = field
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _clean_loc(loc) -> str:
    # drop "body" and pydantic's union-branch tags such as "function-after[...]" or "list[...]"
    parts = [str(x) for x in loc if isinstance(x, int) or (str(x).isidentifier() and x != "body")]
    return ".".join(parts) or "body"


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    e = errors[0]
    if e.get("type") == "json_invalid":
        pos = e["loc"][1] if len(e.get("loc", ())) > 1 else "?"
        return f"the request body is not valid JSON (at character {pos}): {e.get('msg')}", "body"
    where = _clean_loc(e.get("loc", ()))
    same = [x for x in errors if _clean_loc(x.get("loc", ())) == where]   # the branches of a union
    msgs = list(dict.fromkeys(str(x.get("msg")) for x in same))
    more = len(errors) - len(same)
    tail = f" (and {more} more problem(s))" if more else ""
    return f"{where}: {' or '.join(msgs)}{tail}", where


def create_app(settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    if engine is None:  # an engine given is used as it was built (its own device and precision)
        from lmforge.kernels.precision import resolve
        device, precision = resolve(settings.device, settings.precision, int8=settings.quantize == "int8")
        engine = Engine(settings.model, settings.max_input_tokens, str(device), precision)
    metrics = Metrics()
    registry = Registry(engine, settings.adapter_root)
    registry.engine_metrics_hook = lambda: metrics.set("lmforge_adapters_loaded", len(registry.names()))
    for name, directory in settings.adapters:
        try:
            registry.add(name, Path(directory))
        except InputError as e:
            raise ConfigError(f"--adapter {name}={directory}: {e}") from None
    if settings.quantize == "int8":
        engine.prepare_quantized()
    elif settings.quantize:
        raise ConfigError(f"--quantize {settings.quantize!r}: only int8 is supported")
    registry.engine_metrics_hook()

    def runner(kind: str, items: list) -> list:
        if kind in ("classify", "embed"):
            metrics.observe("lmforge_batch_adapters", len({s.adapter for s in items}))
            for s in items:
                metrics.inc("lmforge_adapter_sequences_total", adapter=s.adapter or "base", kind=kind)
        return engine.run(kind, items)

    batcher = Batcher(runner, settings.max_batch_size, settings.max_wait_ms, settings.max_queue, metrics)
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:  # uvicorn has answered every open request by now; finish anything still queued
            state["draining"] = True
            await asyncio.to_thread(batcher.stop, 60.0)

    app = FastAPI(title="lmforge serve", version=lmforge.__version__, lifespan=lifespan,
                  description="Classifiers (one base model, many LoRA adapters, batched together), "
                              "embeddings and generation. Errors are {\"error\": {status, message, field}}.")
    app.state.engine, app.state.batcher, app.state.metrics, app.state.registry = engine, batcher, metrics, registry

    # -- errors -----------------------------------------------------------------------------------
    @app.exception_handler(InputError)
    async def _input_error(request, e: InputError):
        extra = dict(e.extra)
        headers = extra.pop("headers", None)
        return _error(e.status, str(e), e.field, headers, **extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        message, where = _validation_message(e.errors())
        return _error(422, message, where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    # -- metrics for every request (a plain ASGI middleware: cheaper than BaseHTTPMiddleware) ------
    class Count:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            start = time.perf_counter()
            path = scope["path"]
            endpoint = path if path in KNOWN_PATHS else (
                "/v1/adapters/{name}" if path.startswith("/v1/adapters/") else "other")
            status = [500]

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)
            try:
                await self.app(scope, receive, send_status)
            finally:
                metrics.inc("lmforge_requests_total", endpoint=endpoint, method=scope["method"], status=str(status[0]))
                metrics.observe("lmforge_request_duration_seconds", time.perf_counter() - start, endpoint=endpoint)

    app.add_middleware(Count)

    # -- auth -------------------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="the key from the server's --api-key-env variable")

    async def auth(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if not settings.api_key:
            return
        given = cred.credentials if cred else request.headers.get("x-api-key")
        if not given:
            raise InputError(401, "missing API key: send 'Authorization: Bearer KEY' (or 'X-API-Key: KEY')",
                             headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode("utf-8", "replace"), settings.api_key.encode()):
            raise InputError(401, "wrong API key", headers={"WWW-Authenticate": "Bearer"})

    def enqueue(kind: str, items: list):
        """Queue a request's items; its future. A request that cannot be queued is answered here."""
        if len(items) > batcher.max_queue:  # would never fit: retrying cannot help, so not a 429
            raise InputError(413, f"{len(items)} inputs in one request, more than the whole queue holds "
                             f"({batcher.max_queue} sequences, --max-queue); split the request", "inputs")
        try:
            return batcher.submit(kind, items)
        except QueueFull as e:
            raise InputError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise InputError(503, str(e), headers={"Retry-After": "5"}) from None

    def model_failed(kind: str, e: Exception) -> InputError:
        log.error("%s request failed in the model: %s", kind, e)
        return InputError(500, f"the model failed on this request: {type(e).__name__}: {e}")

    async def submit(kind: str, items: list) -> list:
        future = enqueue(kind, items)
        try:
            return await asyncio.wrap_future(future)
        except InputError:
            raise
        except Exception as e:  # the forward pass failed for this request (and only this one)
            raise model_failed(kind, e) from None

    async def encode(inputs: list, truncate: bool):
        # short inputs are tokenized right here (microseconds); long ones off the event loop
        if sum(len(x) if isinstance(x, str) else len(x[0]) + len(x[1]) for x in inputs) < 20_000:
            return engine.encode(inputs, truncate)
        return await run_in_threadpool(engine.encode, inputs, truncate)

    def count(endpoint: str, adapter: str | None, n: int) -> None:
        metrics.inc("lmforge_adapter_requests_total", adapter=adapter or "base", endpoint=endpoint)

    # -- endpoints --------------------------------------------------------------------------------
    v1 = {"dependencies": [Depends(auth)], "responses": ERRORS}

    @app.post("/v1/classify", response_model=S.ClassifyResponse, response_model_exclude_none=True, **v1,
              summary="Label (with probabilities by label name) or score for each input")
    async def classify(req: S.ClassifyRequest):
        registry.require(req.adapter)
        info = engine.head_info(req.adapter)
        if not info["classifier"]:
            if req.adapter is None:
                raise InputError(400, f"the base model {engine.name} has no trained classification head: "
                                 f"name an adapter (loaded: {', '.join(registry.names()) or 'none'})",
                                 "adapter", loaded=registry.names())
            raise InputError(400, f"adapter {req.adapter!r} has no classification head", "adapter")
        encoded = await encode(req.inputs, req.truncate)
        results = await submit("classify", [Seq(e, req.adapter) for e in encoded])
        count("classify", req.adapter, len(results))
        return {"model": engine.name, "adapter": req.adapter, "results": results}

    @app.post("/v1/embed", response_model=S.EmbedResponse, **v1,
              summary="Mean-pooled, L2-normalised sentence embeddings")
    async def embed(req: S.EmbedRequest):
        registry.require(req.adapter)
        encoded = await encode(req.inputs, req.truncate)
        vectors = await submit("embed", [Seq(e, req.adapter) for e in encoded])
        count("embed", req.adapter, len(vectors))
        return {"model": engine.name, "adapter": req.adapter, "dim": engine.model.config.hidden_size,
                "embeddings": [v.tolist() for v in vectors]}

    @app.post("/v1/generate", response_model=S.GenerateResponse, dependencies=v1["dependencies"],
              responses={**ERRORS, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                         "description": 'with "stream": true, server-sent events: '
                                         '`data: {"text"}` per chunk, then one with finish_reason, then `data: [DONE]`'}},
              summary="Continue a prompt (decoder models): greedy, sampling with temperature/top-k/top-p, "
                      "or beam search; no-repeat n-grams and stop strings; streamed when asked")
    async def generate(req: S.GenerateRequest):
        if not engine.can_generate:
            raise InputError(400, f"generation needs a decoder model (gpt2 or llama with a causal-lm head); this server "
                             f"runs {engine.name}, a {engine.model_type} encoder: use /v1/classify or /v1/embed")
        ids = await run_in_threadpool(engine.encode_prompt, req.prompt, req.max_new_tokens)
        job = GenJob(ids, req.max_new_tokens, req.do_sample, req.temperature, req.top_k, req.top_p, req.seed,
                     req.num_beams, req.length_penalty, req.no_repeat_ngram_size, stop=tuple(req.stop),
                     no_repeat_ngram_scope=req.no_repeat_ngram_scope)
        if req.stream:
            return stream_generation(job)
        (result,) = await submit("generate", [job])
        count("generate", None, 1)
        return {"model": engine.name, **result}

    def stream_generation(job: GenJob) -> StreamingResponse:
        """Server-sent events: the generation thread puts each chunk of text on an asyncio queue (via
        the event loop), then an end marker once its result is set; the response sends them as
        they come. Queue-full and shutdown are answered (429, 503) before the stream starts. A client
        that goes away cancels the job: a queued one never runs, a running one stops decoding."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        end = object()
        job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        job.cancelled = threading.Event()
        future = enqueue("generate", [job])
        # after the result is set (so after every chunk the job emitted), from the thread that set it
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, end))

        def sse(event) -> str:
            return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

        async def events_of_the_job():
            try:
                while (event := await events.get()) is not end:
                    yield sse(event)
                try:
                    (result,) = future.result()
                    count("generate", None, 1)
                    yield sse({"model": engine.name, **result, "text": ""})   # the text came in the chunks
                except Exception as e:
                    error = e if isinstance(e, InputError) else model_failed("generate", e)
                    yield sse({"error": {"status": error.status, "message": str(error)}})
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()
                future.cancel()   # still queued: never runs

        return StreamingResponse(events_of_the_job(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def base_info() -> dict:
        return {"name": "(base)", "source": str(engine.directory), **engine.head_info(None)}

    @app.get("/v1/adapters", response_model=S.AdaptersResponse, **v1, summary="The loaded adapters")
    async def list_adapters():
        return {"base": base_info(), "adapters": registry.describe()}

    @app.post("/v1/adapters", response_model=S.AdapterInfo, status_code=201,
              responses={**ERRORS, 409: {"model": S.ErrorResponse, "description": "name already loaded"}},
              dependencies=[Depends(auth)], summary="Hot-load an adapter from below --adapter-root")
    async def load_adapter(req: S.LoadAdapterRequest):
        check_name(req.name)
        directory = registry.resolve_allowed(req.path)   # 403 outside --adapter-root
        # every file is read inside the root too (403 out of it; 400 not a regular file, too large)
        return await run_in_threadpool(registry.add, req.name, directory, req.path, registry.confined)

    @app.delete("/v1/adapters/{name}", status_code=204, **v1, summary="Unload an adapter")
    async def unload_adapter(name: str):
        check_name(name)
        await run_in_threadpool(registry.remove, name)

    @app.get("/healthz", response_model=S.Health, summary="Liveness and a few numbers")
    async def healthz():
        return {"status": "draining" if state["draining"] else "ok", "model": engine.name,
                "model_type": engine.model_type, "adapters": len(registry.names()),
                "queue_depth": batcher.depth, "quantized": engine.quantized,
                "device": str(engine.model.device), "precision": engine.precision.name,
                "precision_why": engine.precision.why}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
    async def prometheus():
        metrics.set("lmforge_queue_depth", batcher.depth)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("lmforge.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    return app

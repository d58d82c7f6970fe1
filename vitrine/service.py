"""The lifecycle every Vitrine service shares: health, readiness, metrics, errors, logging.

Each service's `create_app` starts from `base_app` and adds its own routes and cleanup
contexts, so probes and error mapping behave the same on every role.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

from proto.codec import unpack_json
from vitrine.errors import InvalidMessage, VitrineError

log = structlog.get_logger()

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_BYTES = 16 * 1024**2
# a caller's request id is taken only if it is a short printable ASCII token: it goes into
# every log line and every shard request header, where anything else would break them
_REQUEST_ID = re.compile(r"[!-~]{1,64}")


@dataclass
class Readiness:
    """Ready: safe to receive traffic (a shard has caught up, models are loaded).
    Alive: false once a background loop has died or a liveness check names a reason (a loop
    stuck on one batch), so the orchestrator restarts the process."""

    ready: bool = False
    reason: str = "starting"
    alive: bool = True
    liveness_checks: list[Callable[[], str | None]] = field(default_factory=list)

    def failure(self) -> str | None:
        """Why the process should be restarted, or None while it is healthy."""
        if not self.alive:
            return self.reason
        return next((reason for check in self.liveness_checks if (reason := check())), None)

    def set_ready(self) -> None:
        self.ready, self.reason = True, "ready"

    def set_not_ready(self, reason: str) -> None:
        self.ready, self.reason = False, reason

    def set_failed(self, reason: str) -> None:
        self.alive = False
        self.set_not_ready(reason)


READINESS = web.AppKey("readiness", Readiness)
REGISTRY = web.AppKey("registry", CollectorRegistry)
REQUEST_SECONDS = web.AppKey("request_seconds", Histogram)
SERVICE_NAME = web.AppKey("service_name", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def configure_logging(service: str, level: str = "INFO", json: bool = True) -> None:
    """Structured logs on stderr: one JSON object per line, tagged with the service name."""
    renderer = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stderr)  # libraries' stdlib logs, rendered the same way
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    # libraries stay at INFO or above: VITRINE_LOG_LEVEL=DEBUG is about Vitrine's own lines
    library_level = max(logging.INFO, logging.getLevelName(level.upper()))
    logging.basicConfig(level=library_level, handlers=[handler], force=True)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def limit_compute_threads(threads: int | None) -> None:
    """Bound the OpenMP pools of FAISS and torch. Several processes on the same cores, each with
    a pool as large as the machine, slow each other down several-fold (measured with
    benchmarks/router_load.py: shard search p50 9.9 -> 2.9 ms at 1 thread each, 2 cores)."""
    if threads is None:
        return
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def base_app(service: str) -> web.Application:
    """An app with /healthz, /readyz, /metrics and the VitrineError -> HTTP mapping."""
    app = web.Application(middlewares=[_errors_and_timing], client_max_size=MAX_REQUEST_BYTES)
    registry = CollectorRegistry()
    ProcessCollector(namespace="vitrine", registry=registry)  # memory, CPU, open fds
    # join key for per-role panels: `... * on(instance) group_left(service) vitrine_service_info`
    Info("vitrine_service", "Which Vitrine role this process is", registry=registry).info(
        {"service": service, "version": service_version()}
    )
    app[REGISTRY] = registry
    app[READINESS] = Readiness()
    app[REQUEST_SECONDS] = Histogram(
        "vitrine_http_request_duration_seconds",
        "HTTP request latency by route and status",
        ["service", "route", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 1, 2.5),
    )
    app[SERVICE_NAME] = service
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def service_version() -> str:
    try:
        return importlib.metadata.version("vitrine")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _healthz(request: web.Request) -> web.Response:
    failure = request.app[READINESS].failure()
    if failure is not None:
        return web.json_response({"status": "failed", "reason": failure}, status=503)
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    status = 200 if readiness.ready else 503
    return web.json_response({"ready": readiness.ready, "reason": readiness.reason}, status=status)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def request_id(request: web.Request) -> str:
    """This request's id: the caller's `X-Request-Id` if it is a short printable ASCII token,
    else a new one. Every log line of the request carries it; the router forwards it."""
    known = request.get(REQUEST_ID_HEADER)
    if known is None:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        known = offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex[:16]
        request[REQUEST_ID_HEADER] = known
    return str(known)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, read strictly (see `proto.codec.unpack_json`): an
    unknown charset, bytes that are not in it, NaN, deep nesting: a 400 with the reason."""
    if (request.content_length or 0) > MAX_REQUEST_BYTES:  # refused before reading a byte
        raise web.HTTPRequestEntityTooLarge(MAX_REQUEST_BYTES, request.content_length or 0)
    raw = await request.read()  # a chunked body past the limit: a 413 too
    charset = request.charset or "utf-8"
    try:
        text = raw.decode(charset)
    except LookupError:
        raise InvalidMessage(f"unknown charset {charset[:40]!r}") from None
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body is not valid {charset}: {exc.reason}") from None
    return unpack_json(text)


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    """The one shape of every error answer: `{"error": reason}` with the status."""
    return web.json_response({"error": reason}, status=status, headers=headers)


@web.middleware
async def _errors_and_timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON: ours by their `http_status`, aiohttp's own (404, 405, 413,
    ...) with their status, and anything unforeseen as a logged 500 that says nothing inside."""
    structlog.contextvars.bind_contextvars(request_id=request_id(request))
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except VitrineError as exc:
        status = exc.http_status
        return error_response(status, str(exc))
    except web.HTTPException as exc:
        status = exc.status
        if status < 400:
            raise  # a redirect is not an error
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(status, _http_reason(exc), allow)
    except Exception:
        log.exception("unhandled error")
        return error_response(500, "internal error (logged with this request's id)")
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        elapsed = time.perf_counter() - started
        request.app[REQUEST_SECONDS].labels(request.app[SERVICE_NAME], name, str(status)).observe(
            elapsed
        )
        # every line logged while serving carries request_id; the router forwards it to shards
        (log.info if status >= 400 else log.debug)(
            "request", method=request.method, route=name, status=status,
            ms=round(elapsed * 1000, 3),
        )
        structlog.contextvars.unbind_contextvars("request_id")


def _http_reason(exc: web.HTTPException) -> str:
    text = exc.text or ""
    if exc.status == 404:
        return "no such route"
    if exc.status == 405:
        return f"method not allowed here (allowed: {exc.headers.get('Allow', 'none')})"
    if exc.status == 413:
        return f"request body too large: {text or exc.reason}"
    return exc.reason if not text or text == f"{exc.status}: {exc.reason}" else text


class _JsonErrorRequestHandler(RequestHandler):
    """aiohttp answers what its HTTP parser refuses (a malformed request line, an oversized or
    non-ASCII header, a broken chunked body) before any middleware runs, in text/plain: this
    answers those in the same JSON shape as every other error. Swapped in per connection by
    `_JsonErrorServer`; tests/vitrine/test_service.py sends such requests."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses a half-sent answer
        phrase = HTTPStatus(status).phrase
        lines = (message or "").strip().splitlines()
        reason = "internal error" if status >= 500 else (lines[0][:500] if lines else phrase)
        response = error_response(status, reason)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _JsonErrorRequestHandler  # same layout: it only adds a method
        return handler


def run_service(
    app: web.Application | Coroutine[Any, Any, web.Application], host: str, port: int,
    event_loop: str = "uvloop",
) -> None:
    """Serve until SIGINT/SIGTERM on the chosen event loop, then unwind the cleanup contexts
    in reverse."""
    with asyncio.Runner(loop_factory=_loop_factory(event_loop)) as runner:
        runner.run(_serve(app, host, port))


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if event_loop == "asyncio":
        return None  # the standard library's own
    if event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise ValueError(f"unknown event loop {event_loop!r}: uvloop or asyncio")


async def _serve(
    app: web.Application | Coroutine[Any, Any, web.Application], host: str, port: int
) -> None:
    if not isinstance(app, web.Application):
        app = await app
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = await start_service(app, host, port)
    try:
        log.info("listening", host=host, port=port)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


async def start_service(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start the app's cleanup contexts and listen, answering even what aiohttp's HTTP parser
    refuses in JSON; the caller owns `runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    runner.server.__class__ = _JsonErrorServer
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


@contextlib.asynccontextmanager
async def background(
    app: web.Application, job: Coroutine[Any, Any, None], name: str
) -> AsyncIterator[asyncio.Task[None]]:
    """Run a service's loop beside its HTTP server; if the loop dies, /healthz fails so the
    orchestrator restarts the process. Cancelled and awaited on the way out."""
    task = asyncio.create_task(job, name=name)

    def on_exit(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("background loop crashed", loop=name, error=repr(done.exception()))
            app[READINESS].set_failed(f"{name} crashed: {done.exception()!r}")

    task.add_done_callback(on_exit)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

"""The daemon's ASGI app: the store, the scheduler and one shared HTTP client to the runners, created at
start-up and closed at shut-down, and the two API adapters' routes. Errors are rendered here, once, in the
shape of the API that was called."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mgr.registry.inspect import InvalidModel
from mgr.registry.names import InvalidName
from mgr.registry.store import ModelNotFound, Store

from .api.ollama import OllamaApi
from .api.openai import OpenAIApi, openai_error_body
from .config import Settings
from .errors import ApiError, ClientGone
from .gpus import GpuInventory, NvmlGpus
from .pulls import Pulls
from .runner_http import RunnerHttp
from .scheduler import RunnerFactory, Scheduler
from .runners.engines import make_runner

log = logging.getLogger("mgr.daemon")


def _status_and_message(exc: Exception) -> tuple[int, str, dict[str, str]]:
    if isinstance(exc, ApiError):
        return exc.status, exc.message, exc.headers
    if isinstance(exc, ModelNotFound):
        return 404, str(exc), {}
    if isinstance(exc, (InvalidName, InvalidModel)):
        return 400, str(exc), {}
    log.exception("unexpected error", exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}", {}


async def _render_error(request: Request, exc: Exception) -> Response:
    status, message, headers = _status_and_message(exc)
    if isinstance(exc, ClientGone):
        log.info("499 %s %s: %s", request.method, request.url.path, message)
    if request.url.path.startswith("/v1/"):
        return JSONResponse(openai_error_body(message, status), status, headers=headers)
    return JSONResponse({"error": message}, status, headers=headers)


def create_app(settings: Settings, runner_factory: RunnerFactory = make_runner,
               gpus: GpuInventory | None = None) -> Starlette:
    # Runners answer on loopback; generation can take minutes, so only connecting has a deadline.
    # trust_env=False: an HTTP(S)_PROXY in the environment must never route loopback runner traffic.
    client = httpx.AsyncClient(
        trust_env=False,
        timeout=httpx.Timeout(None, connect=10.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
    )
    store = Store(settings.models_dir)
    gpus = gpus if gpus is not None else NvmlGpus()
    scheduler = Scheduler(settings, store, client, runner_factory, gpus)
    pulls = Pulls(store, settings, gpus)
    runners = RunnerHttp()  # the data path to runners; `client` (httpx) carries control calls

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        store.collect_garbage()
        log.info("mgr listening on %s, models in %s", settings.base_url, settings.models_dir)
        try:
            yield
        finally:
            await scheduler.shutdown()
            await pulls.aclose()
            runners.close()
            await client.aclose()

    app = Starlette(
        routes=OllamaApi(scheduler, store, runners, pulls).routes() + OpenAIApi(scheduler, store, runners).routes(),
        exception_handlers={Exception: _render_error, ApiError: _render_error, ModelNotFound: _render_error,
                            InvalidName: _render_error, InvalidModel: _render_error},
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    app.state.store = store
    return app

"""The daemon's ASGI app: the store, the scheduler and one shared HTTP client to the runners, created at
start-up and closed at shut-down, and the two API adapters' routes. Errors are rendered once, by api/render.py,
in the shape of the API that was called."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mgr.registry.inspect import InvalidModel
from mgr.registry.names import InvalidName
from mgr.registry.store import ModelNotFound, Store

from .api.ollama import OllamaApi
from .api.openai import OpenAIApi
from .api.render import error_response
from .config import Settings
from .errors import ApiError
from .gpus import GpuInventory, NvmlGpus
from .pulls import Pulls
from .runner_http import RunnerHttp
from .scheduler import RunnerFactory, Scheduler
from .runners.engines import make_runner

log = logging.getLogger("mgr.daemon")


async def _render_error(request: Request, exc: Exception) -> Response:
    return error_response(request.method, request.url.path, exc)


class DaemonApp:
    """The ASGI app: the OpenAI relay endpoints first (plain ASGI, see api/openai.py), then the router."""

    def __init__(self, router: Starlette, relay_routes: dict[str, ASGIApp]) -> None:
        self.router = router
        self.relay_routes = relay_routes
        self.state = router.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            relay = self.relay_routes.get(scope["path"])
            if relay is not None:
                await relay(scope, receive, send)
                return
        await self.router(scope, receive, send)


def create_app(settings: Settings, runner_factory: RunnerFactory = make_runner,
               gpus: GpuInventory | None = None) -> DaemonApp:
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

    openai = OpenAIApi(scheduler, store, runners)
    app = Starlette(
        routes=OllamaApi(scheduler, store, runners, pulls).routes() + openai.routes(),
        exception_handlers={Exception: _render_error, ApiError: _render_error, ModelNotFound: _render_error,
                            InvalidName: _render_error, InvalidModel: _render_error},
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    app.state.store = store
    return DaemonApp(app, openai.relay_routes())

"""The daemon's ASGI app: the store, the scheduler, the connection pool to the runners and the pulls,
created at start-up and closed at shut-down, and the API adapters' routes. Errors are rendered once, by
api/render.py, in the shape of the API that was called."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mgr.registry.config import Settings
from mgr.registry.errors import MgrError
from mgr.registry.store import Store

from . import tracing
from .api.anthropic import AnthropicApi
from .api.ollama import OllamaGeneration
from .api.ollama_models import OllamaModels
from .api.openai import OpenAIApi
from .api.openapi import no_route, openapi_route
from .api.render import error_response
from .api.responses import ResponsesApi
from .api.ui import WebConsole
from .errors import ShuttingDown
from .gpus import GpuInventory, NvmlGpus
from .guards import Guards
from .leftovers import records_dir, stop_leftovers
from .logs import AccessLog, Endpoints
from .metrics import metrics_route
from .pulls import Pulls
from .responses_store import ResponseStore
from .runners.engines import EngineRunners
from .runners.http import RunnerPool
from .scheduler import RunnerFactory, Scheduler

log = logging.getLogger("mgr.daemon")


async def _render_error(request: Request, exc: Exception) -> Response:
    return error_response(request.method, request.url.path, exc)


async def _render_no_route(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405 (plain text of its own) as JSON in the called API's shape."""
    assert isinstance(exc, HTTPException)
    method, path = request.method, request.url.path
    return error_response(method, path, no_route(method, path, exc.status_code, exc.headers))


class DaemonApp:
    """The ASGI app: the relayed endpoints first (plain ASGI: OpenAI's in api/openai.py, Ollama's /api/chat and
    /api/generate in api/ollama.py), then the router."""

    def __init__(self, router: Starlette, relay_routes: dict[str, ASGIApp], scheduler: Scheduler,
                 store: Store, pulls: Pulls | None = None,
                 guards: Callable[[ASGIApp], ASGIApp] | None = None) -> None:
        self.router = router
        self.relay_routes = relay_routes
        self.scheduler = scheduler
        self.store = store
        self.pulls = pulls
        # every request passes the access log first (its counter, its log line: logs.py), so the guards' refusals
        # (401, 403, 413: guards.py) are logged and counted too; then the guards, before any path
        guarded = guards(self._dispatch) if guards is not None else self._dispatch
        self.handle: ASGIApp = AccessLog(guarded, Endpoints.of(router.routes, list(relay_routes)),
                                         tracing.from_environment())

    async def drain(self, grace: float) -> None:
        """SIGTERM (server.py): no new requests (those still queued are answered 503 at once); the answers and
        pulls in flight get `grace` seconds to finish, then end with a last error line. The lifespan's end then
        stops every runner."""
        self.scheduler.stop_admitting()
        await asyncio.sleep(grace)
        self.scheduler.end_answers(ShuttingDown())
        if self.pulls is not None:
            self.pulls.downloader.stop("the server is shutting down; pull again to resume where this one stopped")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handle(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            relay = self.relay_routes.get(scope["path"])
            if relay is not None:
                if scope["method"] == "POST":
                    await relay(scope, receive, send)
                else:
                    method, path = scope["method"], scope["path"]
                    await error_response(method, path, no_route(method, path, 405, {"Allow": "POST"}))(
                        scope, receive, send)
                return
        await self.router(scope, receive, send)


def create_app(settings: Settings, runner_factory: RunnerFactory | None = None,
               gpus: GpuInventory | None = None) -> DaemonApp:
    store = Store(settings.models_dir)
    gpus = gpus if gpus is not None else NvmlGpus()
    # the data path to every runner (each runner owns its control client), which notices a runner that hangs
    pool = RunnerPool(settings.runner_timeout, settings.runner_idle_timeout)
    scheduler = Scheduler(settings, store, runner_factory or EngineRunners(settings, pool), gpus)
    pulls = Pulls(store, settings, gpus)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        for pid, model in await asyncio.to_thread(stop_leftovers, records_dir(settings.runner_log_dir)):
            log.warning("stopped runner %d (%s), left running by a daemon that ended without stopping it", pid, model)
        store.collect_garbage()
        log.info("mgr listening on %s, models in %s", settings.base_url, settings.models_dir)
        scheduler.lifecycle.read_ray_soon()
        try:
            yield
        finally:
            await scheduler.shutdown()
            await pulls.aclose()
            pool.close()

    generation = OllamaGeneration(scheduler, store)
    openai = OpenAIApi(scheduler, store)
    # the streamed generation endpoints of both APIs, plain ASGI ahead of the router (api/openai.py says why)
    relay_routes = {**openai.relay_routes(), **generation.relay_routes()}
    app = Starlette(
        routes=OllamaModels(scheduler, store, pulls, generation).routes() + generation.routes() + openai.routes()
        + ResponsesApi(scheduler, ResponseStore(settings.state_dir / "responses")).routes()
        + AnthropicApi(scheduler).routes() + [openapi_route(relay_routes), metrics_route(scheduler, gpus)]
        + WebConsole(scheduler).routes(),
        # MgrError through the exception middleware (answered, not re-raised); anything else is a logged 500;
        # the router's own 404 and 405 as JSON
        exception_handlers={MgrError: _render_error, HTTPException: _render_no_route, Exception: _render_error},
        lifespan=lifespan,
    )
    return DaemonApp(app, relay_routes, scheduler, store, pulls,
                     guards=lambda inner: Guards(inner, settings))

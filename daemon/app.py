"""The daemon's ASGI app: the store, the scheduler, the connection pool to the runners and the pulls,
created at start-up and closed at shut-down, and the API adapters' routes. Errors are rendered once, by
api/render.py, in the shape of the API that was called."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mgr.registry.config import Settings
from mgr.registry.errors import MgrError
from mgr.registry.store import Store

from .api.ollama import OllamaGeneration
from .api.ollama_models import OllamaModels
from .api.openai import OpenAIApi
from .api.render import error_response
from .gpus import GpuInventory, NvmlGpus
from .pulls import Pulls
from .runners.engines import EngineRunners
from .runners.http import RunnerPool
from .scheduler import RunnerFactory, Scheduler

log = logging.getLogger("mgr.daemon")


async def _render_error(request: Request, exc: Exception) -> Response:
    return error_response(request.method, request.url.path, exc)


class DaemonApp:
    """The ASGI app: the OpenAI relay endpoints first (plain ASGI, see api/openai.py), then the router."""

    def __init__(self, router: Starlette, relay_routes: dict[str, ASGIApp], scheduler: Scheduler,
                 store: Store) -> None:
        self.router = router
        self.relay_routes = relay_routes
        self.scheduler = scheduler
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            relay = self.relay_routes.get(scope["path"])
            if relay is not None:
                await relay(scope, receive, send)
                return
        await self.router(scope, receive, send)


def create_app(settings: Settings, runner_factory: RunnerFactory | None = None,
               gpus: GpuInventory | None = None) -> DaemonApp:
    store = Store(settings.models_dir)
    gpus = gpus if gpus is not None else NvmlGpus()
    pool = RunnerPool()  # the data path to every runner; each runner owns its control client
    scheduler = Scheduler(settings, store, runner_factory or EngineRunners(settings, pool), gpus)
    pulls = Pulls(store, settings, gpus)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        store.collect_garbage()
        log.info("mgr listening on %s, models in %s", settings.base_url, settings.models_dir)
        try:
            yield
        finally:
            await scheduler.shutdown()
            await pulls.aclose()
            pool.close()

    generation = OllamaGeneration(scheduler, store)
    openai = OpenAIApi(scheduler, store)
    app = Starlette(
        routes=OllamaModels(scheduler, store, pulls, generation).routes() + generation.routes() + openai.routes(),
        # MgrError through the exception middleware (answered, not re-raised); anything else is a logged 500
        exception_handlers={MgrError: _render_error, Exception: _render_error},
        lifespan=lifespan,
    )
    return DaemonApp(app, openai.relay_routes(), scheduler, store)

"""`mgr serve`: read the settings once, then run the app on uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import uvicorn

from mgr.registry.config import ConfigError, load_settings

from .app import create_app


def serve(overrides: Mapping[str, str | None] | None = None) -> int:
    try:
        settings = load_settings(overrides)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runner request is noise
    config = uvicorn.Config(
        create_app(settings), host=settings.bind_host, port=settings.bind_port, log_level="info",
        access_log=False, timeout_graceful_shutdown=30, lifespan="on",
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits this way when it cannot bind
        print(f"Error: could not listen on {settings.host} (is another server using it? set MGR_HOST)",
              file=sys.stderr)
        return int(e.code or 1)
    return 0 if server.started else 1

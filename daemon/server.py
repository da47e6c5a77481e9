"""`mgr serve`: read the settings once, then run the app on uvicorn until SIGINT/SIGTERM, and drain.

Draining (SIGTERM or Ctrl+C): the listening socket closes at once (uvicorn) and idle keep-alive connections with
it; requests still queued for a model are answered 503; answers and pulls in flight get `shutdown_timeout`
seconds (10 by default, MGR_SHUTDOWN_TIMEOUT) to finish. Past that they end with a last line that says why (an
Ollama stream's {"error": ...}, an OpenAI stream's error event, a pull's error line: what it fetched stays, for
a resume). Then every runner is stopped and the process exits 0. uvicorn's own graceful-shutdown timeout stays
as the backstop, a few seconds later, for anything that is not an answer (a blob upload, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Callable, Generator, Mapping

import uvicorn

from mgr.registry.config import ConfigError, Settings, load_settings

from .app import DaemonApp, create_app
from .guards import limited_http_protocol
from .logs import configure as configure_logging
from .notify import notify

BACKSTOP_SECONDS = 5.0  # after the drain's deadline, for what is still open then


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: DaemonApp, grace: float) -> None:
        super().__init__(config)
        self.daemon_app = app
        self.grace = grace

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan's start, then listening
        if self.started:
            notify("READY=1")  # systemd (Type=notify): the service is up only now

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        notify("STOPPING=1")
        drain = asyncio.ensure_future(self.daemon_app.drain(self.grace))
        try:
            await super().shutdown(sockets)  # waits for open connections, then runs the lifespan's end
        finally:
            drain.cancel()  # everything ended before its deadline

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            # uvicorn raises the signal it caught again once it is done, so that the process dies of it (exit
            # code -15). A drained SIGTERM is a clean stop: exit 0.
            self._captured_signals.clear()


def listen(settings: Settings) -> socket.socket:
    """The listening socket, bound before anything starts, so a busy port fails in one line. Raises OSError."""
    family = socket.AF_INET6 if ":" in settings.bind_host else socket.AF_INET
    sock = socket.create_server((settings.bind_host, settings.bind_port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def serve(overrides: Mapping[str, str | None] | None = None,
          listening: Callable[[Settings], None] | None = None) -> int:
    """Run the daemon until it is stopped; `listening` is called once the port is bound (the CLI records the pid)."""
    try:
        settings = load_settings(overrides)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    try:
        sock = listen(settings)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        print(f"Error: could not listen on {settings.host}: {reason} (another mgr? `mgr status` tells; "
              "or choose another address with MGR_HOST)", file=sys.stderr)
        return 1
    if listening is not None:
        listening(settings)
    configure_logging(settings.debug, settings.log_format)  # stderr, text or JSON lines (logs.py)
    app = create_app(settings)
    grace = max(0.0, settings.shutdown_timeout)
    config = uvicorn.Config(
        app, host=settings.bind_host, port=settings.bind_port, log_level="info", log_config=None,
        access_log=False, timeout_graceful_shutdown=int(grace + BACKSTOP_SECONDS + 0.999), lifespan="on",
        # connection limits (guards.py): headers capped (431) and timed, at most max_connections at once (503)
        http=limited_http_protocol(settings.max_header_size, settings.header_timeout) or "h11",
        h11_max_incomplete_event_size=settings.max_header_size, limit_concurrency=settings.max_connections,
        timeout_keep_alive=max(1, round(settings.idle_timeout)),
    )
    server = DrainingServer(config, app, grace)
    try:
        server.run(sockets=[sock])
    except SystemExit as e:  # uvicorn exits this way when it cannot bind
        print(f"Error: could not listen on {settings.host} (is another server using it? set MGR_HOST)",
              file=sys.stderr)
        return int(e.code or 1)
    return 0 if server.started else 1

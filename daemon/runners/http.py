"""The daemon's data path to its runners: a minimal HTTP/1.1 client on asyncio streams.

Every generated token crosses this path once as an SSE event. Through httpx each event cost tens of
microseconds of Python (httpcore, anyio, h11 per read), which at 256 concurrent streams saturated the daemon's
core (measured on the H100: 68% of vLLM's direct throughput). Here a read takes whatever the socket holds (up
to 256 KiB), chunked framing is decoded from one buffer, and all complete chunks go on together, so events that
arrived together leave together. Runners listen on 127.0.0.1 and speak plain HTTP/1.1, which is all this needs
to handle; control calls (health, sleep, wake) stay on httpx.

A runner that stops answering is detected here: while a request waits for the runner (not while the daemon's own
client is slow to take what came), at most `first_byte_timeout` seconds may pass before the answer begins (the
runner's queue, the prompt, or a whole non-streamed answer) and `idle_timeout` between two reads of a body. Past
that, the exchange ends with RunnerTimedOut (504) and the runner's `on_hung` callback is told (the scheduler
restarts it); so is a refused connection (the runner's server is gone while its process lingers). One watchdog task
per pool checks the open exchanges about four times per timeout; a read costs a
clock read more. The same ending, with ShuttingDown, closes every open exchange when a draining daemon's
deadline passes. Ended exchanges finish in the protocol's own way: a streamed (SSE) answer with a last error
event, which the OpenAI relay passes on and `events` raises; anything else raises the error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from mgr.registry.errors import MgrError

from ..errors import RunnerFailed, RunnerTimedOut
from ..protocol import shapes
from ..protocol.errors import error_message, openai_error_body
from ..protocol.runner_secret import bearer
from ..protocol.sse import SseDecoder

READ_SIZE = 256 * 1024
# Idle connections kept per runner: enough for a burst of as many requests as a vLLM runner takes at once
# (256 by default), so a burst does not pay a TCP connect per request. Runners close idle ones after a few
# seconds (uvicorn's keep-alive timeout); a request that meets a closed one retries once on a fresh one.
MAX_IDLE_PER_RUNNER = 1024
FIRST_BYTE_TIMEOUT = 300.0  # the defaults of Settings.runner_timeout and runner_idle_timeout
IDLE_TIMEOUT = 120.0
END_WAIT = 1.0  # seconds a body's framing may take to come after the answer's end before its connection is closed


RUNNER_STOPPED = "the model runner stopped unexpectedly; the next request starts a new one"


class RunnerGone(Exception):
    """The runner closed the connection or stopped answering mid-response (a transport failure, turned into
    RunnerFailed where a client is told)."""


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_now = time.monotonic


class _Exchange:
    """One request to a runner, from sending it until its answer is read or given up: what the watchdog looks
    at. `waiting` is when the read in progress began (0: no read in progress)."""

    __slots__ = ("answering", "ended", "limit", "on_hung", "port", "waiting", "writer")

    def __init__(self, port: int, writer: asyncio.StreamWriter, limit: float,
                 on_hung: Callable[[], None] | None) -> None:
        self.port = port
        self.writer = writer
        self.limit = limit  # seconds a read may wait: the first-byte timeout, then the idle one
        self.answering = False  # the answer's head has come
        self.on_hung = on_hung
        self.waiting = _now()
        self.ended: MgrError | None = None  # why the daemon ended it (timeout, shutdown)

    def end(self, error: MgrError) -> None:
        """Close the connection: the pending read returns, sees `ended`, and finishes with this error."""
        if self.ended is None:
            self.ended = error
            self.writer.close()


class RunnerClient:
    """Typed calls to one runner (as Ollama's llm/server.go: Completion/Chat/Embedding): handlers call these,
    never build URLs. Streams come back raw (`RunnerResponse`), for the OpenAI relay to pass on byte for byte
    and for `events` to decode where an adapter translates them."""

    def __init__(self, pool: RunnerPool, port: int, secret: str = "") -> None:
        self.pool = pool
        self.port = port
        # the runner's secret (protocol/runner_secret.py) as a header line; "" for a runner that checks none
        self.auth_line = f"Authorization: {bearer(secret)}\r\n" if secret else ""
        self.on_hung: Callable[[], None] | None = None  # set by the scheduler: a request timed out on this runner

    async def chat(self, body: shapes.ChatBody) -> RunnerResponse:
        return await self.open(shapes.CHAT_PATH, body)

    async def completion(self, body: shapes.CompletionBody) -> RunnerResponse:
        return await self.open(shapes.COMPLETION_PATH, body)

    async def embedding(self, body: shapes.EmbeddingBody) -> shapes.EmbeddingList:
        return cast(shapes.EmbeddingList, json.loads(await whole(await self.open(shapes.EMBEDDING_PATH, body))))

    async def tokenize(self, body: shapes.TokenizeChatBody | shapes.TokenizeTextBody) -> shapes.TokenizeAnswer:
        return cast(shapes.TokenizeAnswer, json.loads(await whole(await self.open(shapes.TOKENIZE_PATH, body))))

    async def open(self, path: str, body: Any) -> RunnerResponse:
        """POST and return the response once its status is known; a runner error status becomes an MgrError
        with the runner's status and message, a runner that does not answer RunnerFailed."""
        try:
            response = await self.pool.post_json(self.port, path, body, self.on_hung, self.auth_line)
            if response.status_code != 200:
                raw = await response.read()
                await response.aclose()
                raise MgrError(error_message(raw), response.status_code)
        except RunnerGone as e:
            raise RunnerFailed(str(e)) from None
        return response

    def end_open(self, error: MgrError) -> None:
        """End every exchange open with this runner now (a draining daemon's deadline): streams get a last
        error event, waits raise `error`."""
        self.pool.end_open(self.port, error)


async def whole(response: RunnerResponse) -> bytes:
    """A whole (not streamed) answer; cancelling the wait closes the runner connection, which stops the
    runner."""
    try:
        return await response.read()
    except RunnerGone:
        raise RunnerFailed(RUNNER_STOPPED) from None
    finally:
        await response.aclose()


async def events(response: RunnerResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a runner's SSE stream; raises an MgrError for an error event or a broken stream."""
    decoder = SseDecoder()
    try:
        async for data in response.iter_bytes():
            for event in decoder.feed(data):
                if "error" in event:
                    error = event["error"]
                    if not isinstance(error, dict):
                        raise RunnerFailed(str(error))
                    code = error.get("code")
                    raise MgrError(str(error.get("message")), code if isinstance(code, int) and code >= 400 else 500)
                yield event
            if decoder.done:
                response.ended = True
                return
    except RunnerGone:
        raise RunnerFailed(RUNNER_STOPPED) from None


class RunnerPool:
    """Pooled keep-alive connections to every runner on 127.0.0.1, by port: one per daemon."""

    def __init__(self, first_byte_timeout: float = FIRST_BYTE_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._idle: dict[tuple[str, int], list[Connection]] = defaultdict(list)
        # <= 0: no limit
        self.first_byte_timeout = first_byte_timeout if first_byte_timeout > 0 else float("inf")
        self.idle_timeout = idle_timeout if idle_timeout > 0 else float("inf")
        self._open: set[_Exchange] = set()
        self._watchdog: asyncio.Task[None] | None = None

    def client(self, port: int, secret: str = "") -> RunnerClient:
        return RunnerClient(self, port, secret)

    async def post_json(self, port: int, path: str, body: Any,
                        on_hung: Callable[[], None] | None = None, auth_line: str = "") -> RunnerResponse:
        host = "127.0.0.1"
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Accept: */*\r\n{auth_line}Content-Length: {len(payload)}\r\n\r\n").encode()
        for attempt in (1, 2):
            reader, writer, reused = await self._connect(host, port, on_hung)
            exchange = self._watch(port, writer, on_hung)
            try:
                writer.write(head + payload)
                status_line = await reader.readline()
                if not status_line:
                    raise ConnectionResetError("connection closed before the response")
                raw_headers = await reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                writer.close()
                self._open.discard(exchange)
                if exchange.ended is not None:
                    raise exchange.ended from None
                if reused and attempt == 1:
                    continue  # a pooled keep-alive connection the runner had closed: once more, fresh
                raise RunnerGone(f"the model runner did not answer: {e}") from None
            except BaseException:  # cancelled (the client left): closing the connection stops the runner
                writer.close()
                self._open.discard(exchange)
                raise
            if exchange.ended is not None:  # it came just as the deadline passed
                self._open.discard(exchange)
                raise exchange.ended
            exchange.waiting, exchange.limit, exchange.answering = 0.0, self.idle_timeout, True
            return RunnerResponse(self, (host, port), reader, writer, status_line, raw_headers, exchange)
        raise AssertionError("unreachable")

    # watching ----------------------------------------------------------------------------------------
    def _watch(self, port: int, writer: asyncio.StreamWriter, on_hung: Callable[[], None] | None) -> _Exchange:
        exchange = _Exchange(port, writer, self.first_byte_timeout, on_hung)
        self._open.add(exchange)
        watchdog = self._watchdog
        if min(self.first_byte_timeout, self.idle_timeout) != float("inf") and (
                watchdog is None or watchdog.done() or watchdog.get_loop() is not asyncio.get_running_loop()):
            self._watchdog = asyncio.ensure_future(self._watch_open())  # (a pool may outlive an event loop: tests)
        return exchange

    async def _watch_open(self) -> None:
        """End exchanges whose runner has kept a read waiting past its limit; stop when none is open."""
        tick = max(0.05, min(1.0, self.first_byte_timeout / 4, self.idle_timeout / 4))
        while self._open:
            await asyncio.sleep(tick)
            now = _now()
            for exchange in list(self._open):
                if exchange.waiting and exchange.ended is None and now - exchange.waiting > exchange.limit:
                    where = "in the middle of its answer (runner_idle_timeout)" if exchange.answering \
                        else "after the request (runner_timeout)"
                    exchange.end(RunnerTimedOut(f"the model runner sent nothing for {exchange.limit:.0f}s {where}; "
                                                "it is taken as hung and started again"))
                    self._open.discard(exchange)
                    if exchange.on_hung is not None:
                        exchange.on_hung()

    def end_open(self, port: int | None, error: MgrError) -> None:
        """End the open exchanges with one runner (or with all, for None) with `error`."""
        for exchange in list(self._open):
            if port is None or exchange.port == port:
                exchange.end(error)
                self._open.discard(exchange)

    async def _connect(self, host: str, port: int, on_hung: Callable[[], None] | None = None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        idle = self._idle[(host, port)]
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
        except OSError as e:
            # a runner whose port refuses connections while its process lives is dying (vLLM after its engine or a
            # Ray worker died took ~4 s to exit): taken as hung, so it is killed and the next request loads afresh
            if isinstance(e, ConnectionRefusedError) and on_hung is not None:
                on_hung()
            raise RunnerGone(f"the model runner did not answer: {e}") from None
        return reader, writer, False

    def _give_back(self, key: tuple[str, int], connection: Connection) -> None:
        idle = self._idle[key]
        if len(idle) < MAX_IDLE_PER_RUNNER:
            idle.append(connection)
        else:
            connection[1].close()

    def close(self) -> None:
        for idle in self._idle.values():
            for _, writer in idle:
                writer.close()
        self._idle.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()


class RunnerResponse:
    def __init__(self, pool: RunnerPool, key: tuple[str, int], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, status_line: bytes, raw_headers: bytes,
                 exchange: _Exchange | None = None) -> None:
        self._pool = pool
        self._key = key
        self._reader = reader
        self._writer = writer
        self._exchange = exchange or _Exchange(key[1], writer, float("inf"), None)
        self._complete = False
        self._closed = False
        try:
            self.status_code = int(status_line.split()[1])
        except (IndexError, ValueError):
            raise RunnerGone(f"the model runner sent a malformed status line: {status_line[:80]!r}") from None
        headers = {}
        for line in raw_headers.decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        self.headers = headers
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._body: AsyncIterator[bytes] | None = None  # the body being read (iter_bytes)
        # Set by a reader that saw the answer's end (an SSE stream's [DONE]) and stopped there: what follows is
        # framing (a chunked body's last chunk), which aclose reads so that the connection can be used again.
        self.ended = False
        self._length = int(headers["content-length"]) if "content-length" in headers else None
        self._keep_alive = headers.get("connection", "").lower() != "close"
        self._sse = headers.get("content-type", "").startswith("text/event-stream")

    async def _read(self, size: int) -> bytes:
        """The next bytes, with the wait watched; b"" at the end, or when the daemon ended the exchange."""
        exchange = self._exchange
        exchange.waiting = _now()
        try:
            return await self._reader.read(size)
        finally:
            exchange.waiting = 0.0

    def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives, framing removed; raises RunnerGone if it ends early. One the daemon ended
        (a timeout, a shutdown) finishes with its error: as a last SSE event for a stream, else raised."""
        self._body = self._body_bytes()
        return self._body

    async def _body_bytes(self) -> AsyncIterator[bytes]:
        try:
            if self._chunked:
                async for data in self._chunks():
                    yield data
            elif self._length is not None:
                left = self._length
                while left:
                    data = await self._read(min(left, READ_SIZE))
                    if not data:
                        raise RunnerGone("the model runner closed the connection mid-response")
                    left -= len(data)
                    yield data
            else:
                while data := await self._read(READ_SIZE):
                    yield data
                self._keep_alive = False
            self._complete = True
        except (OSError, asyncio.IncompleteReadError, RunnerGone) as e:
            ended = self._exchange.ended
            if ended is None:
                raise e if isinstance(e, RunnerGone) else RunnerGone(f"the model runner stopped mid-response: {e}") \
                    from None
            if not self._sse:
                raise ended from None
            yield b"\n\ndata: " + json.dumps(openai_error_body(ended.message, ended.status)).encode() + b"\n\n"
        finally:
            self._pool._open.discard(self._exchange)

    async def _chunks(self) -> AsyncIterator[bytes]:
        buffer = bytearray()
        while True:
            out = bytearray()
            while (line_end := buffer.find(b"\r\n")) >= 0:
                size = int(bytes(buffer[:line_end]).split(b";")[0], 16)
                if size == 0:
                    if buffer.find(b"\r\n\r\n", line_end) < 0:  # the end: "0\r\n" then trailers and "\r\n"
                        break
                    if out:
                        yield bytes(out)
                    return
                end = line_end + 2 + size
                if len(buffer) < end + 2:
                    break
                out += buffer[line_end + 2:end]
                del buffer[:end + 2]
            if out:
                yield bytes(out)  # everything that arrived together, as one piece
            data = await self._read(READ_SIZE)
            if not data:
                raise RunnerGone("the model runner closed the connection mid-response")
            buffer += data

    async def read(self) -> bytes:
        return b"".join([data async for data in self.iter_bytes()])

    def abort(self) -> None:
        """Close the connection now (the client has gone): a pending read ends and the runner stops."""
        self._closed = True
        self._pool._open.discard(self._exchange)
        self._writer.close()

    async def aclose(self) -> None:
        """Return the connection to the pool when the body was read to its end (or to the answer's end, see
        `ended`), else close it (which also tells the runner that the client has gone, so it stops generating)."""
        if self._closed:
            return
        try:
            if self.ended and not self._complete and self._body is not None:
                await self._read_rest(self._body)
        finally:
            self._closed = True
            self._pool._open.discard(self._exchange)
            if self._complete and self._keep_alive:
                self._pool._give_back(self._key, (self._reader, self._writer))
            else:
                self._writer.close()

    @staticmethod
    async def _read_rest(body: AsyncIterator[bytes]) -> None:
        """The body past the answer's end: its framing, nearly always come already. Without this, every answer
        read up to [DONE] (the Ollama, Anthropic and Responses APIs) cost a new connection to the runner for
        the next request: a TCP connect here and a new connection in the runner's server, on every request's
        way to its first token (tests/bench/relay_overhead.py, 64 streams: the Ollama API added 16.7 ms to the
        TTFT p50 where the OpenAI relay, which reads to the end, added 8.0; with this 9.4 and 8.2)."""
        try:
            async with asyncio.timeout(END_WAIT):
                async for _ in body:
                    pass
        except (TimeoutError, RunnerGone, MgrError):
            pass  # the connection is closed instead

"""The llama.cpp runner process: `python -m mgr.daemon.runners.llama --model FILE --port N ...`.

Started by the daemon, one per loaded GGUF model, on 127.0.0.1 only. It listens at once (GET /health answers
503 while the model loads, 200 when ready) and exits non-zero when the load fails, so the daemon learns of a
failure from the process exit and the last lines of this process's log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import uvicorn

from .engine import Engine, EngineConfig
from .server import RunnerApp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mgr-llama-runner")
    p.add_argument("--model", required=True, help="GGUF file")
    p.add_argument("--served-model-name", default="model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together")
    p.add_argument("--ctx-size", type=int, default=4096, help="context per sequence, in tokens")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gpu-layers", type=int, default=-1, help="-1 = all, when the build has a GPU backend")
    p.add_argument("--mmproj", default=None, help="a vision model's projector GGUF: images are accepted with it")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template used instead of the model's own")
    p.add_argument("--lora", default=None, help="a GGUF LoRA adapter applied to every request")
    p.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false",
                   help="clear a slot's KV cache when its request ends (no prompt prefix reused)")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    engine = Engine(EngineConfig(
        model_path=args.model, n_parallel=args.parallel, n_ctx_per_seq=args.ctx_size,
        n_batch=args.batch_size, n_threads=args.threads, n_gpu_layers=args.gpu_layers, mmproj=args.mmproj,
        chat_template=args.chat_template, lora=args.lora, cache_prompt=args.cache_prompt,
    ))
    engine.start()
    server = uvicorn.Server(uvicorn.Config(
        RunnerApp(engine, args.served_model_name).app, host=args.host, port=args.port,
        log_level="warning", access_log=False, lifespan="off",
    ))
    failed = False

    async def watch_load() -> None:
        nonlocal failed
        await asyncio.to_thread(engine.ready.wait)
        if engine.load_error:
            print(f"error: {engine.load_error}", file=sys.stderr, flush=True)
            failed = True
            server.should_exit = True

    watcher = asyncio.create_task(watch_load())
    await server.serve()
    watcher.cancel()
    return 1 if failed or engine.load_error else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    args = parse_args(argv)
    try:
        import uvloop  # uvicorn[standard] brings it; the daemon's own server picks it the same way
    except ImportError:
        return asyncio.run(serve(args))
    # Besides its faster sockets: uvloop's call_soon_threadsafe wakes the loop without letting go of the GIL,
    # so the engine thread goes straight on to its next decode. asyncio's releases the GIL for its wake-up
    # write, and the woken loop took it: 70 us of every engine step waiting for the loop (measured here).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())

"""vLLM behind mgr vs vLLM alone, on the GPU machine (not a timed test: it prints what one run measured).

    export PYTHONPATH=<mgr shim>:/tmp/vllm-site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
    python3 tests/bench/bench_vllm.py throughput /tmp/smollm2-st     # direct vs through mgr, 1/16/64/256 clients
    python3 tests/bench/bench_vllm.py swap warm /tmp/smollm2-st      # two models on one GPU, warm tier on
    python3 tests/bench/bench_vllm.py swap cold /tmp/smollm2-st      # the same with MGR_VLLM_SLEEP=0

throughput: one model (no --enforce-eager), /v1/completions streaming, 128 new tokens per request
(ignore_eos), N concurrent clients; each cell sent once straight to the vLLM runner's port and once through
the daemon, alternating which goes first. Aggregate tok/s = tokens / wall time; TTFT = first streamed chunk.
swap: max_loaded_models=1 and two models: with the warm tier (the evicted model sleeps) and without it
(MGR_VLLM_SLEEP=0: the evicted model is stopped, the other cold-started); time to first token after a switch.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

PORT = 11434
URL = f"http://127.0.0.1:{PORT}"
PROMPT = "Write a long story about a lighthouse keeper and a storm."


class Daemon:
    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, MGR_HOST=f"127.0.0.1:{PORT}", MGR_MODELS=str(root / "models"),
                        MGR_STATE_DIR=str(root / "state"), MGR_CONFIG=str(root / "none.toml"),
                        MGR_CONTEXT_LENGTH="2048", **env)
        self.process = subprocess.Popen([sys.executable, "-m", "mgr.cli", "serve"], env=self.env,
                                        stdout=(root / "daemon.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(URL + "/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("daemon did not start")

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "mgr.cli", *args], env=self.env, check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=600)

    def runner_port(self, model: str) -> int:
        for p in psutil.Process(self.process.pid).children(recursive=True):
            argv = p.cmdline()
            if "vllm.entrypoints.openai.api_server" in " ".join(argv) and f"{model}:latest" in argv:
                return int(argv[argv.index("--port") + 1])
        raise RuntimeError(f"no runner for {model}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


async def one_request(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first token, tokens generated) for one streamed completion."""
    started = time.perf_counter()
    first = 0.0
    generated = 0
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if not first and '"text"' in line:
                first = time.perf_counter() - started
            if '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    generated = usage["completion_tokens"]
    return first, generated


async def cell(url: str, model: str, clients: int, tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await one_request(client, url, model, 8)  # warm the connection
        started = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, model, tokens) for _ in range(clients)))
        wall = time.perf_counter() - started
    total = sum(n for _, n in results)
    return {"tok_s": total / wall, "ttft_p50_ms": statistics.median(t for t, _ in results) * 1000, "tokens": total}


def throughput(folder: str) -> None:
    daemon = Daemon(Path("/tmp/mgr-bench-vllm"))
    try:
        daemon.cli("create", "smol", "--from", folder)
        started = time.monotonic()
        httpx.post(URL + "/api/generate", json={"model": "smol", "keep_alive": -1}, timeout=600).raise_for_status()
        print(f"cold start (no --enforce-eager) through mgr: {time.monotonic() - started:.1f}s", flush=True)
        direct_url = f"http://127.0.0.1:{daemon.runner_port('smol')}"
        print("| clients | direct tok/s | mgr tok/s | mgr/direct | direct TTFT p50 ms | mgr TTFT p50 ms | added ms |")
        print("|---|---|---|---|---|---|---|")
        for i, clients in enumerate((1, 16, 64, 256)):
            order = [("direct", direct_url), ("mgr", URL)]
            if i % 2:
                order.reverse()
            measured = {name: asyncio.run(cell(url, "smol:latest", clients, 128)) for name, url in order}
            d, m = measured["direct"], measured["mgr"]
            print(f"| {clients} | {d['tok_s']:.0f} | {m['tok_s']:.0f} | {m['tok_s'] / d['tok_s']:.3f} | "
                  f"{d['ttft_p50_ms']:.1f} | {m['ttft_p50_ms']:.1f} | {m['ttft_p50_ms'] - d['ttft_p50_ms']:+.1f} |",
                  flush=True)
    finally:
        daemon.stop()


async def first_token(model: str) -> float:
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        async with client.stream("POST", URL + "/api/generate", json={
                "model": model, "prompt": PROMPT, "options": {"num_predict": 8}}) as response:
            async for line in response.aiter_lines():
                if line and json.loads(line).get("response"):
                    return time.perf_counter() - started
    raise RuntimeError("no token")


def swap(folder: str, mode: str) -> None:
    for label, sleep in (("warm (sleep/wake)", "1"), ("cold (stop/start)", "0")):
        if mode != ("warm" if sleep == "1" else "cold"):
            continue
        daemon = Daemon(Path(f"/tmp/mgr-bench-swap-{sleep}"), MGR_MAX_LOADED_MODELS="1", MGR_VLLM_SLEEP=sleep)
        try:
            daemon.cli("create", "smol-a", "--from", folder)
            daemon.cli("cp", "smol-a", "smol-b")
            times = []
            first = asyncio.run(first_token("smol-a"))
            print(f"{label}: first load of smol-a {first:.1f}s", flush=True)
            if sleep == "1":
                for _ in range(3):
                    times.append(asyncio.run(first_token("smol-b")))
                    times.append(asyncio.run(first_token("smol-a")))
                shown = times[1:]  # the first switch to smol-b is its cold start; the rest are wakes
            else:
                times.append(asyncio.run(first_token("smol-b")))  # every cold switch costs the same
                shown = times
            states = {m["name"]: m["state"] for m in httpx.get(URL + "/api/ps").json()["models"]}
            print(f"{label}: switch times to first token {[round(t, 3) for t in times]}; "
                  f"median of switches {statistics.median(shown):.3f}s; ps: {states}", flush=True)
        finally:
            daemon.stop()


if __name__ == "__main__":
    if sys.argv[1] == "swap":
        swap(sys.argv[3] if len(sys.argv) > 3 else "/tmp/smollm2-st", sys.argv[2])
    else:
        throughput(sys.argv[2] if len(sys.argv) > 2 else "/tmp/smollm2-st")

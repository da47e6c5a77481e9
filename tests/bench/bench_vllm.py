"""vLLM behind mgr vs vLLM alone, on the GPU machine (not a timed test: it prints what one run measured).

    export PYTHONPATH=<mgr shim>:/tmp/vllm-site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
    python3 tests/bench/bench_vllm.py throughput /tmp/smollm2-st     # direct vs through mgr, 1/16/64/256 clients
    python3 tests/bench/bench_vllm.py rounds /tmp/smollm2-st         # the same, paired round by round
    python3 tests/bench/bench_vllm.py swap warm /tmp/smollm2-st      # two models on one GPU, warm tier on
    python3 tests/bench/bench_vllm.py swap cold /tmp/smollm2-st      # the same with MGR_VLLM_SLEEP=0

throughput: one model (no --enforce-eager), /v1/completions streaming, 128 new tokens per request
(ignore_eos), N concurrent clients from the multi-process load generator (tests/bench/loadgen.py: a
single-process client saturated at 256 streams); each cell is run several times straight to the vLLM
runner's port and through the daemon, alternating which goes first, after one warm-up of each at that
concurrency; medians are reported. Aggregate tok/s = tokens / wall time; TTFT = first event with text.
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

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from loadgen import PROMPT, Cell, run_cell, run_paired_rounds, split_cpus  # noqa: E402
from serving import NotServing, wait_until_serving  # noqa: E402

PORT = 11434
URL = f"http://127.0.0.1:{PORT}"


class Daemon:
    def __init__(self, root: Path, cpus: set[int] | None = None, **env: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, MGR_HOST=f"127.0.0.1:{PORT}", MGR_MODELS=str(root / "models"),
                        MGR_STATE_DIR=str(root / "state"), MGR_CONFIG=str(root / "none.toml"),
                        MGR_CONTEXT_LENGTH="2048", **env)
        # the daemon's runners (vLLM) inherit its CPUs
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.process = subprocess.Popen([sys.executable, "-m", "mgr.cli", "serve"], env=self.env, preexec_fn=pin,
                                        stdout=(root / "daemon.log").open("ab"), stderr=subprocess.STDOUT)
        try:
            wait_until_serving(URL + "/", self.process, 60, interval=0.2)
        except NotServing as e:
            raise RuntimeError(f"mgr serve {e}:\n{(root / 'daemon.log').read_text()}") from None

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


def start_model(folder: str, server_cpus: set[int], client_cpus: set[int]) -> tuple[Daemon, str]:
    """The daemon with `smol` loaded for good; returns it and the vLLM runner's own URL."""
    daemon = Daemon(Path("/tmp/mgr-bench-vllm"), cpus=server_cpus)
    print(f"CPUs: daemon and vLLM on {sorted(server_cpus)}, load generator on {sorted(client_cpus)}", flush=True)
    try:
        daemon.cli("create", "smol", "--from", folder)
        started = time.monotonic()
        httpx.post(URL + "/api/generate", json={"model": "smol", "keep_alive": -1}, timeout=600).raise_for_status()
        print(f"cold start (no --enforce-eager) through mgr: {time.monotonic() - started:.1f}s", flush=True)
        return daemon, f"http://127.0.0.1:{daemon.runner_port('smol')}"
    except BaseException:
        daemon.stop()
        raise


def rounds(folder: str, plan: dict[int, int], processes: int = 8) -> None:
    """Paired rounds: `clients` simultaneous requests per round, direct and mgr alternating A B B A ...; the
    finest pairing, for an engine whose speed drifts between runs."""
    server_cpus, client_cpus = split_cpus()
    daemon, direct_url = start_model(folder, server_cpus, client_cpus)
    try:
        print(f"load generator: {processes} processes; rounds of simultaneous requests, 128 tokens each, "
              "direct and mgr alternating A B B A")
        print("| clients | rounds | direct tok/s | mgr tok/s | mgr/direct | mgr/direct paired | direct TTFT p50 ms "
              "| mgr TTFT p50 ms | added ms | added ms paired |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        targets = {"direct": direct_url, "mgr": URL}
        for clients, count in plan.items():
            run_paired_rounds(targets, "smol:latest", clients, 4, 16, processes, client_cpus)  # warm
            r = run_paired_rounds(targets, "smol:latest", clients, count, 128, processes, client_cpus)
            d, m = r.tok_s["direct"], r.tok_s["mgr"]
            dt, mt = r.ttft_p50_ms["direct"], r.ttft_p50_ms["mgr"]
            print(f"| {clients} | {count} | {d:.0f} | {m:.0f} | {m / d:.3f} | {r.ratio_paired:.3f} | {dt:.1f} "
                  f"| {mt:.1f} | {mt - dt:+.1f} | {r.added_ttft_paired_ms:+.1f} |", flush=True)
    finally:
        daemon.stop()


def throughput(folder: str, runs: int = 3, processes: int = 8, duration: float = 8.0,
               concurrencies: tuple[int, ...] = (1, 16, 64, 256)) -> None:
    server_cpus, client_cpus = split_cpus()
    daemon, direct_url = start_model(folder, server_cpus, client_cpus)
    try:
        daemon_process = psutil.Process(daemon.process.pid)
        print(f"load generator: {processes} processes, closed loop, {duration:g} s per run; {runs} runs per cell, "
              "direct and mgr alternating; medians over the runs", flush=True)
        # Each run's direct and mgr cells are neighbours in time, so their ratio cancels the engine's slow
        # drift (vLLM's own tok/s moved 15% between runs minutes apart at one client); "paired" = the median
        # of those per-run ratios and differences.
        print("| clients | direct tok/s | mgr tok/s | mgr/direct | mgr/direct paired | direct TTFT p50 ms "
              "| mgr TTFT p50 ms | added ms | added ms paired | mgr requests | daemon CPU us/token "
              "| runs (direct / mgr tok/s; TTFT ms) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for clients in concurrencies:
            for url in (direct_url, URL):  # warm both paths at this concurrency (connections, CUDA graphs)
                run_cell(url, "smol:latest", clients, 16, processes, 2, client_cpus)
            cells: dict[str, list[Cell]] = {"direct": [], "mgr": []}
            cpu = 0.0
            for run in range(runs):
                order = [("direct", direct_url), ("mgr", URL)]
                for name, url in order if run % 2 == 0 else order[::-1]:
                    before = sum(daemon_process.cpu_times()[:2])
                    cells[name].append(run_cell(url, "smol:latest", clients, 128, processes, duration,
                                                 client_cpus))
                    if name == "mgr":
                        cpu += sum(daemon_process.cpu_times()[:2]) - before
            d, m = cells["direct"], cells["mgr"]
            d_tok, m_tok = statistics.median(c.tok_s for c in d), statistics.median(c.tok_s for c in m)
            d_ttft, m_ttft = statistics.median(c.ttft_p50_ms for c in d), statistics.median(c.ttft_p50_ms for c in m)
            per_run = "; ".join(f"{a.tok_s:.0f}/{b.tok_s:.0f}, {a.ttft_p50_ms:.1f}/{b.ttft_p50_ms:.1f}"
                                for a, b in zip(d, m))
            tokens = sum(c.tokens for c in m)
            requests = sum(c.requests for c in m)
            paired_ratio = statistics.median(b.tok_s / a.tok_s for a, b in zip(d, m))
            paired_added = statistics.median(b.ttft_p50_ms - a.ttft_p50_ms for a, b in zip(d, m))
            print(f"| {clients} | {d_tok:.0f} | {m_tok:.0f} | {m_tok / d_tok:.3f} | {paired_ratio:.3f} | {d_ttft:.1f} "
                  f"| {m_ttft:.1f} | {m_ttft - d_ttft:+.1f} | {paired_added:+.1f} | {requests} "
                  f"| {cpu / tokens * 1e6:.1f} | {per_run} |", flush=True)
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
    if sys.argv[1] == "rounds":
        plan = dict(tuple(map(int, item.split(":"))) for item in
                    os.environ.get("BENCH_ROUNDS", "1:60,16:40,64:30,256:16").split(","))
        rounds(sys.argv[2] if len(sys.argv) > 2 else "/tmp/smollm2-st", plan,
               int(os.environ.get("BENCH_PROCESSES", "8")))
    elif sys.argv[1] == "swap":
        swap(sys.argv[3] if len(sys.argv) > 3 else "/tmp/smollm2-st", sys.argv[2])
    else:
        throughput(sys.argv[2] if len(sys.argv) > 2 else "/tmp/smollm2-st",
                   int(os.environ.get("BENCH_RUNS", "3")), int(os.environ.get("BENCH_PROCESSES", "8")),
                   float(os.environ.get("BENCH_SECONDS", "8")),
                   tuple(int(c) for c in os.environ.get("BENCH_CLIENTS", "1,16,64,256").split(",")))

"""What the daemon costs on the vLLM data path, measured without a GPU (not a timed test: it prints what one
run measured). The engine is a STAND-IN (tests/bench/paced_vllm.py: vLLM-shaped SSE, one token per stream per
step, almost free per token), so the numbers are the daemon's: its CPU time per request and per relayed
token, and throughput/TTFT through it vs straight to the stand-in, with the multi-process load generator the
GPU benchmark uses.

    .venv/bin/python tests/bench/relay_overhead.py [--clients 1,16,64,256] [--tokens 128] [--step-ms 10]
        [--processes 4] [--runs 2] [--rounds 4] [--endpoint chat|completion] [--apis openai,ollama]
        [--profile FILE]

Each cell sends clients x rounds requests, closed loop, through mgr's load generator (mgr.cli.loadgen, what
`mgr bench` runs): straight to the stand-in, then through mgr's OpenAI relay and its Ollama API.

On a 2-core machine the client, the stand-in and the daemon share the cores, so read the daemon's CPU cost
per token first; the ratios are only meaningful where the cores are not saturated.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from fakehub import import_file  # noqa: E402
from serving import NotServing, wait_until_serving  # noqa: E402
from standin.models import write_tiny_safetensors_model  # noqa: E402

HERE = Path(__file__).parent
PROMPT = "Write a long story about a lighthouse keeper and a storm."
GIB = 1 << 30

DAEMON = """
import sys, uvicorn
from pathlib import Path
from mgr.daemon.app import create_app
from mgr.registry.config import Settings
from standin.gpus import StaticGpus
root, port, profile = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
settings = Settings(host=f"127.0.0.1:{port}", models_dir=root / "models", state_dir=root / "state", num_ctx=2048)
app = create_app(settings, gpus=StaticGpus([80 << 30]))
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                       backlog=4096))
if profile:
    import cProfile, signal
    profiler = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
    signal.signal(signal.SIGUSR2, lambda *_: (profiler.disable(), profiler.dump_stats(profile)))
server.run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_vllm_package(root: Path, step_ms: float) -> Path:
    """A `vllm` package whose OpenAI server module runs the paced stand-in."""
    package = root / "pkg" / "vllm"
    (package / "entrypoints" / "openai").mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0.25.0"  # STAND-IN\n')
    (package / "entrypoints" / "__init__.py").write_text("")
    (package / "entrypoints" / "openai" / "__init__.py").write_text("")
    (package / "entrypoints" / "openai" / "api_server.py").write_text(
        f"import runpy, sys\nsys.argv += ['--step-ms', '{step_ms}']\n"
        f"runpy.run_path({str(HERE / 'paced_vllm.py')!r}, run_name='__main__')\n")
    return root / "pkg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,16,64,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="requests per client in a cell (closed loop)")
    parser.add_argument("--endpoint", choices=("chat", "completion"), default="chat")
    parser.add_argument("--apis", default="openai,ollama", help="the APIs measured through mgr")
    parser.add_argument("--profile", default="", help="write a cProfile of the daemon during the mgr cells")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mgr-relay-"))
    from mgr.cli.loadgen import Endpoint, request_body, run_cell
    from mgr.registry.store import Store

    store = Store(root / "models")
    folder = write_tiny_safetensors_model(root / "smol-st")
    store.create("smol", {name: import_file(store, folder / name) for name in ("config.json", "model.safetensors")},
                 {"type": "bench"})
    port = free_port()
    # the stand-in vLLM package, and tests/ for the imaginary GPUs (standin.gpus)
    paths = [str(fake_vllm_package(root, args.step_ms)), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), MGR_KEEP_ALIVE="-1", MGR_NUM_PARALLEL="512")
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, str(root), str(port), args.profile], env=env,
                              stdout=(root / "daemon.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_serving(url + "/", daemon, 30)
        except NotServing as e:
            raise RuntimeError(f"the daemon {e}:\n{(root / 'daemon.log').read_text()}") from None
        httpx.post(url + "/api/generate", json={"model": "smol", "keep_alive": -1}, timeout=60).raise_for_status()
        stand_in = next(p for p in psutil.Process(daemon.pid).children(recursive=True)
                        if "--port" in p.cmdline())
        direct = f"http://127.0.0.1:{stand_in.cmdline()[stand_in.cmdline().index('--port') + 1]}"
        process = psutil.Process(daemon.pid)
        targets = {"direct": Endpoint(direct, "openai", args.endpoint)}
        for api in args.apis.split(","):
            targets[f"mgr {api}"] = Endpoint(url, api, args.endpoint)
        print(f"paced stand-in: one token per stream every {args.step_ms:g} ms, {args.tokens} tokens, {args.endpoint}; "
              f"{args.processes} load-generator processes; {os.cpu_count()} cores\n")
        print("| clients | path | tok/s | / direct | TTFT p50 ms | added ms | daemon CPU us/request | "
              "daemon CPU us/token | client saturated |")
        print("|---|---|---|---|---|---|---|---|---|")
        for clients in (int(c) for c in args.clients.split(",")):
            def bodies(endpoint: Endpoint, tokens: int, count: int) -> list[bytes]:
                return [request_body(endpoint.api, endpoint.kind, "smol:latest", PROMPT, tokens, True)] * count

            for endpoint in targets.values():  # warm: connections, pools
                run_cell(endpoint, bodies(endpoint, 16, clients), clients, processes=args.processes)
            cells: dict[str, list] = {name: [] for name in targets}
            cpu = dict.fromkeys(targets, 0.0)
            for run in range(args.runs):
                order = list(targets.items())
                for name, endpoint in order if run % 2 == 0 else order[::-1]:
                    if name != "direct" and args.profile:
                        daemon.send_signal(10)  # SIGUSR1: profile on
                    before = sum(process.cpu_times()[:2])
                    cells[name].append(run_cell(endpoint, bodies(endpoint, args.tokens, clients * args.rounds),
                                                clients, processes=args.processes))
                    cpu[name] += sum(process.cpu_times()[:2]) - before
            d_tok = statistics.median(c.output_throughput for c in cells["direct"])
            d_ttft = statistics.median(c.ttft_ms["p50"] for c in cells["direct"])
            for name in targets:
                tok = statistics.median(c.output_throughput for c in cells[name])
                ttft = statistics.median(c.ttft_ms["p50"] for c in cells[name])
                requests = sum(c.completed for c in cells[name])
                tokens = sum(c.total_output_tokens for c in cells[name])
                errors = sum(c.errors for c in cells[name])
                if errors:
                    print(f"  {name}: {errors} errors: {cells[name][0].first_errors}")
                daemon_cpu = "" if name == "direct" else (
                    f"{cpu[name] / requests * 1e6:.0f} | {cpu[name] / tokens * 1e6:.1f}")
                print(f"| {clients} | {name} | {tok:.0f} | {tok / d_tok:.3f} | {ttft:.1f} | {ttft - d_ttft:+.1f} | "
                      f"{daemon_cpu or ' | '} | {any(c.saturated for c in cells[name])} |", flush=True)
        if args.profile:
            daemon.send_signal(12)  # SIGUSR2: dump
            time.sleep(2)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
